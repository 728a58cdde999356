"""opt.last_stats and on_step: clip factor, LM damping, time split, counters, conditions."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import pytest
import torch
from torch import nn

from curvlib.approx.kfac import KFAC, KFACDamping
from curvlib.optim import LevenbergMarquardt
from curvlib.wiring import PreconditionedOptimizer
from tests import problems as P
from tests.hyper import PER_STEP
from tests.optim.identity import ZeroCurvature

DTYPE = torch.float64
ALWAYS = {
    "step", "skipped", "kl_clip_factor", "damping", "group_damping", "lm_ratio",
    "inverse_rebuilt", "condition_numbers", "diagnostics", "skipped_steps", "skipped_updates",
    "inverse_failures", "time_step", "time_precondition",
}  # fmt: skip


def _step(opt, model, loss_fn, x, y, closure: bool = False):  # type: ignore[no-untyped-def]
    opt.zero_grad()
    with opt.record():
        loss = loss_fn(model(x), y)
        loss.backward()
    opt.step((lambda: loss_fn(model(x), y)) if closure else None)
    return loss.item()


def _matrices(opt) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {la.name: la.to_matrix(*(p.detach().clone() for p in la.parameters))
            for la in opt.layers}  # fmt: skip


def _damped(approx, name: str, damping: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    dense = approx.to_dense(name).to(DTYPE)
    return dense + damping * torch.eye(dense.shape[0], dtype=DTYPE)


@pytest.mark.parametrize(
    "settings",
    [
        PER_STEP,  # a new inverse on every step, no momentum: the clip of the direction
        # The clip of the heavy-ball step mu b + Delta (docs/optimizer.md, "Learning rate and
        # KL clip"); one inverse throughout, so that the tracked buffer norm is exact.
        {"t_cov": 100, "t_inv": 100, "warmup": 0, "momentum": 0.5},
    ],
    ids=["per-step", "momentum"],
)
def test_clip_factor_equals_the_independent_clip_with_per_group_lr(
    settings: dict[str, Any],
) -> None:
    problem = P.mlp_ce(n=16)
    model = problem.model()
    clip, momentum = 1e-4, settings["momentum"]
    opt = PreconditionedOptimizer(
        model, KFAC(KFACDamping.EIGEN), loss_fn=problem.loss_fn, lr=0.7, kl_clip=clip,
        damping=1e-2, fisher_type="exact", groups=[{"layers": ["4"], "lr": 0.2, "damping": 0.1}],
        **settings,
    )  # fmt: skip
    lrs = {"0": 0.7, "2": 0.7, "4": 0.2}
    engine_of = {"0": opt.engines[0], "2": opt.engines[0], "4": opt.engines[1]}
    damping_of = {"0": 1e-2, "2": 1e-2, "4": 0.1}
    buffers = {name: torch.zeros(()) for name in lrs}  # the clipped buffers b, as [W | b]
    for _ in range(3):
        before = _matrices(opt)
        _step(opt, model, problem.loss_fn, problem.x, problem.y)
        after = _matrices(opt)
        denom, steps = 0.0, {}
        for layer in opt.layers:
            grad = layer.grad_matrix()
            damped = _damped(engine_of[layer.name].approx, layer.name, damping_of[layer.name])
            direction = torch.linalg.solve(damped, grad.flatten()).reshape(grad.shape)
            step = momentum * buffers[layer.name] + direction
            steps[layer.name] = step
            denom += lrs[layer.name] ** 2 * float(step.flatten() @ damped @ step.flatten())
        nu = min(1.0, math.sqrt(clip / denom))
        assert nu < 1.0
        assert opt.last_stats["kl_clip_factor"] == pytest.approx(nu, rel=1e-9)
        for name, step in steps.items():  # the applied step is -lr * nu * (mu b + direction)
            torch.testing.assert_close(after[name] - before[name], -lrs[name] * nu * step)
            buffers[name] = nu * step


def test_damping_follows_the_levenberg_marquardt_rule() -> None:
    problem = P.mlp_ce(n=32)
    model = problem.model()
    lm = LevenbergMarquardt(initial=1e-2, interval=1)
    opt = PreconditionedOptimizer(
        model, KFAC(KFACDamping.EIGEN), loss_fn=problem.loss_fn, lr=0.05, damping=lm,
        kl_clip=None, max_move=None, fisher_type="exact", **PER_STEP,
        groups=[{"layers": ["4"], "damping": 0.3}],
    )  # fmt: skip
    omega = lm.decay**lm.interval
    moves = set()
    for lr in (0.05, 0.05, 0.05, 1e3):
        for group in opt.param_groups:
            group["lr"] = lr
        old = opt.damping
        before = _matrices(opt)
        with torch.no_grad():
            loss_before = float(problem.loss_fn(model(problem.x), problem.y))
        _step(opt, model, problem.loss_fn, problem.x, problem.y, closure=True)
        with torch.no_grad():
            loss_after = float(problem.loss_fn(model(problem.x), problem.y))
        after = _matrices(opt)
        predicted = 0.0
        for layer in opt.layers:
            engine, damping = (opt.engines[1], 0.3) if layer.name == "4" else (opt.engines[0], old)
            delta, grad = (after[layer.name] - before[layer.name]).flatten(), layer.grad_matrix()
            curv = _damped(engine.approx, layer.name, damping) @ delta
            predicted += float(grad.flatten() @ delta) + 0.5 * float(delta @ curv)
        ratio = (loss_after - loss_before) / predicted if predicted < 0 else math.nan
        stats = opt.last_stats
        if math.isnan(ratio):
            assert math.isnan(stats["lm_ratio"])
        else:
            assert stats["lm_ratio"] == pytest.approx(ratio, rel=1e-6)
        if math.isnan(ratio) or ratio < 0.25:
            expected, move = old / omega, "up"
        elif ratio > 0.75:
            expected, move = old * omega, "down"
        else:
            expected, move = old, "same"
        moves.add(move)
        assert stats["damping"] == pytest.approx(expected, rel=1e-12)
        assert stats["group_damping"] == {"default": pytest.approx(expected), "group1": 0.3}
    assert {"up", "down"} <= moves


class _WithConditions:
    def __init__(self, inner: Any, numbers: dict[str, float]) -> None:
        self.inner, self.condition_numbers = inner, numbers

    def apply(self, grads: Any) -> Any:
        return self.inner.apply(grads)


class _Conditioned(KFAC):
    """KFAC whose preconditioner carries exact per-layer condition numbers."""

    def inverse(self, damping: float) -> Any:
        numbers = {name: float(torch.linalg.cond(_damped(self, name, damping)))
                   for name in self.blocks}  # fmt: skip
        return _WithConditions(super().inverse(damping), numbers)


def test_condition_numbers_are_reported_when_inverses_are_rebuilt() -> None:
    problem = P.mlp_ce(n=16)
    model = problem.model()
    approx = _Conditioned(KFACDamping.EIGEN)
    opt = PreconditionedOptimizer(model, approx, loss_fn=problem.loss_fn, damping=1e-2, t_inv=2,
                                  warmup=0, refresh_on_move=0, fisher_type="exact")  # fmt: skip
    for step in range(4):
        _step(opt, model, problem.loss_fn, problem.x, problem.y)
        stats = opt.last_stats
        assert set(stats) >= ALWAYS
        assert stats["inverse_rebuilt"] == (step % 2 == 0)
        assert ("time_inverse" in stats) == (step % 2 == 0)
        if step % 2 == 0:
            assert set(stats["condition_numbers"]) == {"0", "2", "4"}
            for name, value in stats["condition_numbers"].items():
                exact = float(torch.linalg.cond(_damped(approx, name, 1e-2)))
                assert value == pytest.approx(exact) and value > 1.0
        else:
            assert stats["condition_numbers"] == {}
    # A preconditioner without the attribute: no estimates, no error.
    model = problem.model()
    opt = PreconditionedOptimizer(model, ZeroCurvature(), loss_fn=problem.loss_fn)
    _step(opt, model, problem.loss_fn, problem.x, problem.y)
    assert opt.last_stats["inverse_rebuilt"] and opt.last_stats["condition_numbers"] == {}


def test_time_split_sums_to_the_step_time() -> None:
    """The parts nest inside ``time_step``, which nests inside the caller's own timing.

    The nesting holds exactly on every step. That the parts cover the step is a
    wall-clock claim: it is checked on the median step, so that a loaded machine
    that pauses the process between two parts of a few steps cannot fail it.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                          nn.Linear(128, 10))  # fmt: skip
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    opt = PreconditionedOptimizer(
        model, KFAC(), loss_fn=loss_fn, t_cov=2, t_inv=3, damping=LevenbergMarquardt(interval=2),
        groups=[{"layers": ["4"], "t_inv": 2, "damping": 1e-2}],
    )  # fmt: skip
    uncovered: list[float] = []
    seen: set[str] = set()
    for _ in range(12):
        opt.zero_grad()
        start = time.perf_counter()
        with opt.record():
            loss_fn(model(x), y).backward()
        opt.step(lambda: loss_fn(model(x), y))
        outside = time.perf_counter() - start
        stats = opt.last_stats
        split = {k: v for k, v in stats.items() if k.startswith("time_") and k != "time_step"}
        assert all(v >= 0.0 for v in split.values())
        seen |= set(split)
        parts = sum(split.values())
        assert parts <= stats["time_step"] + 1e-9, (split, stats["time_step"])
        assert stats["time_step"] <= outside + 1e-9, (stats["time_step"], outside)
        uncovered.append((outside - parts) / outside)
    assert seen == {"time_statistics", "time_forward_backward", "time_update", "time_inverse",
                    "time_precondition", "time_parameters", "time_closure"}  # fmt: skip
    assert statistics.median(uncovered) <= 0.1, uncovered


