"""The KL clip bounds the whole step, momentum included, in the preconditioner's metric."""

from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch
from torch import Tensor, nn

import tests.problems as P
from curvlib import KFAC, PreconditionedOptimizer
from curvlib.core.layout import ModelLayout
from curvlib.optim.kernels import (
    clip_from_norms,
    layer_step,
    momentum_direction,
    momentum_step_norms,
)

DTYPE = torch.float64


def _spd(n: int, gen: torch.Generator) -> Tensor:
    root = torch.randn(n, n, generator=gen, dtype=DTYPE)
    return root @ root.T + 0.1 * torch.eye(n, dtype=DTYPE)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_step_norms_equal_the_dense_quadratic_forms(momentum: float, nesterov: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    metric = _spd(7, gen)  # P^{-1}
    grad = torch.randn(7, generator=gen, dtype=DTYPE)
    buffer = torch.randn(7, generator=gen, dtype=DTYPE)
    direction = torch.linalg.solve(metric, grad)  # P grad
    step_norm, buffer_norm = momentum_step_norms(
        float(grad @ direction), float(grad @ buffer), float(buffer @ metric @ buffer),
        momentum, nesterov,
    )  # fmt: skip
    new_buffer = momentum * buffer + direction
    step = direction + momentum * new_buffer if nesterov else new_buffer
    assert step_norm == pytest.approx(float(step @ metric @ step), rel=1e-12)
    assert buffer_norm == pytest.approx(float(new_buffer @ metric @ new_buffer), rel=1e-12)


def test_clip_from_norms_sums_layers_with_their_learning_rates() -> None:
    norms = {"a": 2.0, "b": 6.0}
    assert clip_from_norms(norms, {"a": 0.5, "b": 0.1}, 1e-2) == pytest.approx(
        (1e-2 / (0.25 * 2.0 + 0.01 * 6.0)) ** 0.5
    )
    assert clip_from_norms(norms, 0.1, 1e-2, lr_squared=False) == pytest.approx((1e-2 / 8.0) ** 0.5)
    assert clip_from_norms(norms, 0.1, None) == 1.0
    assert clip_from_norms(norms, 0.1, 1e3) == 1.0
    assert clip_from_norms({"a": float("nan")}, 0.1, 1e-2) == 1.0


@pytest.mark.parametrize("nesterov", [False, True])
def test_the_step_with_momentum_stays_inside_the_kl_bound(nesterov: bool) -> None:
    # EIGEN damping inverts C + lambda I exactly, so the metric of the bound is known.
    problem = P.mlp_ce(n=32)
    model = problem.model()
    damping, lr, clip = 1e-3, 0.5, 1e-2
    opt = PreconditionedOptimizer(
        model, KFAC("eigen"), loss_fn=problem.loss_fn, lr=lr, damping=damping, kl_clip=clip,
        momentum=0.9, nesterov=nesterov, t_cov=1000, t_inv=1000, warmup=0, refresh_on_move=0,
        fisher_type="exact", max_move=None,
    )  # fmt: skip
    clipped = 0
    for _ in range(8):
        before = {layer.name: layer.to_matrix(*(p.detach().clone() for p in layer.parameters))
                  for layer in opt.layers}  # fmt: skip
        opt.zero_grad()
        with opt.record():
            problem.loss_fn(model(problem.x), problem.y).backward()
        opt.step()
        kl, tracked, true = 0.0, 0.0, 0.0
        for layer in opt.layers:
            step = layer.to_matrix(*(p.detach() for p in layer.parameters)) - before[layer.name]
            metric_step = opt.approx.matvec({layer.name: step})[layer.name] + damping * step
            kl += float((step * metric_step).sum())
            buffer = layer.to_matrix(*(opt.state[p]["momentum_buffer"] for p in layer.parameters))
            metric_buffer = opt.approx.matvec({layer.name: buffer})[layer.name] + damping * buffer
            true += float((buffer * metric_buffer).sum())
            tracked += opt.state[layer.weight]["momentum_norm"]
        assert kl <= clip * (1 + 1e-6)
        nu = opt.last_stats["kl_clip_factor"]
        if nu < 1.0:
            clipped += 1
            assert kl == pytest.approx(clip, rel=1e-6)
        assert tracked == pytest.approx(true / 1.0, rel=1e-6)  # exact while the inverse is fixed
    assert clipped >= 2


def test_the_tracked_norm_round_trips_through_a_checkpoint() -> None:
    problem = P.mlp_ce(n=16)
    model = problem.model()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=problem.loss_fn, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        with opt.record():
            problem.loss_fn(model(problem.x), problem.y).backward()
        opt.step()
    state = opt.state_dict()
    fresh = PreconditionedOptimizer(model, KFAC(), loss_fn=problem.loss_fn, momentum=0.9)
    fresh.load_state_dict(state)
    for layer in opt.layers:
        assert (
            fresh.state[layer.weight]["momentum_norm"] == opt.state[layer.weight]["momentum_norm"]
        )


def test_the_parameter_update_matches_sgd_with_momentum_and_takes_no_layers() -> None:

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    layers = ModelLayout.from_model(model).layers
    group = {"lr": 0.1, "momentum": 0.5, "nesterov": False, "weight_decay": 0.01,
             "decoupled_weight_decay": True}  # fmt: skip
    state: defaultdict[object, dict[str, object]] = defaultdict(dict)  # as torch.optim's
    assert layer_step(state, group, [], {}, want_deltas=False) == ({}, None)
    weight, bias = (p.detach().clone() for p in model.parameters())
    direction = torch.randn(2, 4)
    with torch.no_grad():  # as in step()
        for clip in (1.0, 0.5):
            layer_step(state, group, layers, {layers[0].name: direction}, False, clip=clip)
    # Buffers: b1 = d, b2 = 0.5 * 0.5 * b1 + 0.5 * d; decoupled decay before each step.
    b1, b2 = direction, 0.25 * direction + 0.5 * direction
    expected = torch.cat([weight, bias[:, None]], dim=1)
    for b in (b1, b2):
        expected = (1 - 0.1 * 0.01) * expected - 0.1 * b
    actual = torch.cat([model[0].weight, model[0].bias[:, None]], dim=1)
    torch.testing.assert_close(actual.detach(), expected)


def _layers_of_every_kind() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.ConvTranspose2d(3, 2, 2, bias=False),
        nn.Flatten(),
        nn.Linear(2 * 5 * 5, 4),
    ).double()
    return model, list(ModelLayout.from_model(model).layers)


