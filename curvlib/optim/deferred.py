r"""A regular step that never waits for the device: the guards as device-side selects.

On a GPU every number the host reads waits for all queued work. The optimizer's
guards ([`curvlib.optim.guards`][curvlib.optim.guards]) and the KL clip need a
handful of numbers per step: the gradients' finiteness, and per layer
$\langle\nabla_l, \Delta_l\rangle$, $\|\nabla_l\|$, $\|\Delta_l\|$ and
$\langle\nabla_l, b_l\rangle$. Read on the host, that is one synchronisation
per step. With deferred checks
([`CurvatureOptimizer(deferred_checks=...)`][curvlib.optim.CurvatureOptimizer])
a step on which no approximation folds in statistics or rebuilds its inverse
reads nothing:

1. the measurements are formed in float64 on the device (so that no float32
   overflow can pass for a broken direction, as the host path's second
   measurement ensures);
2. the three rules of the guards and the KL-clip factor $\nu$ (momentum
   included, [`momentum_step_norms`][curvlib.optim.kernels.momentum_step_norms])
   are evaluated there, to one boolean ``ok`` and one number $\nu$;
3. the momentum buffers, the parameters, decoupled weight decay, the tracked
   buffer norms and the fallback step are updated through ``torch.where``
   selects: where ``ok`` is false every one of them keeps its value exactly,
   as a skipped step leaves them on the host path.

What a skipped step tells its user (the ``RuntimeWarning`` naming the layers,
``opt.skipped_steps``, ``last_stats["skipped"]`` and ``["kl_clip_factor"]``)
is read later, for all steps taken this way since the last read, in one
transfer: with the first check of the next statistics step (which reads the
device anyway), when one of those values is looked at, when the optimizer is
saved, or after [`MAX_PENDING`][curvlib.optim.deferred.MAX_PENDING] such steps.
The warning then names the step it was about.

The measurements in float64 and a sum over layers on the device make
$\nu$ differ from the host path's in the last bits, so a run with deferred
checks is not bitwise the run without them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlib.core.layout import CurvatureLayer
from curvlib.optim.guards import MAX_AMPLIFICATION, DirectionCheck, absurd_steps, broken_directions
from curvlib.optim.kernels import momentum_step_norms

MAX_PENDING = 1000
"""Steps with deferred checks after which their answers are read anyway (one read)."""


@dataclass(frozen=True)
class GroupPlan:
    r"""One curvature group, as a deferred step needs it.

    Attributes:
        names: Its layers, in the order of the directions.
        lr: Its learning rate $\eta$.
        momentum: Its momentum $\mu$.
        nesterov: Whether its momentum is Nesterov's.
        coupled: Whether its approximation couples layers (the guards judge
            the group's step as a whole).
    """

    names: tuple[str, ...]
    lr: float
    momentum: float
    nesterov: bool
    coupled: bool


@dataclass
class DeferredStep:
    r"""A step taken without reading the device: its guards' answer, read later.

    Attributes:
        step: The step's number (``engine.step_count`` when it ran).
        packed: ``[ok, ν, inner products, gradient norms, direction norms,
            fallback gradient norms]`` in float64, on the device, unread.
        names: The curvature layers, in the order of ``packed``.
        fallback: The names of the parameters that took the fallback step.
        eps: Machine epsilon of each layer's gradient.
        coupled: The layer names of each group whose approximation couples layers.
        skipped: Whether the step was skipped, once read.
        clip: Its KL-clip factor $\nu$ once read (``None`` if skipped).
        skipped_steps: The optimizer's count of skipped steps after this one, once read.
        bound: The smallest ``max_move`` factor of the step's layers, 0-dimensional
            on the device, unread (``None`` without ``max_move``).
        move_bound: ``bound`` once read.
    """

    step: int
    packed: Tensor
    names: tuple[str, ...]
    fallback: tuple[str, ...]
    eps: tuple[float, ...]
    coupled: tuple[tuple[str, ...], ...]
    skipped: bool | None = None
    clip: float | None = None
    skipped_steps: int | None = None
    bound: Tensor | None = None
    move_bound: float | None = None

    def reason(self, values: Sequence[float]) -> tuple[str, bool]:
        """Why the step was skipped, as the host path words it, from ``packed``'s values.

        Returns:
            The reason, and whether it lies in the directions (else in the gradients).
        """
        size = len(self.names)
        inner, grad_norms = values[2 : 2 + size], values[2 + size : 2 + 2 * size]
        direction_norms = values[2 + 2 * size : 2 + 3 * size]
        fallback_norms = values[2 + 3 * size :]
        bad = [n for n, g in zip(self.names, grad_norms, strict=True) if not math.isfinite(g)]
        bad += [
            n for n, g in zip(self.fallback, fallback_norms, strict=True) if not math.isfinite(g)
        ]
        if bad:
            return f"the gradient of {bad} contains NaN/Inf", False
        checks = {
            name: DirectionCheck(i, g, d, e)
            for name, i, g, d, e in zip(
                self.names, inner, grad_norms, direction_norms, self.eps, strict=True
            )
        }
        reason = broken_directions(checks, self.coupled) or absurd_steps(
            checks, values[1], self.coupled
        )
        # The device's sums may round differently from the host's at a rule's boundary.
        return reason or "its guards failed on the device, at a rule's boundary", True


@dataclass(frozen=True)
class DeviceGuards:
    r"""What [`device_guards`][curvlib.optim.deferred.device_guards] decided, on the device.

    Attributes:
        ok: 0-dimensional boolean: whether the step is taken.
        clip: 0-dimensional float64 $\nu$ (1 where the clip does not bind).
        norms: Per layer (in the directions' order) the tracked
            $\|b\|^2_{P^{-1}}$ of its momentum buffer after the step: the new
            buffer's, clipped, for the layers of groups with momentum where
            ``ok``; the one before otherwise.
        packed: The numbers a [`DeferredStep`][curvlib.optim.deferred.DeferredStep] keeps.
    """

    ok: Tensor
    clip: Tensor
    norms: Tensor
    packed: Tensor


_LENGTHS: dict[tuple[torch.device, tuple[int, ...]], Tensor] = {}
_MAX_LAYOUTS = 64


def segment_dots(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    r"""$[\langle a_i, b_i\rangle]_i$ in float64: the same few kernels for any number of pairs.

    Both sides are concatenated and widened once, multiplied once and summed by
    segment (``torch.segment_reduce``), instead of two conversions and a dot
    product per pair: on a GPU, where a step's time goes to launching kernels,
    that is about three launches per layer fewer. The segments' lengths are
    made on the device once per layout (fills, no copy from the host).
    """
    if not a:
        return torch.zeros(0, dtype=torch.float64)
    device = a[0].device
    sizes = tuple(t.numel() for t in a)
    lengths = _LENGTHS.get((device, sizes))
    if lengths is None:
        if len(_LENGTHS) >= _MAX_LAYOUTS:  # many models in one process: start over
            _LENGTHS.clear()
        lengths = torch.stack([torch.full((), n, dtype=torch.long, device=device) for n in sizes])
        _LENGTHS[(device, sizes)] = lengths
    flat_a = torch.cat([t.reshape(-1) for t in a]).double()
    flat_b = torch.cat([t.reshape(-1) for t in b]).double()
    return torch.segment_reduce(flat_a * flat_b, "sum", lengths=lengths)


def check_setting(value: object) -> None:
    """Refuse a ``deferred_checks`` setting other than ``True``, ``False`` or ``"auto"``.

    Raises:
        ValueError: Naming the value and the choices.
    """
    if value not in (True, False, "auto"):
        raise ValueError(f"deferred_checks must be True, False or 'auto', got {value!r}.")


def defers(setting: bool | str, layers: Sequence[CurvatureLayer]) -> bool:
    """Whether a step with nothing due defers its checks: ``"auto"`` does off the CPU."""
    if not layers:
        return False
    if setting == "auto":
        return layers[0].weight.device.type != "cpu"
    return bool(setting)


def device_clip(denominator: Tensor, kl_clip: float | None) -> Tensor:
    r"""$\nu = \min(1, \sqrt{c / d})$ on the device, 1 where $d$ is not positive and finite.

    [`clip_from_norms`][curvlib.optim.kernels.clip_from_norms] without a host
    read: ``denominator`` is the 0-dimensional $d = \sum_l \eta_l^2 n_l$.
    """
    one = torch.ones((), dtype=torch.float64, device=denominator.device)
    if kl_clip is None:
        return one
    usable = (denominator > 0) & torch.isfinite(denominator)
    return torch.where(usable, torch.clamp(torch.sqrt(kl_clip / denominator), max=1.0), one)


def _norms64(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    if not tensors:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=torch.float64)).to(device)


def tracked_norms(values: Sequence[float], device: torch.device) -> Tensor:
    """The tracked buffer norms as a float64 vector on ``device``, without a copy from the host.

    One fill per value (the number travels as a kernel argument), so that no
    transfer waits for the device's queue.
    """
    if not values:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.stack([torch.full((), v, dtype=torch.float64, device=device) for v in values])


def device_guards(
    grads: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    norms: Tensor,
    fallback_grads: Sequence[Tensor],
    groups: Sequence[GroupPlan],
    kl_clip: float | None,
    lr_squared: bool,
) -> DeviceGuards:
    r"""The guards and the KL clip of one step, evaluated without a host read.

    Args:
        grads: Per-layer gradients ``[W | b]`` (L2 weight decay added).
        directions: Per-layer preconditioned directions, in the groups' order.
        buffers: Per-layer momentum buffers ``[W | b]`` (layers without one left out).
        norms: Per layer of ``directions``, the tracked $\|b\|^2_{P^{-1}}$ of
            its buffer (0 without one), float64 on the directions' device.
        fallback_grads: The gradients of the parameters that take the fallback step.
        groups: The curvature groups, covering ``directions`` in order.
        kl_clip: $c$, or ``None``.
        lr_squared: Whether the clip's denominator carries $\eta^2$.
    """
    names = list(directions)
    device = directions[names[0]].device
    inner = segment_dots([grads[n] for n in names], [directions[n] for n in names])
    grad_norms = _norms64([grads[n] for n in names], device)
    direction_norms = _norms64([directions[n] for n in names], device)
    fallback_norms = _norms64(fallback_grads, device)
    zero = inner.new_zeros(())
    moving = [n for n in names if n in buffers]
    with_buffers = iter(
        segment_dots([grads[n] for n in moving], [buffers[n] for n in moving]).unbind()
    )
    inner_buffers = (
        torch.stack([next(with_buffers) if n in buffers else zero for n in names])
        if len(moving) < len(names)
        else torch.stack(list(with_buffers))
    )
    measured = torch.cat([inner, grad_norms, direction_norms, fallback_norms])

    denominator = zero
    buffer_norms: list[Tensor] = []
    start = 0
    units: list[tuple[slice, float, bool]] = []
    for group in groups:
        part = slice(start, start + len(group.names))
        start = part.stop
        mu, step_norms = group.momentum, inner[part]
        if mu == 0.0:
            buffer_norms.append(norms[part])
        else:  # the host path's formula, on every layer of the group at once
            step_norms, new = momentum_step_norms(
                inner[part], inner_buffers[part], norms[part], mu, group.nesterov
            )
            buffer_norms.append(new)
        rate = group.lr * group.lr if lr_squared else 1.0
        denominator = denominator + (step_norms * rate).sum()
        epsilons = {torch.finfo(grads[n].dtype).eps for n in group.names}
        if group.coupled:
            units.append((part, max(epsilons), True))
        elif len(epsilons) == 1:
            units.append((part, epsilons.pop(), False))
        else:
            units.extend(
                (slice(i, i + 1), torch.finfo(grads[names[i]].dtype).eps, False)
                for i in range(part.start, part.stop)
            )
    clip = device_clip(denominator, kl_clip)

    bad = [~torch.isfinite(measured).all()]
    for part, eps, combined in units:
        i, g, d = inner[part], grad_norms[part], direction_norms[part]
        if combined:
            i, g, d = i.sum(), torch.linalg.vector_norm(g), torch.linalg.vector_norm(d)
        bad.append((i < -math.sqrt(eps) * g * d).any())
        bad.append((clip * d > MAX_AMPLIFICATION * g).any())
    ok = ~torch.stack(bad).any()
    square = clip * clip  # the clipped buffer's norm; groups without momentum keep theirs
    after = torch.cat(
        [n * square if g.momentum != 0.0 else n for n, g in zip(buffer_norms, groups, strict=True)]
    )
    after = torch.where(ok, after, norms)
    packed = torch.cat([torch.stack([ok.double(), clip]), measured])
    return DeviceGuards(ok, clip, after, packed)


def read_pending(steps: Sequence[DeferredStep], head: Sequence[Tensor] = ()) -> list[float]:
    """``head``'s numbers, then every pending step's ``packed`` and ``bound``, in one transfer.

    Returns:
        The values of ``head`` (as floats), followed by each step's in order
        (``packed``'s numbers, then ``bound``'s where it has one).
    """
    parts = [t.reshape(-1).double() for t in head]
    for step in steps:
        parts.append(step.packed)
        if step.bound is not None:
            parts.append(step.bound.reshape(1).double())
    if not parts:
        return []
    if len({t.device for t in parts}) > 1:
        parts = [t.cpu() for t in parts]
    return torch.cat(parts).tolist()
