"""``max_move``: no curvature layer's step moves its weights by more than that fraction of them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import tests.problems as P
from curvlib import EKFAC, KFAC, KPSVD, PreconditionedOptimizer
from curvlib.optim.defaults import DEFAULTS, default_max_move
from curvlib.optim.kernels import move_bounds


def _weights(opt: PreconditionedOptimizer) -> dict[str, Tensor]:
    return {
        layer.name: layer.to_matrix(*(p.detach().clone() for p in layer.parameters))
        for layer in opt.layers
    }


def _train(
    problem: P.Problem, steps: int, **kwargs: object
) -> tuple[PreconditionedOptimizer, list[dict[str, float]]]:
    """``steps`` steps; per step, each layer's move over its weights' norm before the step."""
    torch.manual_seed(0)
    model = problem.model()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=problem.loss_fn, **kwargs)  # type: ignore[arg-type]
    moves = []
    for _ in range(steps):
        before = _weights(opt)
        opt.zero_grad()
        with opt.record():
            problem.loss_fn(model(problem.x), problem.y).backward()
        opt.step()
        after = _weights(opt)
        moves.append({
            name: float((after[name] - w).norm() / w.norm()) for name, w in before.items()
        })  # fmt: skip
    return opt, moves


def test_move_bounds_is_the_trust_ratio_per_layer() -> None:
    params = [torch.full((2, 2), 3.0), torch.full((2,), 4.0), torch.ones(3)]
    steps = [torch.full((2, 2), 1.0), torch.zeros(2), torch.full((3,), 2.0)]
    bounds = move_bounds(params, steps, [2, 1], lr=0.5, max_move=0.1)
    first = 0.1 * math.sqrt(4 * 9 + 2 * 16) / (0.5 * 2.0)  # ||theta|| = sqrt(68), ||step|| = 2
    second = min(1.0, 0.1 * math.sqrt(3.0) / (0.5 * math.sqrt(12.0)))
    assert bounds.dtype == torch.float32
    assert bounds.tolist() == pytest.approx([first, second], rel=1e-6)  # float32 norms
    assert move_bounds(params, steps, [2, 1], lr=0.5, max_move=10.0).tolist() == [1.0, 1.0]


def test_move_bounds_leave_zero_weights_and_zero_steps_alone_and_stop_infinite_steps() -> None:
    params = [torch.zeros(3), torch.ones(3), torch.ones(2), torch.zeros(2)]
    steps = [torch.ones(3), torch.zeros(3), torch.tensor([math.inf, 0.0]), torch.zeros(2)]
    bounds = move_bounds(params, steps, [1, 1, 1, 1], lr=1.0, max_move=0.1)
    assert bounds.tolist() == [1.0, 1.0, 0.0, 1.0]
    nan = move_bounds([torch.tensor([math.nan])], [torch.ones(1)], [1], lr=1.0, max_move=0.1)
    assert nan.tolist() == [1.0]


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.9, False), (0.9, True)])
def test_no_layer_moves_more_than_max_move(momentum: float, nesterov: bool) -> None:
    rho = 0.05
    _, moves = _train(
        P.mlp_ce(n=16), 6, lr=1.0, kl_clip=None, momentum=momentum, nesterov=nesterov,
        max_move=rho,
    )  # fmt: skip
    largest = [max(step.values()) for step in moves]
    assert max(largest) <= rho * (1 + 1e-5)
    assert sum(m == pytest.approx(rho, rel=1e-5) for m in largest) >= 3  # it binds


def test_without_max_move_the_same_steps_move_further() -> None:
    _, moves = _train(P.mlp_ce(n=16), 3, lr=1.0, kl_clip=None, max_move=None)
    assert max(max(step.values()) for step in moves) > 0.05


def test_a_bound_that_never_binds_changes_nothing() -> None:
    loose, _ = _train(P.autoencoder_bce(), 4, max_move=1e6)
    free, _ = _train(P.autoencoder_bce(), 4, max_move=None)
    assert loose.last_stats["move_bound"] == 1.0
    assert free.last_stats["move_bound"] is None
    for name, w in _weights(loose).items():
        assert torch.equal(w, _weights(free)[name])


def test_the_momentum_buffer_and_its_tracked_norm_are_scaled_with_the_step() -> None:
    # EIGEN damping inverts C + lambda I exactly: the tracked norm can be checked.
    problem = P.mlp_ce(n=32)
    damping = 1e-3
    torch.manual_seed(0)
    model = problem.model()
    opt = PreconditionedOptimizer(
        model, KFAC("eigen"), loss_fn=problem.loss_fn, lr=1.0, damping=damping, kl_clip=1.0,
        momentum=0.9, max_move=0.05, t_cov=1000, t_inv=1000, warmup=0, fisher_type="exact",
    )  # fmt: skip
    bounded = 0
    for _ in range(5):
        before = _weights(opt)
        opt.zero_grad()
        with opt.record():
            problem.loss_fn(model(problem.x), problem.y).backward()
        opt.step()
        bound = opt.last_stats["move_bound"]
        assert 0.0 < bound <= 1.0
        bounded += bound < 1.0
        opt.state_dict()  # reads the bounds, which the tracked norms take with the next read
        for layer in opt.layers:
            buffer = layer.to_matrix(*(opt.state[p]["momentum_buffer"] for p in layer.parameters))
            step = layer.to_matrix(*(p.detach() for p in layer.parameters)) - before[layer.name]
            torch.testing.assert_close(step, -buffer)  # lr 1: the step is the (scaled) buffer
            metric = opt.approx.matvec({layer.name: buffer})[layer.name] + damping * buffer
            true = float((buffer * metric).sum())
            assert opt.state[layer.weight]["momentum_norm"] == pytest.approx(true, rel=1e-6)
    assert bounded >= 2


def test_deferred_checks_bound_the_same_steps_without_a_read() -> None:
    # Steps 0, 1 and 2 refresh the curvature (the warm-up) and read; step 3 defers its checks.
    kwargs = {"lr": 1.0, "momentum": 0.9, "max_move": 0.05}
    host, _ = _train(P.cnn_ce(), 4, deferred_checks=False, **kwargs)
    device, _ = _train(P.cnn_ce(), 4, deferred_checks=True, **kwargs)
    assert device._deferred  # the last step's checks are still on the device
    assert host.last_stats["move_bound"] < 1.0
    assert device.last_stats["move_bound"] == pytest.approx(host.last_stats["move_bound"])
    for name, w in _weights(host).items():
        torch.testing.assert_close(_weights(device)[name], w)
    for opt in (host, device):  # reads the bounds and the norms a step left on the device
        opt.state_dict()
    for layer_h, layer_d in zip(host.layers, device.layers, strict=True):
        assert device.state[layer_d.weight]["momentum_norm"] == pytest.approx(
            host.state[layer_h.weight]["momentum_norm"], rel=1e-5
        )


@pytest.mark.parametrize("value", [0.0, -0.1, math.inf])
def test_a_bad_max_move_is_refused(value: float) -> None:
    problem = P.mlp_ce()
    with pytest.raises(ValueError, match="max_move"):
        PreconditionedOptimizer(problem.model(), KFAC(), loss_fn=problem.loss_fn, max_move=value)


@pytest.mark.parametrize("value", ["0.2", True, math.nan, lambda step: 0.2])
def test_a_max_move_that_is_not_a_number_is_refused(value: object) -> None:
    problem = P.mlp_ce()
    with pytest.raises(TypeError, match="max_move"):
        PreconditionedOptimizer(
            problem.model(), KFAC(), loss_fn=problem.loss_fn,
            max_move=value,  # type: ignore[arg-type]
        )  # fmt: skip


def test_the_default_is_the_approximations_own() -> None:
    problem = P.mlp_ce()

    def bound(approx: object, **kwargs: object) -> float | None:
        opt = PreconditionedOptimizer(
            problem.model(),
            approx,
            loss_fn=problem.loss_fn,
            **kwargs,  # type: ignore[arg-type]
        )
        return opt.max_move

    assert default_max_move(KFAC()) == DEFAULTS.max_move == bound(KFAC()) == 0.2
    assert default_max_move(KPSVD()) is None and bound(KPSVD()) is None
    assert default_max_move(EKFAC()) == bound(EKFAC()) == 0.1
    assert bound(KPSVD(), max_move=0.3) == 0.3 and bound(KFAC(), max_move=None) is None

    class Tight(KFAC):
        default_max_move = 0.05

    class Broken(KFAC):
        default_max_move = -1.0

    assert bound(Tight()) == 0.05
    with pytest.raises(ValueError, match=r"Broken\.default_max_move must be a positive number"):
        bound(Broken())