@pytest.mark.parametrize("nesterov", [False, True])
def test_the_vectorised_update_equals_momentum_direction_per_parameter(nesterov: bool) -> None:
    """All parameters at once (``torch._foreach``) as one ``momentum_direction`` each.

    Through a momentum switched off and on again (buffers cleared, then new),
    KL clips below 1, a convolution, a transposed one without bias and a linear
    layer, with the parameter changes it reports.
    """
    model, layers = _layers_of_every_kind()
    reference = copy.deepcopy(model)
    ref_params = dict(zip(model.parameters(), reference.parameters(), strict=True))
    state: defaultdict[object, dict[str, object]] = defaultdict(dict)
    ref_state: defaultdict[object, dict[str, object]] = defaultdict(dict)
    gen = torch.Generator().manual_seed(1)
    schedule = [(0.9, 1.0), (0.9, 0.3), (0.0, 0.5), (0.9, 1.0), (0.9, 0.7)]
    for momentum, clip in schedule:
        group = {"lr": 0.1, "momentum": momentum, "nesterov": nesterov,
                 "weight_decay": 0.01, "decoupled_weight_decay": True}  # fmt: skip
        directions = {
            la.name: torch.randn(la.out_dim, la.in_dim_aug, generator=gen, dtype=DTYPE)
            for la in layers
        }
        before = {la.name: la.to_matrix(*(p.detach().clone() for p in la.parameters))
                  for la in layers}  # fmt: skip
        with torch.no_grad():
            deltas, bounds = layer_step(state, group, layers, directions, True, clip=clip)
            assert bounds is None  # no max_move
            for la in layers:
                parts = la.from_matrix(directions[la.name])
                for p, d in zip(la.parameters, parts, strict=False):
                    q = ref_params[p]
                    step, ref_state[q]["momentum_buffer"] = momentum_direction(
                        d, ref_state[q].get("momentum_buffer"), momentum, nesterov, clip
                    )
                    q.mul_(1 - 0.1 * 0.01).add_(step, alpha=-0.1)
        for p, q in ref_params.items():
            torch.testing.assert_close(p, q, rtol=0, atol=1e-15)
            buffer, ref_buffer = state[p]["momentum_buffer"], ref_state[q]["momentum_buffer"]
            assert (buffer is None) == (ref_buffer is None) == (momentum == 0.0)
            if buffer is not None:
                torch.testing.assert_close(buffer, ref_buffer, rtol=0, atol=1e-15)
        for la in layers:
            after = la.to_matrix(*(p.detach() for p in la.parameters))
            torch.testing.assert_close(deltas[la.name], after - before[la.name])
