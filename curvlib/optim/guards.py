r"""Checks that keep one bad step from costing a run: directions, step sizes, settings.

Before any parameter moves, the optimizer measures every curvature layer's
gradient $\nabla_l$ and preconditioned direction $\Delta_l = P_l\nabla_l$
([`measure_directions`][curvlib.optim.guards.measure_directions]) and skips the
step, with a warning that names the layers, when

1. **a direction is not finite**: $\langle\nabla_l, \Delta_l\rangle$ or
   $\|\Delta_l\|$ is NaN or Inf (an overflowing loss, a broken inverse). The
   inner product is formed again in float64 when the float32 one overflows,
   so a large but finite step is clipped as usual rather than skipped;
2. **a direction points uphill**: $\langle\nabla_l, \Delta_l\rangle <
   -\sqrt{\epsilon}\,\|\nabla_l\|\|\Delta_l\|$ ($\epsilon$ the machine epsilon
   of the gradient's dtype). $P_l$ is positive definite for every
   block-diagonal approximation, so a negative inner product beyond rounding
   means the inverse is numerically broken, and the KL clip, which needs a
   positive $\sum_l\eta_l^2\langle\nabla_l, \Delta_l\rangle$, cannot bound
   the step. An approximation that couples layers (``couples_layers = True``:
   the exact natural gradient, two-level corrections) may turn one layer's
   direction against its gradient while the whole step descends, so for its
   group the rule applies to the group's direction as a whole;
3. **a step is absurdly long for its gradient**: the KL-clipped direction is
   more than [`MAX_AMPLIFICATION`][curvlib.optim.guards.MAX_AMPLIFICATION]
   times longer than the gradient, $\nu\|\Delta_l\| > 10^6\|\nabla_l\|$ (for
   a group whose approximation couples layers: its whole step against its
   whole gradient).
   $\|\Delta_l\| \le \|\nabla_l\|/\lambda$ for a preconditioner that realises
   its damping $\lambda$, so this never fires for $\lambda \ge 10^{-6}$ unless
   the inverse is broken. Below that, gradient components outside the span of
   the recorded statistics (a sub-batch, all-zero layer inputs) are
   multiplied by $1/\lambda$ and the KL clip, which measures the step in
   $C + \lambda I$, believes them free: with $\lambda = 10^{-12}$ a network
   at loss 1.1 reached $5\cdot10^4$ in two steps. Raise the damping.

Skipped steps leave parameters, momentum and curvature as they were
(``opt.skipped_steps`` counts them). With ``lr="auto"`` or
``momentum="auto"`` rule 3 does not apply: the exact quadratic model bounds the
step ([`curvlib.optim.adaptive`][curvlib.optim.adaptive]).

Hyper-parameters edited in ``param_groups`` at run time are checked at every
``record()`` and ``step()`` ([`check_runtime_hyper`][curvlib.optim.guards.check_runtime_hyper]).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvlib.optim.groups import check_auto_or_positive, check_interval
from curvlib.optim.hyper import check_damping, check_positive

MAX_AMPLIFICATION = 1e6
r"""Largest ratio $\nu\|\Delta_l\| / \|\nabla_l\|$ of a step the optimizer takes."""


@dataclass(frozen=True)
class DirectionCheck:
    r"""One layer's gradient and preconditioned direction, measured.

    Attributes:
        inner: $\langle\nabla_l, \Delta_l\rangle$.
        grad_norm: $\|\nabla_l\|$.
        direction_norm: $\|\Delta_l\|$.
        eps: Machine epsilon of the gradient's dtype.
        inner_buffer: $\langle\nabla_l, b_l\rangle$ with the layer's momentum
            buffer $b_l$ (0 without one), for the KL clip of the whole step.
    """

    inner: float
    grad_norm: float
    direction_norm: float
    eps: float
    inner_buffer: float = 0.0

    @property
    def finite(self) -> bool:
        """Whether the inner product and the direction's norm are finite."""
        return math.isfinite(self.inner) and math.isfinite(self.direction_norm)

    @property
    def uphill(self) -> bool:
        r"""Whether $\langle\nabla_l, \Delta_l\rangle < -\sqrt\epsilon\|\nabla_l\|\|\Delta_l\|$."""
        return self.inner < -math.sqrt(self.eps) * self.grad_norm * self.direction_norm


