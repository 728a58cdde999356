"""The library defaults train: nothing passed but the model, the approximation and the loss.

How fast they train against a tuned Adam is measured by ``benchmarks/convergence.py``;
these tests only guard that the defaults neither diverge nor stall on real images.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from curvlib import (
    EKFAC,
    KFAC,
    KPSVD,
    Diagonal,
    NaturalGradientPreconditioner,
    PreconditionedOptimizer,
)
from curvlib.approx import TwoLevel
from curvlib.core.protocols import CurvatureApprox
from curvlib.optim import DampingRule, DampingWarmup, LevenbergMarquardt
from curvlib.optim.defaults import DEFAULTS, default_damping, default_kl_clip, default_t_inv

SEEDS = (0, 1, 2)
APPROXIMATIONS: dict[str, Callable[[], CurvatureApprox]] = {
    "KFAC": KFAC, "EKFAC": EKFAC, "KPSVD": KPSVD,
}  # fmt: skip
DIAGONAL_DEFAULT = DampingWarmup(Diagonal.default_damping, samples=DEFAULTS.damping.samples)
"""What the optimizer damps the Diagonal with when no damping is given."""


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor]:
    data = load_digits()
    images = torch.tensor(data.images[:600], dtype=torch.float32)[:, None] / 16.0
    return images, torch.tensor(data.target[:600], dtype=torch.int64)


def relu_autoencoder() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
        nn.Linear(64, 8), nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 128), nn.ReLU(),
        nn.Linear(128, 64), nn.Unflatten(1, (1, 8, 8)),
    )  # fmt: skip


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip


def train(
    model: nn.Module, approx: CurvatureApprox, loss_fn: nn.Module, x: Tensor, y: Tensor,
    seed: int, epochs: int,
) -> list[float]:  # fmt: skip
    """Full-data losses after each epoch of the default optimizer (batches of 100)."""
    opt = PreconditionedOptimizer(model, approx, loss_fn=loss_fn)
    order = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        losses = [float(loss_fn(model(x), y))]
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=order).split(100):
            opt.zero_grad()
            with opt.record():
                loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            losses.append(float(loss_fn(model(x), y)))
    assert opt.skipped_steps == 0
    return losses


@pytest.mark.parametrize(("name", "seed"), list(itertools.product(APPROXIMATIONS, SEEDS)))
def test_defaults_train_a_relu_autoencoder(
    digits: tuple[Tensor, Tensor], name: str, seed: int
) -> None:
    x, _ = digits
    torch.manual_seed(seed)
    losses = train(relu_autoencoder(), APPROXIMATIONS[name](), nn.BCEWithLogitsLoss(), x, x,
                   seed, epochs=6)  # fmt: skip
    assert all(torch.isfinite(torch.tensor(losses)))
    assert max(losses) <= losses[0] * 1.05, losses  # never blows up on the way
    assert losses[-1] < 0.75 * losses[0], losses


@pytest.mark.parametrize("seed", SEEDS)
def test_the_diagonal_at_its_defaults_leaves_the_mean_image_plateau(
    digits: tuple[Tensor, Tensor], seed: int
) -> None:
    # Predicting the mean image is the plateau ReLU autoencoders fall to. At KFAC's
    # damping the Diagonal reaches it in two epochs and stays (1.00-1.02 of it after 12
    # epochs at these seeds); at its own default it ends at 0.89-0.92 of it.
    x, _ = digits
    loss_fn = nn.BCEWithLogitsLoss()
    mean = x.mean(0, keepdim=True).clamp(1e-4, 1 - 1e-4)
    plateau = float(loss_fn(torch.logit(mean).expand_as(x), x))
    torch.manual_seed(seed)
    losses = train(relu_autoencoder(), Diagonal(), loss_fn, x, x, seed, epochs=12)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert max(losses) <= losses[0] * 1.05, losses  # never blows up on the way
    assert losses[-1] < 0.95 * plateau, (plateau, losses)


@pytest.mark.parametrize(("name", "seed"), list(itertools.product(APPROXIMATIONS, SEEDS)))
def test_defaults_train_a_small_cnn(digits: tuple[Tensor, Tensor], name: str, seed: int) -> None:
    x, y = digits
    torch.manual_seed(seed)
    losses = train(small_cnn(), APPROXIMATIONS[name](), nn.CrossEntropyLoss(), x, y, seed,
                   epochs=4)  # fmt: skip
    assert all(torch.isfinite(torch.tensor(losses)))
    assert max(losses) <= losses[0] * 1.05, losses
    assert losses[-1] < 0.5 * losses[0], losses


def test_the_optimizer_uses_the_documented_defaults() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=nn.MSELoss())
    group = opt.param_groups[0]
    assert group["lr"] == DEFAULTS.lr and group["momentum"] == DEFAULTS.momentum
    assert group["damping"] == DEFAULTS.damping and opt.kl_clip == DEFAULTS.kl_clip
    assert (group["t_cov"], group["t_inv"]) == (DEFAULTS.t_cov, DEFAULTS.t_inv)
    assert opt.extractor.stats_fraction == DEFAULTS.stats_fraction


@pytest.mark.parametrize(
    ("warmup", "t_cov", "t_inv"), [(0, 3, 4), (5, 3, 4), (10, 10, 10), (20, 7, 7)]
)
def test_warmup_refreshes_at_doubling_intervals_then_follows_the_intervals(
    warmup: int, t_cov: int, t_inv: int
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    loss_fn = nn.MSELoss()
    opt = PreconditionedOptimizer(
        model, KFAC(), loss_fn=loss_fn, t_cov=t_cov, t_inv=t_inv, warmup=warmup,
        refresh_on_move=0,
    )  # fmt: skip
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    stats_steps, inverse_steps = [], []
    for step in range(24):
        opt.zero_grad()
        with opt.record():
            loss_fn(model(x), y).backward()
        opt.step()
        if "time_update" in opt.last_stats:
            stats_steps.append(step)
        if opt.last_stats["inverse_rebuilt"]:
            inverse_steps.append(step)
    warm = [0, 1, 2, 4, 8, 16]  # doubling intervals while k < warmup
    assert stats_steps == [k for k in range(24) if (k < warmup and k in warm) or k % t_cov == 0]
    assert inverse_steps == [k for k in range(24) if (k < warmup and k in warm) or k % t_inv == 0]


def test_warmup_must_be_a_non_negative_int() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="warmup"):
            PreconditionedOptimizer(model, KFAC(), loss_fn=nn.MSELoss(), warmup=bad)


def _layer_weights(model: nn.Module) -> list[Tensor]:
    """``[W | b]`` of every Linear layer, flattened, in float64."""
    return [
        torch.cat([m.weight.detach().flatten(), m.bias.detach()]).double()
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]


@pytest.mark.parametrize(
    ("threshold", "t_cov", "t_inv"), [(0.05, 6, 6), (0.1, 4, 7), (0.02, 50, 50)]
)
def test_refresh_on_move_refreshes_where_some_layer_moved_that_far_since_the_statistics(
    threshold: float, t_cov: int, t_inv: int
) -> None:
    """The schedule against the distances measured independently, step by step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    loss_fn = nn.MSELoss()
    opt = PreconditionedOptimizer(
        model, KFAC(), loss_fn=loss_fn, t_cov=t_cov, t_inv=t_inv, warmup=0, lr=0.3,
        refresh_on_move=threshold,
    )  # fmt: skip
    x, y = torch.randn(16, 3).double(), torch.randn(16, 2).double()
    reference: list[Tensor] | None = None
    expected_stats, expected_inverse, stats_steps, inverse_steps, moved_steps = [], [], [], [], []
    for step in range(30):
        now = _layer_weights(model)
        distance = None if reference is None else max(
            float((w - r).norm() / r.norm()) for w, r in zip(now, reference, strict=True)
        )  # fmt: skip
        moved = distance is not None and distance >= threshold
        if moved:
            moved_steps.append(step)
        if moved or step % t_cov == 0:
            expected_stats.append(step)
            reference = now
        if moved or step % t_inv == 0:
            expected_inverse.append(step)
        _step(opt, model, x, y)
        if distance is not None:
            assert opt.last_stats["weights_moved"] == pytest.approx(distance, rel=1e-9)
        if "time_update" in opt.last_stats:
            stats_steps.append(step)
        if opt.last_stats["inverse_rebuilt"]:
            inverse_steps.append(step)
    assert moved_steps  # the rule fired, off the intervals
    assert any(k % t_cov for k in moved_steps)
    assert (stats_steps, inverse_steps) == (expected_stats, expected_inverse)


