"""Smoke tests of ``examples/cnn.py`` at tiny sizes, and of the ResNet option's statistics."""

from __future__ import annotations

import copy
import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from curvlib.optim.defaults import DEFAULTS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import cnn  # noqa: E402
import common  # noqa: E402

# BatchNorm layers take plain SGD steps under KFAC; the scripts warn about it once.
pytestmark = [
    pytest.mark.filterwarnings("ignore:These trainable modules have no curvature block"),
    pytest.mark.usefixtures("one_thread"),
]

TINY = [
    "--num-train", "120", "--num-test", "40", "--batch-size", "40", "--num-epochs", "2",
    "--t-cov", "1", "--t-inv", "3", "--no-progress",
]  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cnn")
    cnn.main([*TINY, "--optim", "kfac", "--out", str(out)])
    return out


def test_run_writes_accuracy_metrics_plots_and_telemetry(straight: Path) -> None:
    with (straight / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert list(rows[0]) == list(common.METRIC_FIELDS)
    history = json.loads((straight / "metrics.json").read_text())
    for row in history:
        assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["train_accuracy"] <= 1.0
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    last = history[-1]
    # Six statistics updates of half of 40 images: the damping is still warming up.
    assert 0.0 < last["kl_clip_factor_last"] <= 1.0
    assert last["damping_last"] == pytest.approx(DEFAULTS.damping.at(6 * 20))
    assert last["inverse_failures"] == 0 and last["skipped_steps"] == 0
    assert last["time_inverse"] > 0.0
    steps = json.loads((straight / "telemetry.json").read_text())
    assert [s["step"] for s in steps] == list(range(1, 7))  # 3 batches x 2 epochs
    assert last["kl_clip_factor_last"] == pytest.approx(steps[-1]["kl_clip_factor"])
    mean_nu = sum(s["kl_clip_factor"] for s in steps[3:]) / 3
    assert last["kl_clip_factor"] == pytest.approx(mean_nu)
    for name in ("loss.png", "telemetry.png"):
        assert (straight / name).read_bytes()[:8] == PNG
    assert (straight / common.CHECKPOINT).is_file()


def test_resume_keeps_the_history_and_the_telemetry(straight: Path, tmp_path: Path) -> None:
    cnn.main([*TINY, "--optim", "kfac", "--num-epochs", "1", "--out", str(tmp_path)])
    cnn.main([*TINY, "--optim", "kfac", "--resume", "--out", str(tmp_path)])
    resumed = json.loads((tmp_path / "metrics.json").read_text())
    whole = json.loads((straight / "metrics.json").read_text())
    assert [r["epoch"] for r in resumed] == [0, 1, 2]
    for key in ("train_loss", "test_accuracy", "kl_clip_factor"):
        assert resumed[2][key] == whole[2][key], key
    steps = json.loads((tmp_path / "telemetry.json").read_text())
    assert [s["step"] for s in steps] == list(range(1, 7))


def test_compare_writes_the_accuracy_plot(tmp_path: Path) -> None:
    cnn.main([*TINY, "--num-epochs", "1", "--compare", "sgd,adam", "--out", str(tmp_path)])
    assert (tmp_path / "compare_accuracy.png").read_bytes()[:8] == PNG
    assert not (tmp_path / "adam" / "telemetry.png").exists()  # no curvature telemetry
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["label"] for s in summary] == ["sgd", "adam"]


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_small_resnet_trains(tmp_path: Path, fisher: str) -> None:
    results = cnn.main(
        [*TINY, "--model", "resnet-small", "--num-epochs", "1", "--fisher", fisher,
         "--out", str(tmp_path)]
    )  # fmt: skip
    final = results[0].final
    assert final["inverse_failures"] == 0
    # One epoch of three steps hardly moves the synthetic loss; ten steps on one
    # batch of the same network must cut it by at least 30%.
    torch.manual_seed(0)
    model = cnn.resnet_small(3, 10, widths=(4, 8))
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
    loss_fn = nn.CrossEntropyLoss()
    config = common.OptimConfig(lr=0.1, fisher=fisher, t_cov=1, t_inv=3)
    opt = common.build_optimizer("kfac", model, loss_fn, config)
    with torch.no_grad():
        before = float(loss_fn(model(x), y))
    for _ in range(10):
        common.step_optimizer(opt, lambda: loss_fn(model(x), y))
    with torch.no_grad():
        after = float(loss_fn(model(x), y))
    assert after < 0.7 * before, (before, after)


