"""``--fid-weights``: the FID of the GAN example from local Inception weights.

The extra ``curvlib[fid]`` (torchmetrics, torch-fidelity) is optional: CI installs
``.[test]`` only, so the tests of the score skip without it, and the test of the
message that names the extra runs everywhere. No test has the real weights (nothing
is downloaded): a file of randomly initialised InceptionV3 weights in torch-fidelity's
layout goes through the real loading code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import dcgan_kfac  # noqa: E402
import gan_fid  # noqa: E402

TINY = [
    "--num-train", "64", "--num-test", "32", "--batch-size", "16", "--num-epochs", "2",
    "--width", "4", "--nz", "8", "--fd-dims", "8", "--t-cov", "1", "--t-inv", "2",
    "--no-progress",
]  # fmt: skip

try:
    import torch_fidelity  # noqa: F401
    import torchmetrics.image.fid  # noqa: F401
except ImportError:
    HAS_EXTRA = False
else:
    HAS_EXTRA = True
needs_extra = pytest.mark.skipif(not HAS_EXTRA, reason="needs the extra curvlib[fid]")
pytestmark = [
    pytest.mark.filterwarnings("ignore:These trainable modules have no curvature block"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random InceptionV3 weights in torch-fidelity's layout, saved as a state dict.

    He-normal convolutions keep the features from vanishing through the 90 layers.
    """
    inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    cls = inception.FeatureExtractorInceptionV3
    torch.manual_seed(0)
    with (
        mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(cls, "load_state_dict", lambda self, state: None),
    ):
        net = cls("inception-v3-compat", ["2048"])
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("fid") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return path


def test_without_the_extra_the_command_names_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for name in ("torchmetrics", "torchmetrics.image", "torchmetrics.image.fid"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(SystemExit) as exc:
        dcgan_kfac.main([*TINY, "--fid-weights", str(tmp_path / "w.pth"), "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--fid-weights needs torchmetrics" in err
    assert "pip install 'curvlib[fid]'" in err


@needs_extra
def test_a_missing_or_wrong_file_is_refused_with_the_file_it_needs(tmp_path: Path) -> None:
    real = torch.zeros(2, 1, 8, 8)
    with pytest.raises(gan_fid.FidUnavailable, match=r"no such file.*weights-inception"):
        gan_fid.FrechetInception(tmp_path / "none.pth", real, torch.device("cpu"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(gan_fid.FidUnavailable, match="not the InceptionV3 state dict"):
        gan_fid.FrechetInception(wrong, real, torch.device("cpu"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(gan_fid.FidUnavailable, match="not a file of tensors"):
        gan_fid.FrechetInception(garbage, real, torch.device("cpu"))


@needs_extra
def test_the_score_is_zero_on_the_real_images_and_grows_with_the_difference(
    weights: Path,
) -> None:
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(8, 1, 16, 16, generator=gen) * 2 - 1
    fid = gan_fid.FrechetInception(weights, real, torch.device("cpu"), batch=4)
    same = fid.score(real)
    alike = fid.score(torch.rand(8, 1, 16, 16, generator=gen) * 2 - 1)
    unlike = fid.score(-1 + 0.01 * torch.rand(8, 1, 16, 16, generator=gen))
    assert abs(same) < 1e-3
    assert 0 < alike < unlike
    assert fid.score(real) == pytest.approx(same, abs=1e-3)  # the real side is kept


@needs_extra
def test_the_gan_example_writes_fid_every_epoch(weights: Path, tmp_path: Path) -> None:
    argv = [*TINY, "--num-epochs", "1", "--num-test", "8", "--fd-dims", "4"]
    (result,) = dcgan_kfac.main([*argv, "--fid-weights", str(weights), "--out", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [m["fid"] is not None for m in metrics] == [True, True]
    assert all(m["fid_real"] == metrics[0]["fid_real"] is not None for m in metrics)
    assert (tmp_path / "fid.png").is_file()
    assert result.final["fid"] == metrics[-1]["fid"]
