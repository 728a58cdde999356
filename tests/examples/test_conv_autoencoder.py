"""Smoke tests of ``examples/conv_autoencoder.py``: every optimizer, files, resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import common  # noqa: E402
import conv_autoencoder  # noqa: E402

TINY = [
    "--num-train", "100", "--num-test", "20", "--batch-size", "25", "--num-epochs", "2",
    "--code", "4", "--no-progress",
]  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_run_writes_its_files_and_the_loss_falls(tmp_path: Path) -> None:
    results = conv_autoencoder.main([*TINY, "--optim", "kfac", "--out", str(tmp_path)])
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert [m["epoch"] for m in history] == [0, 1, 2]
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert history[-1]["test_accuracy"] is None  # not a classifier
    for name in ("loss.png", "telemetry.png", "reconstructions.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG, name
    assert results[0].final == history[-1]
    conv_autoencoder.main([*TINY, "--optim", "kfac", "--num-epochs", "3", "--resume",
                           "--out", str(tmp_path)])  # fmt: skip
    resumed = json.loads((tmp_path / "metrics.json").read_text())
    assert resumed[:3] == history and resumed[3]["epoch"] == 3


def excess_bce(logits: torch.Tensor, x: torch.Tensor) -> float:
    """The BCE of a reconstruction above its floor, the entropy of the soft targets ``x``."""
    entropy = -(x * x.log() + (1 - x) * (1 - x).log()).mean()
    return float(nn.functional.binary_cross_entropy_with_logits(logits, x) - entropy)


LEARNING_RATES = {"sgd": 1.0}
"""Plain SGD needs a larger step than the default 1e-2 to move in six steps."""


@pytest.mark.parametrize("name", list(common.OPTIMIZERS))
def test_every_optimizer_trains_the_transposed_conv_decoder(name: str) -> None:
    torch.manual_seed(0)
    model = conv_autoencoder.conv_autoencoder(1, 8, code=3)
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in model) == 2
    loss_fn = nn.BCEWithLogitsLoss()
    # Six steps on one batch of six see 12 samples in all: a fixed damping instead of
    # the warm-up, which would hold it at 400/12 times the default for all six.
    config = common.OptimConfig(
        lr=LEARNING_RATES.get(name, 1e-2), t_cov=1, damping=1e-3, damping_warmup_samples=0
    )
    opt = common.build_optimizer(name, model, loss_fn, config)
    x = torch.rand(6, 1, 8, 8)
    decoder = model[-1].weight.detach().clone()
    with torch.no_grad():
        before = excess_bce(model(x), x)
    for _ in range(6):
        common.step_optimizer(opt, lambda: loss_fn(model(x), x))
    with torch.no_grad():
        after = excess_bce(model(x), x)
    # Six small steps on one batch: the loss above its floor falls by at least 1%.
    assert after < 0.99 * before, (before, after)
    assert not torch.equal(model[-1].weight, decoder)
    if common.OPTIMIZERS[name].curvature:
        names = [layer.name for layer in opt.layers]  # type: ignore[attr-defined]
        assert str(len(model) - 1) in names  # the last ConvTranspose2d is preconditioned
        assert 0.0 < opt.last_stats["kl_clip_factor"] <= 1.0  # type: ignore[attr-defined]


def test_image_side_must_be_a_multiple_of_four() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        conv_autoencoder.conv_autoencoder(1, 30)
