"""Inverses built in the background and installed some steps later (``overlap_inverse``).

The schedule alone decides which inverse a step uses: the one started at the
last rebuild, from the estimate and damping of that step, once ``overlap_inverse``
steps have passed or the next rebuild comes. These tests check that against
inverses built directly from those estimates, and that a run is reproducible,
resumes exactly from a checkpoint and refuses what it cannot do.
"""

from __future__ import annotations

import io
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
    Diagonal,
    NaturalGradientPreconditioner,
    PreconditionedOptimizer,
)
from curvlib.approx.natural_gradient import ExactNaturalGradient

STEPS = 32  # rebuilds at 0, 1, 2, 4, 8 (warm-up), 10, 20, 30


def _data(k: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(48, 6, dtype=torch.float64, generator=gen)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _optimizer(
    model: nn.Module, approx: Any = None, **kwargs: Any
) -> tuple[PreconditionedOptimizer, Callable[[int], float]]:
    loss_fn = nn.CrossEntropyLoss()
    opt = PreconditionedOptimizer(
        model, KFAC() if approx is None else approx, loss_fn=loss_fn, **kwargs
    )

    def step(k: int) -> float:
        x, y = _data(k)
        opt.zero_grad()
        with opt.record():
            loss = loss_fn(model(x), y)
            loss.backward()
        opt.step()
        return float(loss.detach())

    return opt, step


def _apply(precond: Any, like: Tensor) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(7)
    shapes = {"0": (16, 7), "2": (3, 17)}
    return precond.apply(
        {n: torch.randn(*s, dtype=like.dtype, generator=gen) for n, s in shapes.items()}
    )


# The warm-up's rebuilds (0, 1, 2, 4, 8) are built at once; the others (t_inv = 10) start a
# build at 10, 20, 30, installed ``overlap_inverse`` steps later or at the next rebuild,
# whichever comes first.
INSTALLED = {10: [0, 1, 2, 4, 8, 20, 30], 3: [0, 1, 2, 4, 8, 13, 23]}


@pytest.mark.parametrize("overlap", list(INSTALLED), ids=lambda n: f"overlap={n}")
@pytest.mark.parametrize("deferred", [False, True], ids=["host-checks", "deferred-checks"])
@pytest.mark.parametrize("make", [KFAC, KPSVD, Diagonal], ids=lambda m: m.__name__)
def test_each_inverse_is_the_one_started_at_the_rebuild_before(
    make: Callable[[], Any], deferred: bool, overlap: int
) -> None:
    model = _model()
    opt, step = _optimizer(model, make(), overlap_inverse=overlap, deferred_checks=deferred)
    engine, like = opt.engine, next(model.parameters())
    started: tuple[Any, float] | None = None
    rebuilds, launched = [], []
    for k in range(STEPS):
        step(k)
        if engine.inverse_rebuilt:
            rebuilds.append(k)
            live = _apply(engine._precond, like)
            if k < 10:  # the warm-up's inverses are built at once, from this step's estimate
                expected = _apply(engine.approx.inverse(engine._precond_damping), like)
            else:
                assert started is not None
                source, damping = started
                assert engine._precond_damping == damping
                expected = _apply(source.inverse(damping), like)
            for name in live:
                torch.testing.assert_close(live[name], expected[name], rtol=1e-12, atol=0)
            assert set(opt.last_stats["condition_numbers"]) == {"0", "2"}
        building = engine._building
        if building is not None and building.step == k:
            launched.append(k)
            started = (building.source, building.damping)
    assert launched == [10, 20, 30]
    assert rebuilds == INSTALLED[overlap]
    assert engine.inverse_failures == 0 and opt.skipped_steps == 0


def test_a_warm_up_rebuild_drops_the_older_build() -> None:
    model = _model()
    opt, step = _optimizer(model, overlap_inverse=10, warmup=64)
    engine, like = opt.engine, next(model.parameters())
    for k in range(11):
        step(k)
    assert engine._building is not None and engine._building.step == 10
    for k in range(11, 17):  # step 16 is a warm-up rebuild: built at once
        step(k)
    assert engine._building is None and engine.inverse_rebuilt
    expected = _apply(engine.approx.inverse(engine._precond_damping), like)
    live = _apply(engine._precond, like)
    assert all(torch.equal(live[name], expected[name]) for name in live)
    rebuilt = []
    for k in range(17, 20):
        step(k)
        rebuilt.append(engine.inverse_rebuilt)
    assert rebuilt == [False, False, False]


def test_the_overlapped_inverse_is_stale_and_not_the_fresh_one() -> None:
    model = _model()
    opt, step = _optimizer(model, overlap_inverse=10)
    for k in range(21):
        step(k)
    engine, like = opt.engine, next(model.parameters())
    fresh = _apply(engine.approx.inverse(engine.damping), like)
    live = _apply(engine._precond, like)
    assert not torch.allclose(live["0"], fresh["0"], rtol=1e-6)


def test_a_run_with_overlapped_inverses_is_reproducible_and_trains() -> None:
    runs = []
    for _ in range(2):
        model = _model()
        _, step = _optimizer(model, overlap_inverse=10)
        losses = [step(k) for k in range(60)]
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    (losses, params), (_, again) = runs
    assert all(map(torch.equal, params, again))
    model = _model()
    _, step = _optimizer(model)
    plain = [step(k) for k in range(60)]
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert sum(losses[-10:]) < 1.5 * sum(plain[-10:])


def test_a_checkpoint_with_an_inverse_being_built_resumes_exactly() -> None:
    model = _model()
    opt, step = _optimizer(model, overlap_inverse=10)
    for k in range(25):  # the inverse started at step 20 is used from step 30 on
        step(k)
    assert opt.engine._building is not None
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for k in range(25, 40):
        step(k)
    expected = [p.detach().clone() for p in model.parameters()]

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model = _model()
    model.load_state_dict(saved["model"])
    resumed, step = _optimizer(model, overlap_inverse=10)
    resumed.load_state_dict(saved["opt"])
    assert resumed.engine._building is not None and resumed.engine._building.step == 20
    for k in range(25, 40):
        step(k)
    for got, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=0)


