"""Inverses built ahead of their checks: the same steps, one read less, a safe fallback.

With deferred checks the optimizer builds a rebuilt inverse without reading its
checks (``LayerwiseApprox.inverse_ahead``) and reads them with the directions'
measurements (``CurvatureEngine.pending_inverse`` / ``settle_inverse``). These
tests compare such runs with runs whose approximation builds no inverse ahead:
they must agree to the bit, and an inverse that fails its check must never move
a parameter.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from curvlib import EKFAC, KFAC, KPSVD, Diagonal, PreconditionedOptimizer
from curvlib.approx.base import AheadInverse, BlockDiagonalPreconditioner

STEPS = 23  # statistics and inverses at 0, 1, 2, 4, 8, 10, 20 (warm-up, then t_cov = 10)


def _run(
    make: Callable[[], Any],
    *,
    ahead: Callable[[Any], Any] | None = None,
    steps: int = STEPS,
    **kwargs: Any,
) -> tuple[list[Tensor], PreconditionedOptimizer, list[dict[str, float]]]:
    """Train with deferred checks; ``ahead`` replaces the approximation's ``inverse_ahead``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    approx = make()
    if ahead is not None:
        approx.inverse_ahead = ahead(approx)
    opt = PreconditionedOptimizer(model, approx, loss_fn=loss_fn, deferred_checks=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    conditions = []
    for _ in range(steps):
        x = torch.randn(40, 6, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 3, (40,), generator=gen)
        opt.zero_grad()
        with opt.record():
            loss_fn(model(x), y).backward()
        opt.step()
        conditions.append(dict(opt.last_stats["condition_numbers"]))
    return [p.detach().clone() for p in model.parameters()], opt, conditions


def _none(approx: Any) -> Callable[[float], None]:
    return lambda damping: None


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("make", [KFAC, EKFAC, KPSVD, Diagonal], ids=lambda m: m.__name__)
def test_a_run_with_inverses_built_ahead_equals_one_without(
    make: Callable[[], Any], momentum: float
) -> None:
    params, opt, conditions = _run(make, momentum=momentum)
    expected, _, expected_conditions = _run(make, ahead=_none, momentum=momentum)
    assert all(map(torch.equal, params, expected))
    assert conditions == expected_conditions
    assert conditions[20] and all(math.isfinite(v) for v in conditions[20].values())
    assert all(engine.pending_inverse is None for engine in opt.engines)


def _nan(mat: Tensor) -> Tensor:
    return torch.full_like(mat, math.nan)


def _failing(approx: Any) -> Callable[[float], AheadInverse | None]:
    """An ``inverse_ahead`` whose preconditioner returns NaN and whose check fails."""
    real = approx.inverse_ahead

    def ahead(damping: float) -> AheadInverse | None:
        built = real(damping)
        if built is None:
            return None
        names = built.preconditioner.layers
        broken = BlockDiagonalPreconditioner(
            {n: lambda m: torch.full_like(m, math.nan) for n in names}
        )
        return AheadInverse(broken, built.numbers, lambda values: False)

    return ahead


@pytest.mark.parametrize("make", [KFAC, EKFAC], ids=lambda m: m.__name__)
def test_an_inverse_that_fails_its_check_is_rebuilt_before_anything_moves(
    make: Callable[[], Any],
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no step is skipped
        params, opt, conditions = _run(make, ahead=_failing, momentum=0.9)
    expected, _, expected_conditions = _run(make, ahead=_none, momentum=0.9)
    assert all(map(torch.equal, params, expected))
    assert conditions == expected_conditions
    assert opt.engine.inverse_failures == 0  # the checked path built it: not a failure
    assert opt.skipped_steps == 0


def test_an_inverse_whose_check_was_never_read_is_checked_before_the_next_one() -> None:
    _, opt, _ = _run(KFAC, steps=3)
    engine = opt.engine
    engine._invert(ahead=True)  # as if a step had stopped between building and measuring
    assert engine.pending_inverse is not None and engine.condition_numbers == {}
    engine.prepare()
    assert engine.pending_inverse is None
    assert set(engine.condition_numbers) == {"0", "2"}
