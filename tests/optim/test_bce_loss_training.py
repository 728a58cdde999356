"""KFAC trains a sigmoid autoencoder with ``BCELoss`` on probabilities (the papers' set-up)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from curvlib.approx.kfac import KFAC
from curvlib.core import FisherType
from curvlib.wiring import PreconditionedOptimizer
from tests.hyper import train_steps


def _autoencoder() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3), nn.Linear(3, 8), nn.Tanh(),
        nn.Linear(8, 16), nn.Sigmoid(),
    )  # fmt: skip


def _images() -> torch.Tensor:
    """64 images of 16 pixels in [0, 1] on a three-dimensional manifold."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randn(64, 3, generator=gen)
    return torch.sigmoid(2.0 * codes @ torch.randn(3, 16, generator=gen))


@pytest.mark.parametrize("fisher", [FisherType.MC, FisherType.EXACT], ids=lambda f: f.value)
def test_kfac_with_bce_loss_decreases_the_loss(fisher: FisherType) -> None:
    x, loss_fn = _images(), nn.BCELoss()
    torch.manual_seed(0)
    model = _autoencoder()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=loss_fn, fisher_type=fisher)
    losses = train_steps(opt, model, loss_fn, itertools.repeat((x, x), 40))
    assert opt.skipped_steps == 0
    assert all(torch.isfinite(torch.tensor(losses)))
    # From 0.71 to 0.43 at the time of writing; the targets' own entropy is the floor.
    assert losses[-1] < 0.75 * losses[0], f"{losses[0]:.4f} -> {losses[-1]:.4f}"
