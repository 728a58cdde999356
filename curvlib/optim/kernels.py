r"""Small functional kernels of the optimizer: KL-clipping and the momentum update."""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import Tensor


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
    if isinstance(lr, Mapping):
        denom = 0.0
        for name, d in directions.items():
            inner_l = float((grads[name] * d).sum())
            denom += inner_l * lr[name] * lr[name] if lr_squared else inner_l
    else:
        inner = sum(float((grads[name] * d).sum()) for name, d in directions.items())
        denom = inner * lr * lr if lr_squared else inner
    if not denom > 0.0 or not math.isfinite(denom):
        return 1.0
    return min(1.0, math.sqrt(clip / denom))


def momentum_direction(
    direction: Tensor, buffer: Tensor | None, momentum: float, nesterov: bool
) -> tuple[Tensor, Tensor | None]:
    """Heavy-ball or Nesterov momentum on a direction, as ``torch.optim.SGD`` applies it.

    Returns:
        ``(step direction, new buffer)``; the buffer is ``None`` without momentum.
    """
    if momentum == 0.0:
        return direction, None
    if buffer is None:
        buffer = direction.clone()
    else:
        buffer.mul_(momentum).add_(direction)
    if nesterov:
        return direction.add(buffer, alpha=momentum), buffer
    return buffer, buffer