def test_without_refresh_on_move_only_the_intervals_refresh() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    loss_fn = nn.MSELoss()
    opt = PreconditionedOptimizer(
        model, KFAC(), loss_fn=loss_fn, t_cov=5, t_inv=5, warmup=0, lr=1.0, refresh_on_move=0
    )
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    steps = []
    for step in range(20):
        _step(opt, model, x, y)
        assert opt.last_stats["weights_moved"] is None
        if opt.last_stats["inverse_rebuilt"]:
            steps.append(step)
    assert steps == [0, 5, 10, 15]


def test_refresh_on_move_resumes_from_a_checkpoint_exactly() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randn(16, 2)

    def build(model: nn.Module) -> PreconditionedOptimizer:
        return PreconditionedOptimizer(
            model, KFAC(), loss_fn=nn.MSELoss(), t_cov=50, t_inv=50, lr=0.3, refresh_on_move=0.15
        )

    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    twin = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = build(model)
    for _ in range(4):
        _step(opt, model, x, y)
    twin.load_state_dict(model.state_dict())
    resumed = build(twin)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if through torch.save
    refreshed = []
    for _ in range(12):
        _step(opt, model, x, y)
        _step(resumed, twin, x, y)
        assert opt.last_stats["weights_moved"] == resumed.last_stats["weights_moved"]
        refreshed.append(opt.last_stats["inverse_rebuilt"])
    assert any(refreshed) and not all(refreshed)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    # A checkpoint written without the reference: the next statistics take one.
    state = opt.state_dict()
    group = state["curvature"]["groups"][opt.param_groups[0]["name"]]
    group["move_reference"] = None
    older = build(twin)
    older.load_state_dict(state)
    assert older.engine.weights_moved is None
    group["move_reference"] = [torch.zeros(2)]
    with pytest.raises(ValueError, match="reference weights"):
        build(twin).load_state_dict(state)


