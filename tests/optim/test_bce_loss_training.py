"""KFAC trains a sigmoid autoencoder with ``BCELoss`` on probabilities (the papers' set-up)."""

from __future__ import annotations

import torch
from torch import nn

from curvlib.approx.kfac import KFAC
from curvlib.core import FisherType
from curvlib.wiring import PreconditionedOptimizer


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


def test_kfac_with_bce_loss_decreases_the_loss() -> None:
    x, loss_fn = _images(), nn.BCELoss()
    for fisher in (FisherType.MC, FisherType.EXACT):
        torch.manual_seed(0)
        model = _autoencoder()
        opt = PreconditionedOptimizer(model, KFAC(), loss_fn=loss_fn, fisher_type=fisher)
        losses = []
        for _ in range(40):
            opt.zero_grad()
            with opt.record():
                loss = loss_fn(model(x), x)
                loss.backward()
            opt.step()
            losses.append(loss.item())
        assert opt.skipped_steps == 0
        assert all(torch.isfinite(torch.tensor(losses)))
        assert losses[-1] < 0.75 * losses[0], f"{fisher}: {losses[0]:.4f} -> {losses[-1]:.4f}"
