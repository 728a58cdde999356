r"""Small functional kernels of the optimizer: KL-clipping, momentum and the parameter update."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from curvlib.core.layout import CurvatureLayer

Norm = TypeVar("Norm", float, Tensor)
"""A squared norm: a number on the host, or a tensor of them on the device."""


def kl_clip_factor(
    grads: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    lr: float | Mapping[str, float],
    clip: float | None,
    lr_squared: bool = True,
) -> float:
    r"""The KL-clipping factor $\nu$ of Ba, Grosse & Martens (2017).

    $$\nu = \min\Big(1, \sqrt{\frac{c}{\eta^2 \sum_l \langle \nabla_l, \Delta_l\rangle}}\Big),$$

    with $\Delta_l = P_l \nabla_l$ the preconditioned direction, $\eta$ the
    learning rate and $c$ the clip. The update $\eta\nu\Delta$ then changes the
    model's predictive distribution by at most about $c$ in KL divergence (under
    the quadratic model). ``lr_squared=False`` drops $\eta^2$, the variant used by
    the KPSVD paper's code. With a learning rate per layer (parameter groups),
    the denominator is $\sum_l \eta_l^2 \langle \nabla_l, \Delta_l\rangle$: one
    $\nu$ bounds the KL change of the whole update. Cost: one inner product per layer.

    Args:
        grads: Per-layer gradients.
        directions: Per-layer preconditioned directions.
        lr: Learning rate $\eta$, or a mapping from layer name to its $\eta_l$.
        clip: $c$; ``None`` disables clipping.
        lr_squared: Whether the denominator carries $\eta^2$.

    Returns:
        $\nu \in (0, 1]$; 1 when the inner product is not positive.
    """
    if clip is None:
        return 1.0
    norms = {name: float((grads[name] * d).sum()) for name, d in directions.items()}
    return clip_from_norms(norms, lr, clip, lr_squared)


def clip_from_norms(
    norms: Mapping[str, float],
    lr: float | Mapping[str, float],
    clip: float | None,
    lr_squared: bool = True,
) -> float:
    r"""$\nu = \min(1, \sqrt{c / \sum_l \eta_l^2 n_l})$ from per-layer squared step norms $n_l$.

    [`kl_clip_factor`][curvlib.optim.kernels.kl_clip_factor] with $n_l =
    \langle\nabla_l, \Delta_l\rangle$;
    [`momentum_step_norms`][curvlib.optim.kernels.momentum_step_norms] gives the
    $n_l$ of a step with momentum. 1 when the sum is not positive and finite.
    """
    if clip is None:
        return 1.0
    denom = 0.0
    for name, n in norms.items():
        rate = lr[name] if isinstance(lr, Mapping) else lr
        denom += n * rate * rate if lr_squared else n
    if not denom > 0.0 or not math.isfinite(denom):
        return 1.0
    return min(1.0, math.sqrt(clip / denom))


def momentum_step_norms(
    inner_direction: Norm, inner_buffer: Norm, buffer_norm: Norm, momentum: float,
    nesterov: bool,
) -> tuple[Norm, Norm]:  # fmt: skip
    r"""Squared norms of one layer's momentum step and new buffer in the preconditioner's metric.

    With $P = (C + \lambda I)^{-1}$ the current inverse, $\Delta = P\nabla$ and
    the buffer $b$ of the previous steps, heavy-ball momentum steps along
    $b' = \mu b + \Delta$ and Nesterov along $\Delta + \mu b' = (1 + \mu)\Delta +
    \mu^2 b$. Since $P^{-1}\Delta = \nabla$, the squared $P^{-1}$-norm of
    $a\Delta + \beta b$ is

    $$a^2\langle\nabla, \Delta\rangle + 2a\beta\langle\nabla, b\rangle + \beta^2 \|b\|^2_{P^{-1}},$$

    two inner products with the gradient and the tracked $\|b\|^2_{P^{-1}}$: no
    product with $C$. The tracked norm is exact while the inverse is unchanged
    and refers to the inverse that produced each direction after a rebuild.

    The arguments may be floats (the host path) or tensors of one number per
    layer (the device path of [`curvlib.optim.deferred`][curvlib.optim.deferred]).

    Args:
        inner_direction: $\langle\nabla, \Delta\rangle$.
        inner_buffer: $\langle\nabla, b\rangle$ (0 without a buffer).
        buffer_norm: $\|b\|^2_{P^{-1}}$ (0 without a buffer).
        momentum: $\mu$.
        nesterov: Nesterov momentum.

    Returns:
        ``(step norm, buffer norm)``: $\|\text{step}\|^2_{P^{-1}}$ and
        $\|b'\|^2_{P^{-1}}$, both before clipping (the clip $\nu$ scales both by $\nu^2$).
    """
    buffer = inner_direction + 2.0 * momentum * inner_buffer + momentum * momentum * buffer_norm
    if not nesterov:
        return buffer, buffer
    a, beta = 1.0 + momentum, momentum * momentum
    step = a * a * inner_direction + 2.0 * a * beta * inner_buffer + beta * beta * buffer_norm
    return step, buffer


def momentum_direction(
    direction: Tensor, buffer: Tensor | None, momentum: float, nesterov: bool, clip: float = 1.0
) -> tuple[Tensor, Tensor | None]:
    r"""Heavy-ball or Nesterov momentum on a direction, as ``torch.optim.SGD`` applies it.

    ``clip`` $= \nu$ scales the direction and the old buffer alike, so that the
    step is $\nu$ times the unclipped one
    ([`momentum_step_norms`][curvlib.optim.kernels.momentum_step_norms]).

    Returns:
        ``(step direction, new buffer)``; the buffer is ``None`` without momentum.
    """
    if momentum == 0.0:
        return (direction if clip == 1.0 else clip * direction), None
    if buffer is None:
        buffer = direction.mul(clip)
    else:
        buffer.mul_(momentum * clip).add_(direction, alpha=clip)
    if nesterov:
        return direction.mul(clip).add_(buffer, alpha=momentum), buffer
    return buffer, buffer


def layer_step(
    state: MutableMapping[Any, dict[str, Any]],
    group: Mapping[str, Any],
    layers: Sequence[CurvatureLayer],
    directions: Mapping[str, Tensor],
    want_deltas: bool,
    clip: float = 1.0,
    max_move: float | None = None,
) -> tuple[dict[str, Tensor], Tensor | None]:
    r"""Momentum and parameter update of one group's curvature layers.

    $\theta \leftarrow (1 - \eta\omega)\theta - \eta\,\text{step}$ with the
    momentum buffers in ``state[p]`` (decay only for decoupled weight decay),
    as [`momentum_direction`][curvlib.optim.kernels.momentum_direction] computes
    them, for all parameters at once: one ``torch._foreach`` call per operation
    instead of a few per parameter (fewer interpreter round trips on the CPU,
    fewer kernel launches on an accelerator). With ``max_move`` each layer's
    step and momentum buffers are scaled by its
    [`move_bounds`][curvlib.optim.kernels.move_bounds] factor.

    Args:
        state: The optimizer's per-parameter state.
        group: The ``param_group`` (``lr``, ``momentum``, ``nesterov``,
            ``weight_decay``, ``decoupled_weight_decay``).
        layers: The group's curvature layers.
        directions: Their preconditioned ``[W | b]`` directions.
        want_deltas: Whether to return the parameter changes.
        clip: The KL-clipping factor $\nu$ of the whole step (momentum included).
        max_move: $\rho$: the largest step of a layer's weights as a fraction of
            their norm; ``None`` bounds nothing.

    Returns:
        ``(deltas, bounds)``: the parameter changes as ``[W | b]`` matrices when
        ``want_deltas`` (else ``{}``), and the layers' bound factors $s_l$ in the
        order of ``layers`` (``None`` without ``max_move`` or layers).
    """
    lr, momentum = float(group["lr"]), float(group["momentum"])
    wd = float(group["weight_decay"]) if group["decoupled_weight_decay"] else 0.0
    nesterov = bool(group["nesterov"])
    params, parts = _split(layers, directions)
    if not params:  # torch's foreach kernels refuse empty lists
        return {}, None
    steps = _momentum_steps(state, params, parts, momentum, nesterov, clip)
    bounds = None
    if max_move is not None:
        counts = [len(layer.parameters) for layer in layers]
        bounds = move_bounds(params, steps, counts, lr, max_move)
        steps = _bounded(state, params, steps, _per_parameter(bounds, counts), momentum, nesterov)
    deltas: dict[str, Tensor] = {}
    if want_deltas:
        changes = iter([-lr * (step + wd * p) for p, step in zip(params, steps, strict=True)])
        for layer in layers:
            deltas[layer.name] = layer.to_matrix(*(next(changes) for _ in layer.parameters))
    steps = [s if s.dtype == p.dtype else s.to(p.dtype) for p, s in zip(params, steps, strict=True)]
    if wd:
        torch._foreach_mul_(params, 1.0 - lr * wd)
    torch._foreach_add_(params, steps, alpha=-lr)
    return deltas, bounds


def move_bounds(
    params: Sequence[Tensor],
    steps: Sequence[Tensor],
    counts: Sequence[int],
    lr: float,
    max_move: float,
) -> Tensor:
    r"""Per layer, the factor $s_l \le 1$ that keeps its step within $\rho$ of its weights' norm.

    $$s_l = \min\Big(1, \frac{\rho\,\|\theta_l\|}{\eta\,\|\text{step}_l\|}\Big),$$

    with $\theta_l = [W \mid b]$ the layer's parameters (before the step) and
    $\text{step}_l$ its clipped momentum step: the update $\eta s_l
    \text{step}_l$ moves the weights by at most $\rho$ times their norm, in
    the weights' own scale whatever the curvature metric says (a per-layer trust
    ratio, as LARS and LAMB bound their steps). 1 where the weights are zero (a
    layer started at zero has no scale to bound by), where the step is zero, and
    where the weights' norm is not a number; 0 where the step is infinite.

    Args:
        params: The layers' parameters, each layer's consecutive.
        steps: The parameters' steps (before the learning rate).
        counts: How many of ``params`` each layer has, in order.
        lr: $\eta$.
        max_move: $\rho$.

    Returns:
        $s_l$, one number per layer in the parameters' dtype (the widest of
        them), on their device (no host read).
    """
    size = len(counts)
    # One reduction for every parameter and step, one segmented sum for every layer.
    squares = torch.stack(torch._foreach_norm([*params, *steps])).square_()
    sums = squares.new_zeros(2 * size).index_add_(
        0, _layer_index(tuple(counts), squares.device), squares
    )
    sums.sqrt_()
    weights, moves = sums[:size], sums[size:]
    # A zero step gives inf (clamped to 1); zero or NaN weights NaN or 0 (kept at 1).
    bound = (weights * max_move).div_(moves * lr).clamp_(max=1.0)
    return torch.where(weights > 0, bound, 1.0)


@functools.lru_cache(maxsize=64)
def _layer_index(counts: tuple[int, ...], device: torch.device) -> Tensor:
    """Each parameter's layer, then each step's (offset by the layers): ``index_add``'s bins."""
    layers = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return torch.cat([layers, layers + len(counts)]).to(device)