def test_the_preconditioner_refreshes_when_the_weights_moved_however_they_moved() -> None:
    """Weights changed by another optimizer (or by hand) count as moved."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    loss_fn = nn.MSELoss()
    precond = NaturalGradientPreconditioner(
        model, KFAC(), loss_fn=loss_fn, t_cov=100, t_inv=100, warmup=0, refresh_on_move=0.4
    )
    x, y = torch.randn(16, 3), torch.randn(16, 2)

    def step() -> dict[str, Any]:
        model.zero_grad()
        with precond.record():
            loss_fn(model(x), y).backward()
        precond.step()
        return precond.last_stats

    assert step()["inverse_rebuilt"] and step()["weights_moved"] == 0.0
    with torch.no_grad():
        model[2].weight.mul_(1.25)  # [W | b] of that layer moves by less than a quarter
    stats = step()
    assert not stats["inverse_rebuilt"] and 0.0 < stats["weights_moved"] < 0.25
    with torch.no_grad():
        model[2].weight.mul_(1.25)
    stats = step()
    assert stats["inverse_rebuilt"] and stats["weights_moved"] >= 0.4
    assert step()["weights_moved"] == 0.0  # measured from the weights of the refresh
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    model.zero_grad()
    loss_fn(model(x), y).backward()  # outside record(): the error names the rule
    with pytest.raises(RuntimeError, match=r"moved by 0\.\d+ >= refresh_on_move=0\.4"):
        precond.step()


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.3"])
def test_a_bad_refresh_on_move_is_refused_naming_it(bad: Any) -> None:
    with pytest.raises(ValueError, match="refresh_on_move"):
        PreconditionedOptimizer(
            nn.Sequential(nn.Linear(3, 2)), KFAC(), loss_fn=nn.MSELoss(), refresh_on_move=bad
        )


def _step(opt: PreconditionedOptimizer, model: nn.Module, x: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    with opt.record():
        opt.loss_fn(model(x), y).backward()
    opt.step()


def test_the_damping_warmup_divides_by_the_samples_seen_until_it_reaches_them() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = PreconditionedOptimizer(
        model, KFAC(), loss_fn=nn.MSELoss(), damping=DampingWarmup(1e-2, samples=100),
        t_cov=1, t_inv=1, stats_fraction=1.0,
    )  # fmt: skip
    x, y = torch.randn(30, 3), torch.randn(30, 2)
    used = []
    for _ in range(5):
        _step(opt, model, x, y)
        used.append(opt.engine.precond_damping)
        assert opt.last_stats["damping"] == used[-1]
    # 30, 60, 90 samples seen: 1e-2 * 100/n; from 120 on the damping itself.
    assert used == pytest.approx([1e-2 * 100 / 30, 1e-2 * 100 / 60, 1e-2 * 100 / 90, 1e-2, 1e-2])


def test_a_number_is_the_damping_from_the_first_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=nn.MSELoss(), damping=1e-4)
    _step(opt, model, torch.randn(8, 3), torch.randn(8, 2))
    assert opt.engine.precond_damping == 1e-4
    default = PreconditionedOptimizer(model, KFAC(), loss_fn=nn.MSELoss())
    _step(default, model, torch.randn(8, 3), torch.randn(8, 2))
    # Half of 8 samples: 400/4 times the damping.
    assert default.engine.precond_damping == pytest.approx(DEFAULTS.damping.damping * 400 / 4)


def test_the_samples_seen_resume_from_a_checkpoint_and_older_ones_end_the_warmup() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    x, y = torch.randn(10, 3), torch.randn(10, 2)

    def build() -> PreconditionedOptimizer:
        return PreconditionedOptimizer(model, KFAC(), loss_fn=nn.MSELoss(), stats_fraction=1.0)

    opt = build()
    _step(opt, model, x, y)
    state = opt.state_dict()
    assert "damping" not in state["param_groups"][0]  # a rule: passed again when resuming
    resumed = build()
    resumed.load_state_dict(state)
    assert resumed.engine.samples_seen == 10
    assert resumed.engine.damping == opt.engine.damping == pytest.approx(DEFAULTS.damping.at(10))
    del state["curvature"]["groups"][opt.param_groups[0]["name"]]["samples_seen"]
    older = build()
    older.load_state_dict(state)  # a run from before the count had no warm-up
    assert older.engine.damping == DEFAULTS.damping.damping


@pytest.mark.parametrize(
    ("damping", "samples", "error"),
    [(0.0, 400, ValueError), (-1e-4, 400, ValueError), (1e-4, -1, ValueError),
     (1e-4, 1.5, ValueError), (1e-4, True, ValueError), (lambda step: 1e-4, 400, TypeError)],
)  # fmt: skip
def test_a_bad_damping_warmup_is_refused_naming_it(damping: Any, samples: Any, error: type) -> None:
    with pytest.raises(error, match="DampingWarmup"):
        DampingWarmup(damping, samples=samples)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_the_diagonal_has_its_own_default_damping_and_the_others_keep_kfacs() -> None:
    assert Diagonal.default_damping == 3e-3  # the documented value
    for approx in (Diagonal(), KFAC(), EKFAC(), KPSVD()):
        torch.manual_seed(0)
        model = _mlp()
        opt = PreconditionedOptimizer(model, approx, loss_fn=nn.MSELoss(), stats_fraction=1.0)
        expected = DIAGONAL_DEFAULT if isinstance(approx, Diagonal) else DEFAULTS.damping
        assert default_damping(approx) == expected
        assert opt.param_groups[0]["damping"] == expected
        _step(opt, model, torch.randn(8, 3), torch.randn(8, 2))
        # 8 samples seen: the warm-up multiplies each lambda by 400/8.
        assert opt.engine.precond_damping == pytest.approx(expected.damping * 400 / 8)


@pytest.mark.parametrize("value", [0.0, -1e-3, float("nan"), "1e-3", True])
def test_a_bad_default_damping_of_an_approximation_is_refused_naming_it(value: Any) -> None:
    class Broken(Diagonal):
        default_damping = value  # type: ignore[assignment]

    with pytest.raises(ValueError, match=r"Broken\.default_damping must be a positive number"):
        PreconditionedOptimizer(_mlp(), Broken(), loss_fn=nn.MSELoss())


def test_two_level_warms_its_default_damping_up_over_more_samples() -> None:
    assert TwoLevel.default_damping_samples == 800  # the documented value
    approx = TwoLevel(KFAC())
    expected = DampingWarmup(DEFAULTS.damping.damping, samples=800)
    assert default_damping(approx) == expected
    opt = PreconditionedOptimizer(_mlp(), approx, loss_fn=nn.MSELoss())
    assert opt.param_groups[0]["damping"] == expected
    given = PreconditionedOptimizer(_mlp(), TwoLevel(KFAC()), loss_fn=nn.MSELoss(), damping=1e-3)
    assert given.param_groups[0]["damping"] == 1e-3


@pytest.mark.parametrize("value", [-1, 1.5, "800", True])
def test_a_bad_default_warm_up_of_an_approximation_is_refused_naming_it(value: Any) -> None:
    class Broken(KFAC):
        default_damping_samples = value

    with pytest.raises(ValueError, match=r"Broken\.default_damping_samples must be a non-neg"):
        PreconditionedOptimizer(_mlp(), Broken(), loss_fn=nn.MSELoss())


@pytest.mark.parametrize("damping", [1e-3, DampingWarmup(1e-2, samples=50), LevenbergMarquardt()])
def test_a_damping_given_to_the_optimizer_wins_over_the_diagonals_default(
    damping: DampingRule,
) -> None:
    opt = PreconditionedOptimizer(_mlp(), Diagonal(), loss_fn=nn.MSELoss(), damping=damping)
    assert opt.param_groups[0]["damping"] is damping


def _group_dampings(approx: CurvatureApprox, groups: list[dict[str, Any]], **kw: Any) -> list[Any]:
    opt = PreconditionedOptimizer(_mlp(), approx, loss_fn=nn.MSELoss(), groups=groups, **kw)
    return [group["damping"] for group, _ in opt.curvature_groups()]


def test_each_group_takes_the_default_of_its_own_approximation() -> None:
    diag = DIAGONAL_DEFAULT
    # Default group, a Diagonal group, and a group that copies the default approximation.
    groups: list[dict[str, Any]] = [{"layers": ["2"], "approx": Diagonal()}, {"layers": ["4"]}]
    assert _group_dampings(KFAC(), groups) == [DEFAULTS.damping, diag, DEFAULTS.damping]
    groups = [{"layers": ["2"], "approx": KFAC()}, {"layers": ["4"]}]
    assert _group_dampings(Diagonal(), groups) == [diag, DEFAULTS.damping, diag]


def test_a_given_damping_wins_in_every_group_and_a_groups_own_wins_over_it() -> None:
    groups: list[dict[str, Any]] = [
        {"layers": ["2"], "approx": Diagonal()}, {"layers": ["4"], "approx": KFAC()},
    ]  # fmt: skip
    assert _group_dampings(KFAC(), groups, damping=2e-2) == [2e-2, 2e-2, 2e-2]
    groups[0]["damping"] = 5e-3
    assert _group_dampings(KFAC(), groups) == [DEFAULTS.damping, 5e-3, DEFAULTS.damping]
    assert _group_dampings(Diagonal(), groups, damping=2e-2) == [2e-2, 5e-3, 2e-2]


def test_the_preconditioner_mode_takes_the_approximations_default_damping() -> None:
    diag = NaturalGradientPreconditioner(_mlp(), Diagonal(), loss_fn=nn.MSELoss())
    assert diag.engine.damping_rule == DIAGONAL_DEFAULT
    kfac = NaturalGradientPreconditioner(_mlp(), KFAC(), loss_fn=nn.MSELoss())
    assert kfac.engine.damping_rule == DEFAULTS.damping
    given = NaturalGradientPreconditioner(_mlp(), Diagonal(), loss_fn=nn.MSELoss(), damping=1e-3)
    assert given.engine.damping_rule == 1e-3


def test_ekfac_has_its_own_kl_clip_and_refresh_interval_and_the_others_keep_kfacs() -> None:
    assert (EKFAC.default_kl_clip, EKFAC.default_t_inv) == (1.5e-3, 20)  # the documented values
    for approx in (KFAC(), EKFAC(), KPSVD(), Diagonal()):
        opt = PreconditionedOptimizer(_mlp(), approx, loss_fn=nn.MSELoss())
        ekfac = isinstance(approx, EKFAC)
        assert default_kl_clip(approx) == opt.kl_clip == (1.5e-3 if ekfac else DEFAULTS.kl_clip)
        assert default_t_inv(approx) == opt.engine.t_inv == (20 if ekfac else DEFAULTS.t_inv)
        assert opt.param_groups[0]["t_inv"] == opt.engine.t_inv
        assert opt.engine.t_cov == DEFAULTS.t_cov


def test_a_given_kl_clip_or_interval_wins_over_the_approximations_default() -> None:
    opt = PreconditionedOptimizer(_mlp(), EKFAC(), loss_fn=nn.MSELoss(), kl_clip=None, t_inv=5)
    assert opt.kl_clip is None and opt.engine.t_inv == 5
    opt = PreconditionedOptimizer(_mlp(), EKFAC(), loss_fn=nn.MSELoss(), kl_clip=1e-2)
    assert opt.kl_clip == 1e-2
    with pytest.raises(ValueError, match="kl_clip must be a positive number, 'default'"):
        PreconditionedOptimizer(_mlp(), EKFAC(), loss_fn=nn.MSELoss(), kl_clip="auto")  # type: ignore[arg-type]


def test_each_group_refreshes_at_the_interval_of_its_own_approximation() -> None:
    groups: list[dict[str, Any]] = [
        {"layers": ["2"], "approx": EKFAC()}, {"layers": ["4"], "approx": KFAC(), "t_inv": 3},
    ]  # fmt: skip
    opt = PreconditionedOptimizer(_mlp(), KFAC(), loss_fn=nn.MSELoss(), groups=groups)
    assert [engine.t_inv for engine in opt.engines] == [DEFAULTS.t_inv, 20, 3]
    assert opt.kl_clip == DEFAULTS.kl_clip  # the clip bounds the whole step: the optimizer's
    opt = PreconditionedOptimizer(_mlp(), KFAC(), loss_fn=nn.MSELoss(), groups=groups, t_inv=7)
    assert [engine.t_inv for engine in opt.engines] == [7, 7, 3]
    pre = NaturalGradientPreconditioner(_mlp(), EKFAC(), loss_fn=nn.MSELoss())
    assert pre.engine.t_inv == 20


@pytest.mark.parametrize(
    ("attribute", "value"),
    [("default_kl_clip", 0.0), ("default_kl_clip", float("nan")), ("default_kl_clip", "1e-3"),
     ("default_t_inv", 0), ("default_t_inv", 2.0), ("default_t_inv", True)],
)  # fmt: skip
def test_a_bad_default_clip_or_interval_of_an_approximation_is_refused_naming_it(
    attribute: str, value: Any
) -> None:
    broken = type("Broken", (KFAC,), {attribute: value})
    with pytest.raises(ValueError, match=rf"Broken\.{attribute} must be a positive"):
        PreconditionedOptimizer(_mlp(), broken(), loss_fn=nn.MSELoss())
