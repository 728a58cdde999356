r"""The residual of a batch in the sample space of the ``EXACT`` statistics.

The ``EXACT`` statistics backpropagate the columns $s_{nk}$ of a factorisation
$H_n = \sum_k s_{nk}s_{nk}^\top$ of each sample's loss Hessian
(``LossCurvature.hessian_columns`` in ``curvlib.extract.losses``),
so the rows of the per-sample gradients are $u_{kn} = J_n^\top s_{nk}/\sqrt N$
and the Fisher is $F = U^\top U$. For the supported losses the output gradient
$\nabla_{f_n}\ell_n$ lies in the span of the columns, $\nabla_{f_n}\ell_n =
\sum_k \omega_{nk}s_{nk}$, so the gradient of the batch loss is $g = U^\top r$
with $r_{kn} = \omega_{nk}/\sqrt N$ (``mean``) or $\sqrt N\,\omega_{nk}$
(``sum``). This $r$ is what the function-space natural gradient
([`function_space_direction`][curvlib.approx.wide.function_space_direction])
needs:

* ``MSELoss``: $s_{nk} = \sqrt{2c}\,e_k$, $\omega_{nk} = \sqrt{2c}\,(f_{nk} - y_{nk})$;
* ``BCEWithLogitsLoss``: $s_{nk} = \sqrt{c\,p_k(1-p_k)}\,e_k$,
  $\omega_{nk} = \sqrt c\,(p_k - y_k)/\sqrt{p_k(1-p_k)}$;
* ``BCELoss`` on probabilities $p$: $s_{nk} = \sqrt{c/v_k}\,e_k$,
  $\omega_{nk} = \sqrt c\,(p_k - y_k)/\sqrt{v_k}$ with $v = \max(p(1-p), \epsilon)$
  as in torch's backward (``curvlib.extract.losses``),
  so it exists at $p = 0$ or $1$ too;
* ``CrossEntropyLoss`` (no spatial dimensions): $s_{ni} = \sqrt c\,(\sqrt{p_i}e_i -
  \sqrt{p_i}\,p)$, $\omega_{ni} = \sqrt c\,(p_i - y_i)/\sqrt{p_i}$; the columns
  satisfy $\sum_i\sqrt{p_i}\,s_{ni} = 0$, so the kernel has the null direction
  $\sqrt p$ per sample, returned as ``null_space``.

with $c$ the factor of $\ell_n$ ($1/D$ for ``mean``). The residual is
computed without the statistics, from the output and the targets alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from curvlib.extract.losses import BCE_EPSILON, LossCurvature


@dataclass(frozen=True)
class SampleResidual:
    r"""The residual $r$ and the known null directions of the kernel.

    Attributes:
        residual: $r$, ``[K, N]``, with $U^\top r$ the gradient of the batch loss.
        null_space: Unit vectors ``[K, N]`` spanning a null direction of every
            sample's rows (``CrossEntropyLoss``), or ``None``.
    """

    residual: Tensor
    null_space: Tensor | None


def sample_space_residual(loss_fn: nn.Module, output: Tensor, target: Tensor) -> SampleResidual:
    r"""$r$ with $U^\top r = \nabla_\theta L$ for the rows of ``EXACT`` statistics of this batch.

    Args:
        loss_fn: The loss module (``MSELoss``, ``BCEWithLogitsLoss``, ``BCELoss``,
            ``CrossEntropyLoss`` on ``[N, C]`` logits without ignored targets).
        output: The network output of the batch, ``[N, ...]``.
        target: Its targets.

    Returns:
        The residual, row $(k, n)$ in the order of the statistics.

    Raises:
        ValueError: For shapes that do not fit the loss, cross-entropy with
            spatial dimensions or ignored targets, or probabilities that
            underflow to 0 or 1 (use float64).
    """
    curvature = LossCurvature(loss_fn)
    curvature.check_shapes(output, target)
    output = output.detach()
    n = output.shape[0]
    scale = curvature.sample_scale(output)
    per_batch = 1.0 / math.sqrt(n) if loss_fn.reduction == "mean" else math.sqrt(n)
    null_space = None
    if isinstance(loss_fn, nn.MSELoss):
        omega = math.sqrt(2.0 * scale) * (output - target).reshape(n, -1)
    elif isinstance(loss_fn, nn.BCEWithLogitsLoss):
        probs = torch.sigmoid(output).reshape(n, -1)
        var = probs * (1.0 - probs)
        _check_positive(var, "p(1 - p)")
        omega = math.sqrt(scale) * (probs - target.reshape(n, -1)) / var.sqrt()
    elif isinstance(loss_fn, nn.BCELoss):
        probs = output.reshape(n, -1)
        var = ((1.0 - probs) * probs).clamp(min=BCE_EPSILON)
        omega = math.sqrt(scale) * (probs - target.reshape(n, -1)) / var.sqrt()
    else:
        assert isinstance(loss_fn, nn.CrossEntropyLoss)  # checked by check_shapes
        if output.dim() != 2 or bool((target == loss_fn.ignore_index).any()):
            raise ValueError(
                "sample_space_residual supports CrossEntropyLoss on [N, C] logits with every "
                "target counted (no spatial dimensions, no ignore_index)."
            )
        probs = output.softmax(dim=1)
        _check_positive(probs, "the softmax probabilities")
        onehot = F.one_hot(target, output.shape[1]).to(output.dtype)
        omega = math.sqrt(scale) * (probs - onehot) / probs.sqrt()
        null_space = probs.sqrt().T.contiguous()
    return SampleResidual(residual=(per_batch * omega).T.contiguous(), null_space=null_space)


def _check_positive(values: Tensor, what: str) -> None:
    if not bool((values > 0).all()):
        raise ValueError(
            f"Some of {what} underflow to 0: the residual in the Hessian's column basis does "
            "not exist there. Compute in float64, or use MSELoss."
        )