def test_a_build_that_fails_keeps_the_last_good_inverse_with_a_warning() -> None:
    model = _model()
    approx = KFAC()
    opt, step = _optimizer(model, approx, overlap_inverse=10)
    for k in range(15):
        step(k)
    live = opt.engine._precond

    def broken(damping: float) -> None:
        raise RuntimeError("planted failure")

    approx.inverse_ahead = broken  # type: ignore[method-assign]  # the build at step 20
    for k in range(15, 21):
        step(k)
    with pytest.warns(RuntimeWarning, match="started at step 20 failed .planted failure"):
        for k in range(21, 31):
            step(k)
    assert opt.engine.inverse_failures == 1
    assert opt.engine._precond is not live  # step 30 failed: the one from step 10 stays
    assert opt.skipped_steps == 0


def test_preconditioner_mode_overlaps_its_inverses_too() -> None:
    model = _model()
    loss_fn = nn.CrossEntropyLoss()
    precond = NaturalGradientPreconditioner(model, KFAC(), loss_fn=loss_fn, overlap_inverse=10)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for k in range(40):
        x, y = _data(k)
        sgd.zero_grad()
        with precond.record():
            loss = loss_fn(model(x), y)
            loss.backward()
        precond.step()
        sgd.step()
        losses.append(float(loss.detach()))
    assert precond.engine._building is not None and precond.engine._building.step == 30
    assert sum(losses[-10:]) < sum(losses[:10])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (EKFAC, "rebuilds its cheap inverse after every update"),
        (ExactNaturalGradient, "frozen copy of the estimate"),
    ],
    ids=["EKFAC", "ExactNaturalGradient"],
)
def test_overlap_refuses_what_it_cannot_overlap(make: Callable[[], Any], message: str) -> None:
    with warnings.catch_warnings(), pytest.raises(ValueError, match=message):
        warnings.simplefilter("ignore")
        _optimizer(_model(), make(), overlap_inverse=10)


@pytest.mark.parametrize(
    ("value", "error"), [(True, TypeError), ("3", TypeError), (-1, ValueError)]
)
def test_overlap_must_be_a_number_of_steps(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="overlap_inverse must be"):
        _optimizer(_model(), overlap_inverse=value)


def test_overlap_refuses_data_parallel_training() -> None:
    from curvlib.optim.overlap import check_overlap

    with pytest.raises(ValueError, match="split over the ranks"):
        check_overlap(3, KFAC(), sync=object())  # type: ignore[arg-type]
    check_overlap(0, KFAC(), sync=object())  # type: ignore[arg-type]  # off: nothing to refuse