def _clean_block_resnet(model: nn.Sequential) -> nn.Sequential:
    """The same network with a fresh ReLU per use and out-of-place residual adds."""
    from torchvision.models.resnet import BasicBlock

    class Clean(nn.Module):
        def __init__(self, block: BasicBlock) -> None:
            super().__init__()
            self.conv1, self.bn1, self.conv2, self.bn2 = (
                block.conv1, block.bn1, block.conv2, block.bn2,
            )  # fmt: skip
            self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
            self.downsample = block.downsample

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
            identity = x if self.downsample is None else self.downsample(x)
            return self.relu2(out + identity)

    clean = copy.deepcopy(model)
    for i, m in enumerate(clean):
        if isinstance(m, BasicBlock):
            clean[i] = Clean(m)
        elif isinstance(m, nn.ReLU):
            clean[i] = nn.ReLU()
    return clean


def test_torchvision_blocks_give_the_statistics_of_a_clean_network() -> None:
    """Reused in-place ReLUs do not change what curvlib measures.

    Two KFAC steps of torchvision's blocks equal those of the same network written
    with one ReLU per use and out-of-place residual adds.
    """
    torch.manual_seed(0)
    model = cnn.resnet_small(3, 10, widths=(4, 8))
    clean = _clean_block_resnet(model)
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    loss_fn = nn.CrossEntropyLoss()
    config = common.OptimConfig(lr=0.1, fisher="mc", t_cov=1, t_inv=1, clipping=0.0)
    for net in (model, clean):
        opt = common.build_optimizer("kfac", net, loss_fn, config)
        for _ in range(2):
            common.step_optimizer(opt, lambda net=net: loss_fn(net(x), y))
    params = dict(model.named_parameters())
    clean_params = dict(clean.named_parameters())
    assert len(params) == len(clean_params)
    for (name, p), q in zip(params.items(), clean_params.values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_torchvision_resnet18_takes_a_kfac_step() -> None:
    """Torchvision's own ResNet-18 (its first stage and head preconditioned, for speed)."""
    torch.manual_seed(0)
    model = cnn.resnet18(1, 10)
    loss_fn = nn.CrossEntropyLoss()
    config = common.OptimConfig(lr=0.1, t_cov=1)
    opt = common.build_optimizer("kfac", model, loss_fn, config, include=["layer1.*", "fc"])
    names = [layer.name for layer in opt.layers]  # type: ignore[attr-defined]
    assert "layer1.1.conv2" in names and "fc" in names and "layer2.0.conv1" not in names
    before = model.layer1[0].conv1.weight.detach().clone()
    x, y = torch.rand(2, 1, 32, 32), torch.tensor([1, 2])
    common.step_optimizer(opt, lambda: loss_fn(model(x), y))
    assert not torch.equal(model.layer1[0].conv1.weight, before)
    assert 0.0 < opt.last_stats["kl_clip_factor"] <= 1.0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "curves"], "invalid choice: 'curves'"),
        (["--model", "vgg"], "choose from 'kpsvd-cnn', 'cuda-convnet', 'toy-cnn'"),
        (["--optim", "newton"], "invalid optimizer 'newton'"),
    ],
)
def test_bad_values_are_rejected_with_the_choices(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cnn.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_per_sample_approximations_on_a_batchnorm_network_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cnn.main([*TINY, "--model", "resnet-small", "--optim", "kpsvd", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "--optim kpsvd: KPSVD needs per-sample statistics" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


def test_kpsvd_cnn_shapes() -> None:
    for channels, side in ((1, 28), (3, 32)):
        net = cnn.kpsvd_cnn(channels, side, 10)
        assert net(torch.zeros(2, channels, side, side)).shape == (2, 10)
        convs = [m for m in net if isinstance(m, nn.Conv2d)]
        assert [c.out_channels for c in convs] == [32, 32, 64]