def test_callback_gets_the_same_dict_once_per_step_and_counters_add_up() -> None:
    problem = P.mlp_ce(n=8)
    model = problem.model()
    calls: list[dict[str, Any]] = []
    approx = ZeroCurvature()
    inverse = approx.inverse

    def failing(damping: float):  # type: ignore[no-untyped-def]
        if approx.num_updates == 2:
            raise RuntimeError("planted failure")
        return inverse(damping)

    approx.inverse = failing  # type: ignore[method-assign]
    opt = PreconditionedOptimizer(model, approx, loss_fn=problem.loss_fn, on_step=calls.append,
                                  t_cov=1, t_inv=1)  # fmt: skip
    seen = []
    for step in range(4):
        opt.zero_grad()
        with opt.record():
            problem.loss_fn(model(problem.x), problem.y).backward()
        if step == 1:
            model[0].weight.grad[0, 0] = float("nan")  # type: ignore[index]
            with pytest.warns(RuntimeWarning, match="skipped"):
                opt.step()
        elif step == 2:
            opt.engine._pending[0].layers["2"].kronecker.A[0, 0] = float("inf")  # type: ignore[union-attr]
            with pytest.warns(RuntimeWarning, match="NaN/Inf"):
                opt.step()
        elif step == 3:
            with pytest.warns(RuntimeWarning, match="planted failure"):
                opt.step()
        else:
            opt.step()
        seen.append(opt.last_stats)
        assert set(opt.last_stats) >= ALWAYS
    assert len(calls) == 4 and all(c is s for c, s in zip(calls, seen, strict=True))
    assert [c["skipped"] for c in calls] == [False, True, False, False]
    assert calls[1]["kl_clip_factor"] is None and calls[1]["skipped_steps"] == 1
    assert [c["skipped_updates"] for c in calls] == [0, 0, 1, 1]
    assert [c["inverse_failures"] for c in calls] == [0, 0, 0, 1]
    assert [c["step"] for c in calls] == [1, 2, 3, 4]
    with pytest.raises(TypeError, match="on_step must be callable"):
        PreconditionedOptimizer(model, ZeroCurvature(), loss_fn=problem.loss_fn, on_step=1)