def _dot(a: Tensor, b: Tensor) -> Tensor:
    dtype = torch.promote_types(a.dtype, b.dtype)
    return torch.vdot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype))


def measure_directions(
    grads: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor] | None = None,
    gradients_finite: Tensor | None = None,
    read_with: Sequence[Tensor] = (),
) -> tuple[dict[str, DirectionCheck] | None, list[list[float]]]:
    """Inner products and norms of every layer's gradient and direction (one host sync).

    They are formed in the tensors' own precision, four reductions per layer and
    one transfer for all layers; a layer where one of them overflows (a loss
    scaled far beyond its float range) is measured again in float64, so a large
    but finite step is clipped rather than taken for a broken one.

    Args:
        grads: Per-layer gradients ``[W | b]``.
        directions: Per-layer preconditioned directions.
        buffers: Per-layer momentum buffers ``[W | b]`` (layers without one left out).
        gradients_finite: A 0-dimensional boolean tensor
            ([`finite_flag`][curvlib.core.stats.finite_flag] of the gradients)
            read in the same transfer, so that a step whose gradients need no
            earlier check costs one synchronisation in all.
        read_with: 1-D tensors read in the same transfer (an inverse's checks,
            ``CurvatureEngine.pending_inverse``).

    Returns:
        A [`DirectionCheck`][curvlib.optim.guards.DirectionCheck] per layer of
        ``directions`` (``None`` when ``gradients_finite`` is false), and the
        values of each of ``read_with``.
    """
    names = list(directions)
    buffers = buffers or {}
    with_buffer = [n for n in names if n in buffers]
    # One call per kind of reduction where torch has one: the norms of all layers at once.
    scalars = [
        *(_dot(grads[n], directions[n]) for n in names),
        *(torch._foreach_norm([grads[n] for n in names]) if names else []),
        *(torch._foreach_norm([directions[n] for n in names]) if names else []),
        *(_dot(grads[n], buffers[n]) for n in with_buffer),
    ]
    if gradients_finite is not None:
        scalars.append(gradients_finite.to(scalars[0].dtype if scalars else torch.float64))
    if len({t.device for t in [*scalars, *read_with]}) > 1:
        scalars, read_with = [t.cpu() for t in scalars], [t.cpu() for t in read_with]
    parts = [t.to(torch.float64) for t in read_with]
    if scalars:  # stack promotes mixed dtypes
        parts.insert(0, torch.stack(scalars).to(torch.float64))
    flat = (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist() if parts else []
    extra: list[list[float]] = []
    for tensor in reversed(read_with):
        size = tensor.numel()
        extra.insert(0, flat[len(flat) - size :])
        del flat[len(flat) - size :]
    if gradients_finite is not None and not flat.pop():
        return None, extra
    size = len(names)
    inner_buffers = dict(zip(with_buffer, flat[3 * size :], strict=True))
    values = [
        [flat[i], flat[size + i], flat[2 * size + i], inner_buffers.get(name, 0.0)]
        for i, name in enumerate(names)
    ]
    checks = {}
    for name, row in zip(names, values, strict=True):
        if not all(math.isfinite(v) for v in row):  # overflowed: measure again in float64
            buffer = buffers.get(name)
            row = [
                float(v)
                for v in _measurements(
                    grads[name].double(),
                    directions[name].double(),
                    None if buffer is None else buffer.double(),
                )
            ]
        inner, grad_norm, direction_norm, inner_buffer = row
        eps = torch.finfo(grads[name].dtype).eps
        checks[name] = DirectionCheck(inner, grad_norm, direction_norm, eps, inner_buffer)
    return checks, extra


def _measurements(grad: Tensor, direction: Tensor, buffer: Tensor | None) -> list[Tensor]:
    """``<grad, direction>``, ``|grad|``, ``|direction|`` and ``<grad, buffer>`` (0 without one)."""
    return [
        _dot(grad, direction),
        torch.linalg.vector_norm(grad),
        torch.linalg.vector_norm(direction),
        _dot(grad, buffer) if buffer is not None else grad.new_zeros(()),
    ]


def combined(checks: Sequence[DirectionCheck]) -> DirectionCheck:
    """The check of several layers' directions taken as one vector."""
    return DirectionCheck(
        inner=sum(c.inner for c in checks),
        grad_norm=math.sqrt(sum(c.grad_norm**2 for c in checks)),
        direction_norm=math.sqrt(sum(c.direction_norm**2 for c in checks)),
        eps=max(c.eps for c in checks),
    )


def broken_directions(
    checks: Mapping[str, DirectionCheck], coupled: Sequence[Sequence[str]] = ()
) -> str | None:
    """Why the step must be skipped by rules 1–2 of the module docstring, or ``None``.

    Args:
        checks: Every layer's measurements.
        coupled: The layer names of each group whose approximation couples
            layers: rule 2 judges these groups' directions as a whole.
    """
    infinite = [name for name, c in checks.items() if not c.finite]
    if infinite:
        return f"the preconditioned direction of layers {infinite} is not finite (NaN/Inf)"
    in_coupled = {name for names in coupled for name in names}
    uphill = [name for name, c in checks.items() if name not in in_coupled and c.uphill]
    for names in coupled:
        present = [checks[name] for name in names if name in checks]
        if present and combined(present).uphill:
            uphill.extend(name for name in names if name in checks)
    if uphill:
        return (
            f"the preconditioned direction of layers {uphill} points uphill "
            "(<gradient, direction> < 0): the damped inverse is numerically broken"
        )
    return None


def absurd_steps(
    checks: Mapping[str, DirectionCheck], clip: float, coupled: Sequence[Sequence[str]] = ()
) -> str | None:
    r"""Why the step must be skipped by rule 3 of the module docstring, or ``None``.

    Args:
        checks: Every layer's measurements.
        clip: The KL-clip factor $\nu$ the step is taken with.
        coupled: As for [`broken_directions`][curvlib.optim.guards.broken_directions]:
            these groups' steps are measured against their whole gradient (a
            coarse correction may move a layer whose own gradient is zero).
    """
    in_coupled = {name for names in coupled for name in names}
    units = [([name], c) for name, c in checks.items() if name not in in_coupled]
    for names in coupled:
        present = [name for name in names if name in checks]
        if present:
            units.append((present, combined([checks[name] for name in present])))
    absurd: dict[str, float] = {}
    for names, c in units:
        if clip * c.direction_norm > MAX_AMPLIFICATION * c.grad_norm:
            ratio = clip * c.direction_norm / c.grad_norm if c.grad_norm > 0 else math.inf
            absurd.update(dict.fromkeys(names, ratio))
    if not absurd:
        return None
    worst = max(absurd.values())
    return (
        f"the step of layers {sorted(absurd)} would be up to {worst:.1e} times longer than "
        f"its gradient (more than {MAX_AMPLIFICATION:.0e}): the damping is too small for "
        "the curvature the statistics resolve; raise it"
    )


def check_runtime_hyper(group: Mapping[str, Any], where: str) -> None:
    """Check the hyper-parameters of a ``param_group`` as they stand now.

    Learning-rate schedulers may set ``lr`` to 0 (a warm-up from zero); any other
    value must be as in the constructor: finite, non-negative numbers (or
    ``"auto"``), a positive finite damping, positive integer intervals.

    Args:
        group: A ``param_group``.
        where: Prefix of the message, naming the group.

    Raises:
        ValueError: For an out-of-range or non-finite value.
        TypeError: For a value of the wrong type.
    """
    check_auto_or_positive(f"{where}lr", group["lr"], allow_zero=True)
    check_auto_or_positive(f"{where}momentum", group["momentum"], allow_zero=True)
    check_positive(f"{where}weight_decay", group["weight_decay"], allow_zero=True)
    if "damping" in group:
        check_damping(f"{where}damping", group["damping"])
        check_interval(f"{where}t_cov", group["t_cov"])
        check_interval(f"{where}t_inv", group["t_inv"])
