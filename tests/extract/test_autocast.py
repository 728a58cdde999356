"""Forward passes under ``torch.autocast``: statistics in the parameters' dtype, any backend.

Autocast runs the layers in float16 or bfloat16 while the parameters stay float32.
The statistics are formed from the layers' inputs and output gradients cast up to
float32 (Cholesky and eigendecompositions have no half-precision CPU kernels), and
``Backend.AUTO`` takes autograd, since BackPACK cannot follow such a graph. CPU
autocast runs both dtypes, so these run in CI.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from curvlib import (
    EKFAC,
    KFAC,
    KPSVD,
    Backend,
    CurvatureExtractor,
    Deflation,
    Diagonal,
    ExactNaturalGradient,
    FisherType,
    PreconditionedOptimizer,
    StatKind,
    TwoLevel,
)

DTYPES = [torch.bfloat16, torch.float16]
APPROXIMATIONS: dict[str, Callable[[], Any]] = {
    "kfac": KFAC,
    "ekfac": EKFAC,
    "kpsvd": KPSVD,
    "deflation": Deflation,
    "diagonal": Diagonal,
    "exact-ng": ExactNaturalGradient,
    "two-level": lambda: TwoLevel(KFAC()),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _batch() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(32, 1, 8, 8, generator=gen), torch.randint(0, 10, (32,), generator=gen)


@pytest.mark.parametrize("fisher", list(FisherType), ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("make", APPROXIMATIONS.values(), ids=list(APPROXIMATIONS))
def test_every_approximation_trains_under_autocast(
    make: Callable[[], Any], dtype: torch.dtype, fisher: FisherType
) -> None:
    net, loss_fn = _model(), nn.CrossEntropyLoss()
    x, y = _batch()
    opt = PreconditionedOptimizer(net, make(), loss_fn=loss_fn, fisher_type=fisher)
    with torch.no_grad():
        before = float(loss_fn(net(x), y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no skipped update, no failed inverse
        for _ in range(4):
            opt.zero_grad()
            with opt.record():
                with torch.autocast("cpu", dtype=dtype):
                    loss = loss_fn(net(x), y)
                loss.backward()
            opt.step()
    with torch.no_grad():
        after = float(loss_fn(net(x), y))
    assert after < before, (before, after)
    assert opt.last_stats["skipped_updates"] == 0 and opt.last_stats["inverse_failures"] == 0


def _statistics(backend: Backend, dtype: torch.dtype | None) -> dict[str, Any]:
    net, loss_fn = _model(), nn.CrossEntropyLoss()
    x, y = _batch()
    extractor = CurvatureExtractor(
        net,
        loss_fn,
        stats={StatKind.KRONECKER, StatKind.PER_SAMPLE_IO},
        fisher_type=FisherType.EXACT,
        backend=backend,
    )
    with extractor.collect():
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = loss_fn(net(x), y)
        loss.backward()
    return dict(extractor.statistics().layers)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_statistics_under_autocast_are_float32_and_near_those_of_float32(
    dtype: torch.dtype,
) -> None:
    exact, cast = _statistics(Backend.AUTO, None), _statistics(Backend.AUTO, dtype)
    # 8 (bfloat16) or 11 (float16) mantissa bits in the activations and their gradients.
    rtol = 3e-2 if dtype is torch.bfloat16 else 4e-3
    for name, layer in cast.items():
        reference = exact[name]
        assert layer.kronecker is not None and reference.kronecker is not None
        assert layer.io is not None and reference.io is not None
        for mine, theirs in [
            (layer.kronecker.A, reference.kronecker.A),
            (layer.kronecker.G, reference.kronecker.G),
            (layer.io.inputs, reference.io.inputs),
        ]:
            assert mine.dtype == torch.float32, name
            atol = rtol * float(theirs.abs().max())
            torch.testing.assert_close(mine, theirs, rtol=rtol, atol=atol)


def test_auto_takes_autograd_under_autocast_and_backpack_refuses_it() -> None:
    auto = _statistics(Backend.AUTO, torch.bfloat16)
    autograd = _statistics(Backend.AUTOGRAD, torch.bfloat16)
    for name, layer in auto.items():
        assert layer.kronecker is not None and autograd[name].kronecker is not None
        assert torch.equal(layer.kronecker.G, autograd[name].kronecker.G), name
    with pytest.raises(RuntimeError, match="BackPACK cannot backpropagate through a forward"):
        _statistics(Backend.BACKPACK, torch.bfloat16)
    # Without autocast, AUTO keeps BackPACK for the exact Fisher: the same statistics.
    plain, backpack = _statistics(Backend.AUTO, None), _statistics(Backend.BACKPACK, None)
    for name, layer in plain.items():
        assert layer.kronecker is not None and backpack[name].kronecker is not None
        assert torch.equal(layer.kronecker.G, backpack[name].kronecker.G), name


@pytest.mark.parametrize("fisher", list(FisherType), ids=lambda f: f.name)
def test_float16_autocast_with_a_grad_scaler_trains(fisher: FisherType) -> None:
    net, loss_fn = _model(), nn.CrossEntropyLoss()
    x, y = _batch()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = PreconditionedOptimizer(
        net, KFAC(), loss_fn=loss_fn, fisher_type=fisher, grad_scaler=scaler
    )
    with torch.no_grad():
        before = float(loss_fn(net(x), y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(4):
            opt.zero_grad()
            with opt.record():
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = loss_fn(net(x), y)
                scaler.scale(loss).backward()
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
    with torch.no_grad():
        after = float(loss_fn(net(x), y))
    assert after < before and opt.last_stats["step"] == 4