def _per_parameter(bounds: Tensor, counts: Sequence[int]) -> list[Tensor]:
    """Each layer's 0-dimensional factor, once per parameter of the layer."""
    layer_of = _layer_index(tuple(counts), bounds.device)[: sum(counts)]
    return list(bounds.index_select(0, layer_of).unbind())


def _bounded(
    state: MutableMapping[Any, dict[str, Any]],
    params: Sequence[Tensor],
    steps: list[Tensor],
    factors: list[Tensor],
    momentum: float,
    nesterov: bool,
) -> list[Tensor]:
    """``steps`` times ``factors``, the momentum buffers scaled alike (in place)."""
    if momentum != 0.0:
        torch._foreach_mul_([state[p]["momentum_buffer"] for p in params], factors)
        if not nesterov:  # the steps are the buffers
            return steps
    return list(torch._foreach_mul(steps, factors))


def _split(
    layers: Sequence[CurvatureLayer], directions: Mapping[str, Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """Every parameter of ``layers`` and its part of the layer's ``[W | b]`` direction."""
    params: list[Tensor] = []
    parts: list[Tensor] = []
    for layer in layers:
        for p, d in zip(layer.parameters, layer.from_matrix(directions[layer.name]), strict=False):
            assert d is not None
            params.append(p)
            parts.append(d)
    return params, parts


def _momentum_steps(
    state: MutableMapping[Any, dict[str, Any]],
    params: Sequence[Tensor],
    directions: Sequence[Tensor],
    momentum: float,
    nesterov: bool,
    clip: float,
) -> list[Tensor]:
    """``momentum_direction`` of every parameter at once; updates the buffers in ``state``."""
    directions = list(directions)
    if momentum == 0.0:
        for p in params:
            state[p]["momentum_buffer"] = None
        return directions if clip == 1.0 else list(torch._foreach_mul(directions, clip))
    old = [i for i, p in enumerate(params) if state[p].get("momentum_buffer") is not None]
    if old:
        buffers = [state[params[i]]["momentum_buffer"] for i in old]
        torch._foreach_mul_(buffers, momentum * clip)
        torch._foreach_add_(buffers, [directions[i] for i in old], alpha=clip)
    for i in sorted(set(range(len(params))) - set(old)):  # the first step's buffers
        state[params[i]]["momentum_buffer"] = directions[i].mul(clip)
    buffers = [state[p]["momentum_buffer"] for p in params]
    if not nesterov:
        return buffers
    steps = directions if clip == 1.0 else list(torch._foreach_mul(directions, clip))
    return list(torch._foreach_add(steps, buffers, alpha=momentum))


def sgd_step(state: MutableMapping[Any, dict[str, Any]], group: Mapping[str, Any]) -> None:
    """The unpreconditioned fallback step on ``group["params"]`` (``torch.optim.SGD``'s update)."""
    lr, wd = float(group["lr"]), float(group["weight_decay"])
    decoupled = bool(group["decoupled_weight_decay"])
    for p in group["params"]:
        if p.grad is None:
            continue
        grad = p.grad if decoupled or not wd else p.grad.add(p, alpha=wd)
        step, state[p]["momentum_buffer"] = momentum_direction(
            grad, state[p].get("momentum_buffer"), float(group["momentum"]), bool(group["nesterov"])
        )
        if decoupled and wd:
            p.mul_(1.0 - lr * wd)
        p.add_(step, alpha=-lr)


def selected_layer_step(
    state: MutableMapping[Any, dict[str, Any]],
    group: Mapping[str, Any],
    layers: Sequence[CurvatureLayer],
    directions: Mapping[str, Tensor],
    clip: Tensor,
    ok: Tensor,
    max_move: float | None = None,
) -> Tensor | None:
    r"""[`layer_step`][curvlib.optim.kernels.layer_step] where ``ok``, else nothing, unread.

    The step of a deferred check
    ([`curvlib.optim.deferred`][curvlib.optim.deferred]): ``clip`` $\nu$ and
    ``ok`` are device tensors, and every change goes through a select or a
    factor that is exactly 1 (or 0) where ``ok`` is false, so that parameters
    and momentum buffers keep their values bit for bit there, whatever NaN or
    Inf the directions hold. Buffers created by a skipped step are zero, which
    the next step's momentum treats as no buffer.

    Args:
        state: The optimizer's per-parameter state.
        group: The ``param_group``.
        layers: The group's curvature layers.
        directions: Their preconditioned ``[W | b]`` directions.
        clip: 0-dimensional $\nu$.
        ok: 0-dimensional boolean: whether the step is taken.
        max_move: As for ``layer_step``.

    Returns:
        The layers' bound factors (1 where ``ok`` is false), ``None`` as for
        ``layer_step``; on the device, unread.
    """
    lr, momentum = float(group["lr"]), float(group["momentum"])
    wd = float(group["weight_decay"]) if group["decoupled_weight_decay"] else 0.0
    selected = {layer.name: torch.where(ok, directions[layer.name], 0.0) for layer in layers}
    params, parts = _split(layers, selected)
    if not params:
        return None
    taken = torch.where(ok, clip, 0.0)
    steps = list(torch._foreach_mul(parts, taken))  # ν d where ok, else 0
    if momentum != 0.0:
        keep = torch.where(ok, momentum * clip, 1.0)  # the old buffer's factor
        old = [i for i, p in enumerate(params) if state[p].get("momentum_buffer") is not None]
        if old:
            buffers = [state[params[i]]["momentum_buffer"] for i in old]
            torch._foreach_mul_(buffers, keep)
            torch._foreach_add_(buffers, [steps[i] for i in old])
        for i in sorted(set(range(len(params))) - set(old)):  # the first step's buffers
            state[params[i]]["momentum_buffer"] = steps[i].clone()
        buffers = [state[p]["momentum_buffer"] for p in params]
        if group["nesterov"]:
            steps = list(torch._foreach_add(steps, buffers, alpha=momentum))
        else:
            steps = buffers
    else:
        for param in params:
            state[param]["momentum_buffer"] = None
    bounds = None
    if max_move is not None:
        counts = [len(layer.parameters) for layer in layers]
        bounds = torch.where(ok, move_bounds(params, steps, counts, lr, max_move), 1.0)
        steps = _bounded(state, params, steps, _per_parameter(bounds, counts), momentum,
                         bool(group["nesterov"]))  # fmt: skip
    steps = [s if s.dtype == q.dtype else s.to(q.dtype) for q, s in zip(params, steps, strict=True)]
    if wd:
        torch._foreach_mul_(params, torch.where(ok, clip.new_full((), 1.0 - lr * wd), 1.0))
    rate = torch.where(ok, clip.new_full((), -lr), 0.0)
    torch._foreach_add_(params, torch._foreach_mul(steps, rate))
    return bounds


def selected_sgd_step(
    state: MutableMapping[Any, dict[str, Any]], group: Mapping[str, Any], ok: Tensor
) -> None:
    """[`sgd_step`][curvlib.optim.kernels.sgd_step] where ``ok``, else nothing, unread.

    As [`selected_layer_step`][curvlib.optim.kernels.selected_layer_step]:
    parameters and momentum buffers keep their values exactly where ``ok`` is false.
    """
    lr, wd = float(group["lr"]), float(group["weight_decay"])
    decoupled = bool(group["decoupled_weight_decay"])
    momentum = float(group["momentum"])
    one = torch.ones((), dtype=torch.float64, device=ok.device)
    rate = torch.where(ok, -lr * one, 0.0)
    for p in group["params"]:
        if p.grad is None:
            continue
        grad = p.grad if decoupled or not wd else p.grad.add(p, alpha=wd)
        grad = torch.where(ok, grad, 0.0)
        if momentum == 0.0:
            step, state[p]["momentum_buffer"] = grad, None
        else:
            buffer = state[p].get("momentum_buffer")
            if buffer is None:
                buffer = grad.clone()
            else:
                buffer.mul_(torch.where(ok, momentum * one, 1.0)).add_(grad)
            state[p]["momentum_buffer"] = buffer
            step = grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
        if decoupled and wd:
            p.mul_(torch.where(ok, (1.0 - lr * wd) * one, 1.0))
        p.add_(step * rate)
