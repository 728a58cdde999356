"""Guards of the optimizer: run-time settings, broken or absurd steps, stale statistics."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from curvlib.approx.kfac import KFAC
from curvlib.approx.natural_gradient import BlockNaturalGradient
from curvlib.core import FisherType
from curvlib.optim.guards import MAX_AMPLIFICATION
from curvlib.wiring import PreconditionedOptimizer
from tests import problems as P
from tests.hyper import FRESH, train_steps
from tests.optim.identity import ZeroCurvature, _Scaled


def _setup(
    approx: Any = None, **kwargs: Any
) -> tuple[nn.Module, nn.Module, PreconditionedOptimizer]:
    problem = P.mlp_ce()
    model = problem.model()
    opt = PreconditionedOptimizer(
        model, KFAC() if approx is None else approx, loss_fn=problem.loss_fn, **kwargs
    )
    return model, problem.loss_fn, opt


def _record(opt: PreconditionedOptimizer, model: nn.Module, loss_fn: nn.Module, scale: float = 1.0,
            x: torch.Tensor | None = None) -> None:  # fmt: skip
    problem = P.mlp_ce()
    opt.zero_grad()
    with opt.record():
        (scale * loss_fn(model(problem.x if x is None else x), problem.y)).backward()


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(model: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


# -- settings -----------------------------------------------------------------


@pytest.mark.parametrize("key", ["lr", "damping", "kl_clip", "weight_decay"])
def test_infinite_settings_are_refused_at_construction(key: str) -> None:
    with pytest.raises(ValueError, match="finite"):
        _setup(**{key: math.inf})


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("lr", math.nan, "lr"),
        ("lr", math.inf, "finite"),
        ("lr", -0.1, "lr"),
        ("momentum", math.nan, "momentum"),
        ("momentum", -0.5, "momentum"),
        ("damping", math.nan, "damping"),
        ("damping", 0.0, "damping"),
        ("weight_decay", math.inf, "finite"),
        ("t_cov", 0, "t_cov"),
    ],
)
def test_settings_edited_at_run_time_are_checked_before_anything_moves(
    key: str, value: float, match: str
) -> None:
    model, loss_fn, opt = _setup(**FRESH)
    train_steps(opt, model, loss_fn, [(P.mlp_ce().x, P.mlp_ce().y)])
    _record(opt, model, loss_fn)
    before = _params(model)
    opt.param_groups[0][key] = value
    with pytest.raises((ValueError, TypeError), match=match) as info:
        opt.step()
    assert _unchanged(model, before)
    assert "param_groups[0]" in str(info.value)


def test_a_scheduler_may_set_the_learning_rate_to_zero() -> None:
    model, loss_fn, opt = _setup(**FRESH)
    _record(opt, model, loss_fn)
    before = _params(model)
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.step()
    assert _unchanged(model, before)


# -- overflow and broken directions -------------------------------------------


def test_kl_clip_still_bounds_the_step_when_g_dot_delta_overflows_float32() -> None:
    model, loss_fn, opt = _setup(**FRESH)
    model.float()
    x = P.mlp_ce().x.float()
    _record(opt, model, loss_fn, scale=1e20, x=x)
    before = _params(model)
    opt.step()
    nu = opt.last_stats["kl_clip_factor"]
    assert nu is not None and nu < 1e-10
    change = max(
        float((p.detach() - q).abs().max()) for p, q in zip(model.parameters(), before, strict=True)
    )
    assert 0.0 < change < 1.0


def test_an_overflowing_direction_skips_the_step_naming_the_layers() -> None:
    model, loss_fn, opt = _setup(ZeroCurvature(), damping=1e-30, **FRESH)
    model.float()
    _record(opt, model, loss_fn, scale=1e20, x=P.mlp_ce().x.float())
    before = _params(model)
    with pytest.warns(RuntimeWarning, match=r"layers \['0', '2', '4'\] is not finite"):
        opt.step()
    assert _unchanged(model, before) and opt.skipped_steps == 1


class _Uphill(ZeroCurvature):
    def inverse(self, damping: float) -> _Scaled:
        return _Scaled(-1.0 / damping)


def test_an_uphill_direction_skips_the_step() -> None:
    model, loss_fn, opt = _setup(_Uphill(), damping=1.0, **FRESH)
    _record(opt, model, loss_fn)
    before = _params(model)
    with pytest.warns(RuntimeWarning, match="points uphill"):
        opt.step()
    assert _unchanged(model, before)


class _TurnsUphill(ZeroCurvature):
    """Its inverses are plain SGD until the ``broken``-th, which points uphill."""

    def __init__(self, broken: int) -> None:
        super().__init__()
        self.builds, self.broken = 0, broken

    def inverse(self, damping: float) -> _Scaled:
        self.builds += 1
        return _Scaled((-1.0 if self.builds == self.broken else 1.0) / damping)


def test_an_uphill_rebuild_is_dropped_and_the_inverse_before_it_restored() -> None:
    approx = _TurnsUphill(broken=2)
    model, loss_fn, opt = _setup(approx, damping=1.0, t_cov=2, t_inv=2, warmup=0)
    _record(opt, model, loss_fn)
    opt.step()  # builds the first inverse
    _record(opt, model, loss_fn)
    opt.step()
    _record(opt, model, loss_fn)
    before = _params(model)
    with pytest.warns(RuntimeWarning, match="dropped and the one before it restored"):
        opt.step()  # step 2 rebuilds: the new inverse points uphill
    assert _unchanged(model, before) and approx.builds == 2
    assert opt.engine.inverse_failures == 1 and approx.num_updates == 2  # statistics kept
    _record(opt, model, loss_fn)
    opt.step()  # step 3, no rebuild: the restored inverse steps again
    assert not _unchanged(model, before) and opt.skipped_steps == 1 and approx.builds == 2
    _record(opt, model, loss_fn)
    opt.step()  # step 4 rebuilds from the estimate, which kept step 2's statistics
    assert approx.builds == 3 and opt.skipped_steps == 1


def test_an_uphill_first_inverse_has_nothing_to_restore_and_names_the_fix() -> None:
    model, loss_fn, opt = _setup(_Uphill(), damping=1.0, **FRESH)
    _record(opt, model, loss_fn)
    with pytest.warns(RuntimeWarning, match="raise the damping") as caught:
        opt.step()
    assert not any("restored" in str(w.message) for w in caught)
    assert opt.engine.inverse_failures == 0


@pytest.mark.parametrize("damping", [1e-7, 1e-5])
def test_steps_amplifying_the_gradient_more_than_the_bound_are_skipped(damping: float) -> None:
    # C = 0: the direction is the gradient over the damping, amplification 1/damping.
    model, loss_fn, opt = _setup(ZeroCurvature(), damping=damping, kl_clip=None, lr=1e-9, **FRESH)
    _record(opt, model, loss_fn)
    before = _params(model)
    if 1.0 / damping > MAX_AMPLIFICATION:
        with pytest.warns(RuntimeWarning, match="times longer than its gradient"):
            opt.step()
        assert _unchanged(model, before)
    else:
        opt.step()
        assert not _unchanged(model, before) and opt.skipped_steps == 0


def test_tiny_damping_in_float32_no_longer_blows_up_natural_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 3))
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    loss_fn = nn.CrossEntropyLoss()
    opt = PreconditionedOptimizer(model, BlockNaturalGradient(), loss_fn=loss_fn, damping=1e-12)
    with pytest.warns(RuntimeWarning, match="damping is too small"):
        losses = train_steps(opt, model, loss_fn, [(x, y)] * 5)
    assert max(losses) < 1.5 and opt.skipped_steps == 5


# -- sampling and stale statistics --------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_mc_fisher_with_non_finite_inputs_skips_instead_of_crashing(bad: float) -> None:
    model, loss_fn, opt = _setup(fisher_type=FisherType.MC, **FRESH)
    train_steps(opt, model, loss_fn, [(P.mlp_ce().x, P.mlp_ce().y)])
    x = P.mlp_ce().x.clone()
    x[2, 1] = bad
    before = _params(model)
    with pytest.warns(RuntimeWarning, match="skipped"):
        train_steps(opt, model, loss_fn, [(x, P.mlp_ce().y)])
    assert _unchanged(model, before) and opt.skipped_steps == 1


@pytest.mark.parametrize("clear", ["opt.zero_grad", "model.zero_grad"])
def test_statistics_of_a_step_that_never_ran_are_dropped(clear: str) -> None:
    problem = P.mlp_ce()
    other = P.mlp_ce(n=6).x.flip(0) * 3.0
    exact = {**FRESH, "fisher_type": FisherType.EXACT}  # no sampling: comparable bit for bit
    model, loss_fn, opt = _setup(**exact)
    model_ref, loss_ref, ref = _setup(**exact)
    # A GradScaler finds an overflow and skips opt.step(): the statistics are stale.
    with opt.record():
        loss_fn(model(problem.x), problem.y).backward()
    if clear == "opt.zero_grad":
        opt.zero_grad()
    else:
        model.zero_grad()
    with opt.record():
        loss_fn(model(other), problem.y).backward()
    opt.step()
    train_steps(ref, model_ref, loss_ref, [(other, problem.y)])
    state, expected = opt.engine.approx.state_dict(), ref.engine.approx.state_dict()
    assert state["num_updates"] == expected["num_updates"] == 1
    for name in ("0", "2", "4"):
        for key in ("A", "G"):
            got, want = state["blocks"][name]["state"][key], expected["blocks"][name]["state"][key]
            assert torch.equal(got, want)


@pytest.mark.parametrize("t_cov", [1, 10])
def test_a_second_step_on_the_same_gradients_is_an_error_whatever_t_cov(t_cov: int) -> None:
    model, loss_fn, opt = _setup(t_cov=t_cov, t_inv=1, warmup=0)
    _record(opt, model, loss_fn)
    opt.step()
    before = _params(model)
    with pytest.raises(RuntimeError, match="called again on the gradients"):
        opt.step()
    assert _unchanged(model, before)
    train_steps(opt, model, loss_fn, [(P.mlp_ce().x, P.mlp_ce().y)])  # a new backward: fine


def test_layers_an_approximation_couples_are_judged_as_one_direction() -> None:
    from curvlib.optim.guards import DirectionCheck, broken_directions

    eps = torch.finfo(torch.float32).eps
    checks = {
        "0": DirectionCheck(inner=-1.0, grad_norm=1.0, direction_norm=2.0, eps=eps),
        "2": DirectionCheck(inner=5.0, grad_norm=2.0, direction_norm=3.0, eps=eps),
    }
    reason = broken_directions(checks)
    assert reason is not None and "['0']" in reason  # block-diagonal: layer '0' is broken
    assert broken_directions(checks, coupled=[["0", "2"]]) is None  # the whole step descends
    downhill = {**checks, "2": DirectionCheck(inner=0.5, grad_norm=2.0, direction_norm=3.0,
                                              eps=eps)}  # fmt: skip
    reason = broken_directions(downhill, coupled=[["0", "2"]])
    assert reason is not None and "['0', '2']" in reason


def test_a_layer_without_gradient_is_measured_with_its_group() -> None:
    from curvlib.optim.guards import DirectionCheck, absurd_steps

    eps = torch.finfo(torch.float32).eps
    checks = {
        "0": DirectionCheck(inner=0.0, grad_norm=0.0, direction_norm=0.5, eps=eps),
        "2": DirectionCheck(inner=4.0, grad_norm=2.0, direction_norm=3.0, eps=eps),
    }
    # A coarse correction may move a layer whose own gradient is zero: judged with its group.
    assert absurd_steps(checks, 1.0, coupled=[["0", "2"]]) is None
    # Block-diagonal, a direction without gradient has no bound: skipped, not a crash.
    reason = absurd_steps(checks, 1.0)
    assert reason is not None and "['0']" in reason and "inf" in reason
