"""Optimizer settings the tests state explicitly, and their shared training loop.

The library defaults (``curvlib.optim.defaults.DEFAULTS``, ``DEFAULT_DECAY``) are
chosen for speed on the convergence benchmark and may change; a test whose
assertions hold only for a particular setting passes it explicitly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from curvlib.optim import CurvatureOptimizer

FRESH: dict[str, Any] = {"t_cov": 1, "t_inv": 1, "stats_fraction": 1.0}
"""Statistics of the whole batch and a new inverse on every step."""

PER_STEP: dict[str, Any] = {**FRESH, "momentum": 0.0}
"""``FRESH`` without momentum: every step is the plain preconditioned step of its batch."""


def train_steps(
    opt: CurvatureOptimizer,
    model: nn.Module,
    loss_fn: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    closure: bool = False,
) -> list[float]:
    """One recorded step per batch; the losses before each step.

    ``closure=True`` passes the batch's loss as the closure (Levenberg–Marquardt).
    """
    losses = []
    for x, y in batches:
        opt.zero_grad()
        with opt.record():
            loss = loss_fn(model(x), y)
            loss.backward()
        opt.step((lambda: loss_fn(model(x), y)) if closure else None)  # noqa: B023
        losses.append(loss.item())
    return losses
