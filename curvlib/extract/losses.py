r"""Loss functions: validation and the factorised per-sample loss Hessian.

BackPACK's own loss extensions scale by the batch reduction and take
``BCEWithLogitsLoss`` only with ``[N, 1]`` outputs and binary targets (and
have no ``BCELoss``). curvlib builds the backpropagated columns $s_{nk}$ here
instead, for outputs of any shape and soft targets, with the scaling of
[`curvlib.core.conventions`][curvlib.core.conventions]: $\sum_k s_{nk}
s_{nk}^\top = H_n$, the Hessian of the loss as written for one sample.

``BCELoss`` takes probabilities $p$ (a network that ends in a sigmoid) and is
the negative log-likelihood of a Bernoulli in $p$. Its Hessian
$y/p^2 + (1-y)/(1-p)^2$ depends on the target; the statistics use its
expectation under $y \sim \operatorname{Bernoulli}(p)$, the Fisher
$1/(p(1-p))$ per output entry. torch clamps $\log p$ and $\log(1-p)$ at
$-100$ in the forward pass, and its backward divides by
$\max(p(1-p), \epsilon)$ with $\epsilon$ = ``BCE_EPSILON`` (the float32 value
of ``1e-12`` that ``binary_cross_entropy_backward`` uses). curvlib divides by
the same $v = \max(p(1-p), \epsilon)$ everywhere, so that at $p = 0$ or $1$
nothing is Inf or NaN and the gradients are exactly torch's:

* ``EXACT``: $s_{nk} = \sqrt{c / v_k}\, e_k$;
* ``MC``: $s_{nk} = \sqrt{c}\,(p_k - \tilde y_k)/v_k$ with $\tilde y \sim
  \operatorname{Bernoulli}(p)$, the gradient of the sampled loss (zero where
  $p$ is exactly 0 or 1, since the draw then equals $p$);
* ``EMPIRICAL``: $c\,(p_k - y_k)/v_k$, the gradient torch's autograd gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from curvlib.core.stats import FisherType

SUPPORTED_LOSSES = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss, nn.BCELoss)

BCE_EPSILON = float(torch.tensor(1e-12, dtype=torch.float32))
r"""$\epsilon$ of torch's ``binary_cross_entropy_backward``: $p(1-p)$ is clamped below at it.

torch declares it ``constexpr float EPSILON = 1e-12``, so it is the float32
value of ``1e-12`` (9.99999996e-13) in every dtype.
"""


def check_loss_module(loss_fn: object) -> nn.Module:
    """Check that ``loss_fn`` is a supported loss module with supported options.

    Args:
        loss_fn: The loss the user passes.

    Returns:
        The same object, typed as a module.

    Raises:
        TypeError: For a functional or unsupported loss.
        ValueError: For options whose curvature curvlib does not model.
    """
    names = ", ".join(f"torch.nn.{cls.__name__}()" for cls in SUPPORTED_LOSSES)
    if not isinstance(loss_fn, nn.Module):
        raise TypeError(
            f"loss_fn must be a loss module, got {loss_fn!r}. Functional losses cannot be "
            f"extended; pass one of {names} and call it as loss_fn(output, target)."
        )
    if not isinstance(loss_fn, SUPPORTED_LOSSES):
        raise TypeError(f"Unsupported loss {type(loss_fn).__name__}; supported: {names}.")
    if loss_fn.reduction not in ("mean", "sum"):
        raise ValueError(
            f"{type(loss_fn).__name__}(reduction={loss_fn.reduction!r}) is not supported: "
            "use reduction='mean' or 'sum'."
        )
    if isinstance(loss_fn, nn.CrossEntropyLoss) and (
        loss_fn.weight is not None or loss_fn.label_smoothing != 0.0
    ):
        raise ValueError(
            "CrossEntropyLoss with class weights or label smoothing is not supported: "
            "its Hessian is not that of a categorical likelihood."
        )
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) and (
        loss_fn.weight is not None or loss_fn.pos_weight is not None
    ):
        raise ValueError(
            "BCEWithLogitsLoss with weight or pos_weight is not supported: its Hessian "
            "is not that of a Bernoulli likelihood."
        )
    if isinstance(loss_fn, nn.BCELoss) and loss_fn.weight is not None:
        raise ValueError(
            "BCELoss with weight is not supported: its Hessian is not that of a Bernoulli "
            "likelihood. Drop weight, or weight the samples through the batch."
        )
    return loss_fn


@dataclass(frozen=True)
class LossCurvature:
    """The per-sample factorisation of one loss module's Hessian.

    Attributes:
        loss_fn: The loss module.
    """

    loss_fn: nn.Module

    def check_shapes(self, output: Tensor, target: Tensor) -> None:
        """Raise a ``ValueError`` that names the fix when shapes do not fit the loss.

        The loss module's options are checked again here
        ([`check_loss_module`][curvlib.extract.losses.check_loss_module]), on
        every call: a ``reduction``, ``label_smoothing`` or ``weight`` changed
        after construction is refused, not silently modelled with the old one.
        """
        check_loss_module(self.loss_fn)
        name = type(self.loss_fn).__name__
        if output.dim() < 2:
            raise ValueError(
                f"{name}: the model output must have a batch dimension and at least one "
                f"more, got shape {tuple(output.shape)}; reshape it to [N, ...]."
            )
        if isinstance(self.loss_fn, nn.CrossEntropyLoss):
            if target.dtype.is_floating_point:
                raise ValueError(
                    "CrossEntropyLoss: class-probability targets are not supported; "
                    "pass integer class indices of shape [N, ...]."
                )
            if target.shape != output.shape[:1] + output.shape[2:]:
                raise ValueError(
                    f"CrossEntropyLoss: targets of shape {tuple(target.shape)} do not fit "
                    f"logits of shape {tuple(output.shape)}; expected "
                    f"{tuple(output.shape[:1] + output.shape[2:])}."
                )
        elif target.shape != output.shape:
            raise ValueError(
                f"{name}: target shape {tuple(target.shape)} differs from output shape "
                f"{tuple(output.shape)}; they must match (no broadcasting)."
            )

    def entries_per_sample(self, output: Tensor) -> int:
        """$D$: the number of terms a ``mean`` reduction averages within one sample."""
        if isinstance(self.loss_fn, nn.CrossEntropyLoss):
            return math.prod(output.shape[2:])
        return math.prod(output.shape[1:])

    def sample_scale(self, output: Tensor) -> float:
        r"""The factor $c$ of $\ell_n$: $1/D$ for ``mean`` and $1$ for ``sum``."""
        if self.loss_fn.reduction == "mean":
            return 1.0 / self.entries_per_sample(output)
        return 1.0

    def sample_weights(self, output: Tensor, target: Tensor) -> Tensor | float:
        r"""The factor $c$ of every sample's loss, per position where targets are ignored.

        Statistics average $\ell_n$ over the $N$ samples of the batch, with
        $\ell_n$ equal to $N$ times sample $n$'s share of the batch loss torch
        computes. Without ignored targets this is $c = 1/D$ for ``mean`` and
        $1$ for ``sum`` ([`sample_scale`][curvlib.extract.losses.LossCurvature.sample_scale]).
        For ``CrossEntropyLoss``, the targets equal to ``ignore_index`` (by
        default -100) contribute nothing, and ``mean`` divides by the number $K$
        of the others: each kept position then carries $c = N/K$ (``mean``) or
        $1$ (``sum``), each ignored one $0$; the statistics are the curvature of
        the loss actually minimised. With every target ignored, torch's ``mean``
        is NaN: so are the weights, and the step is skipped as for any NaN.

        Args:
            output: The network output of the whole batch ``[N, ...]``.
            target: Its targets.

        Returns:
            A float, or for ``CrossEntropyLoss`` a tensor ``[N, *spatial]`` (equal
            to the float where every target counts, up to rounding).
        """
        if not isinstance(self.loss_fn, nn.CrossEntropyLoss):
            return self.sample_scale(output)
        # Always per position: whether any target is ignored is known on the device only.
        kept = target != self.loss_fn.ignore_index
        weights = kept.to(output.dtype)
        if self.loss_fn.reduction == "mean":
            weights = weights * (output.shape[0] / kept.sum().to(output.dtype))
        return weights

    def batch_to_sample(self, num_samples: int) -> float:
        r"""Factor turning a gradient of the batch loss into per-sample gradients of $\ell_n$."""
        return float(num_samples) if self.loss_fn.reduction == "mean" else 1.0

    def batch_hessian_form(self, output: Tensor, target: Tensor, u: Tensor, v: Tensor) -> Tensor:
        r"""$u^\top H_L v$ with $H_L = \nabla^2_f L$, the Hessian of the *batch* loss.

        $L$ is the loss module applied to the whole batch, as the training loop
        computes it: $L = \frac1N\sum_n \ell_n$ for ``mean`` and $\sum_n \ell_n$
        for ``sum`` (so, unlike the statistics, ``sum`` is not divided by $N$).
        Per entry or position the Hessian is $2$ (``MSELoss``), $p(1-p)$
        (``BCEWithLogitsLoss``), $\operatorname{diag}(p) - pp^\top$ over the
        classes (``CrossEntropyLoss``, whose targets equal to ``ignore_index``
        contribute nothing and are not counted by ``mean``) or, for ``BCELoss``
        on probabilities $p$, $y/p^2 + (1-y)/(1-p)^2$ as torch's double backward
        computes it, $(p^2 - 2py + y)/((p + 10^{-12})^2 (1 - p + 10^{-12})^2)$
        (finite at $p = 0$ or $1$); ``mean`` divides by the number of terms
        torch averages. Only ``BCELoss``'s Hessian depends on the target; the
        others see it only through ``ignore_index``.

        Args:
            output: The network output ``[N, ...]``.
            target: The targets the loss module received.
            u: An output-shaped tangent, e.g. a Jacobian-vector product $J d$.
            v: Another one.

        Returns:
            A scalar tensor.
        """
        output = output.detach()
        if isinstance(self.loss_fn, nn.CrossEntropyLoss):
            probs = output.softmax(dim=1)
            form = (probs * u * v).sum(1) - (probs * u).sum(1) * (probs * v).sum(1)
            kept = target != self.loss_fn.ignore_index
            total = (form * kept).sum()
            count = kept.sum().clamp(min=1)
        else:
            if isinstance(self.loss_fn, nn.MSELoss):
                total = 2.0 * (u * v).sum()
            elif isinstance(self.loss_fn, nn.BCELoss):
                total = (_bce_hessian(output, target.detach()) * u * v).sum()
            else:
                probs = torch.sigmoid(output)
                total = (probs * (1.0 - probs) * u * v).sum()
            count = torch.tensor(output.numel())
        if self.loss_fn.reduction == "mean":
            return total / count.to(total.dtype)
        return total

    def hessian_columns(
        self,
        output: Tensor,
        target: Tensor,
        fisher_type: FisherType,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        weights: Tensor | float | None = None,
    ) -> Tensor:
        r"""Columns $s_{nk}$ with $\sum_k s_{nk} s_{nk}^\top \approx H_n$.

        Args:
            output: Network output ``[N, ...]`` (detached inside).
            target: Targets (data targets; used by ``EMPIRICAL`` only).
            fisher_type: ``EXACT`` factorises $H_n$; ``MC`` draws ``mc_samples``
                columns with expectation $H_n$; ``EMPIRICAL`` returns $\nabla \ell_n$.
            mc_samples: Number of Monte-Carlo samples for ``MC``.
            generator: Random generator for ``MC``.
            weights: The samples' factors $c$ (``sample_weights`` of the whole
                batch, restricted to these samples); ``None``: computed from
                ``output`` and ``target``.

        Returns:
            ``[K, N, *output.shape[1:]]``.
        """
        output = output.detach()
        scale = self.sample_weights(output, target) if weights is None else weights
        if fisher_type is FisherType.EMPIRICAL:
            return self._gradient(output, target.detach(), scale).unsqueeze(0)
        if fisher_type is FisherType.MC:
            return self._sampled(output, mc_samples, generator, scale)
        return self._exact(output, scale)

    def _gradient(self, output: Tensor, target: Tensor, scale: Tensor | float) -> Tensor:
        if isinstance(self.loss_fn, nn.MSELoss):
            return 2.0 * scale * (output - target)
        if isinstance(self.loss_fn, nn.BCEWithLogitsLoss):
            return scale * (torch.sigmoid(output) - target)
        if isinstance(self.loss_fn, nn.BCELoss):
            return scale * (output - target) / _bernoulli_variance(output)
        probs = output.softmax(dim=1)
        if isinstance(scale, Tensor):  # ignored targets (weight 0) may lie outside the classes
            target = target.masked_fill(scale == 0, 0)
        onehot = F.one_hot(target, output.shape[1]).movedim(-1, 1).to(output.dtype)
        return _per_position(scale) * (probs - onehot)

    def _sampled(
        self,
        output: Tensor,
        mc_samples: int,
        generator: torch.Generator | None,
        scale: Tensor | float,
    ) -> Tensor:
        shape = (mc_samples, *output.shape)
        if isinstance(scale, Tensor):
            factor: Tensor | float = (scale / mc_samples).sqrt().unsqueeze(1)
        else:
            factor = math.sqrt(scale / mc_samples)
        if isinstance(self.loss_fn, nn.MSELoss):
            noise = torch.randn(
                shape, generator=generator, dtype=output.dtype, device=output.device
            )
            return math.sqrt(2.0) * factor * noise
        if isinstance(self.loss_fn, nn.BCEWithLogitsLoss):
            probs = torch.sigmoid(output)
            # Bernoulli draws as uniform < p: several times faster than torch.bernoulli on CPU.
            uniform = torch.rand(
                shape, generator=generator, dtype=output.dtype, device=output.device
            )
            return factor * (probs - (uniform < probs).to(output.dtype))
        if isinstance(self.loss_fn, nn.BCELoss):
            uniform = torch.rand(
                shape, generator=generator, dtype=output.dtype, device=output.device
            )
            draws = (uniform < output).to(output.dtype)
            return factor * (output - draws) / _bernoulli_variance(output)
        probs = output.softmax(dim=1)
        flat = probs.movedim(1, -1).reshape(-1, output.shape[1])  # [N * P, C]
        # Class k wins the race of E_k / p_k with E_k ~ Exp(1) with probability p_k:
        # exact categorical draws without a host synchronisation (torch.multinomial
        # refuses NaN rows, which took a check on the host to avoid). Zero
        # probabilities never win (E is kept off zero, where 0 / 0 would); NaN
        # rows draw some class and stay NaN through probs, so their statistics
        # are rejected as usual.
        race = torch.empty(
            (mc_samples, *flat.shape), dtype=flat.dtype, device=flat.device
        ).exponential_(generator=generator)
        race.clamp_min_(torch.finfo(flat.dtype).tiny)
        draws = (flat / race).argmax(dim=-1)  # [M, N * P]
        # One-hot by comparison: F.one_hot reads the draws' range on the host.
        classes = torch.arange(output.shape[1], device=draws.device)
        onehot = (draws.unsqueeze(-1) == classes).to(output.dtype)  # [M, N * P, C]
        onehot = onehot.reshape(mc_samples, *probs.movedim(1, -1).shape).movedim(-1, 2)
        return factor * (probs.unsqueeze(0) - onehot)

    def _exact(self, output: Tensor, scale: Tensor | float) -> Tensor:
        n = output.shape[0]
        if isinstance(self.loss_fn, nn.CrossEntropyLoss):
            return self._exact_categorical(output, scale)
        assert not isinstance(scale, Tensor), "only CrossEntropyLoss ignores targets"
        d = math.prod(output.shape[1:])
        if isinstance(self.loss_fn, nn.MSELoss):
            diag = torch.full((n, d), 2.0 * scale, dtype=output.dtype, device=output.device)
        elif isinstance(self.loss_fn, nn.BCELoss):
            diag = scale / _bernoulli_variance(output.reshape(n, d))
        else:
            probs = torch.sigmoid(output).reshape(n, d)
            diag = scale * probs * (1.0 - probs)
        # Column k of sample n is sqrt(h_nk) e_k: a [D, N, D] diagonal embedding.
        cols = torch.diag_embed(diag.sqrt()).transpose(0, 1)
        return cols.reshape(d, *output.shape)

    @staticmethod
    def _exact_categorical(output: Tensor, scale: Tensor | float) -> Tensor:
        # Per position: S = (diag(sqrt p) - p sqrt(p)^T) with S S^T = diag(p) - p p^T.
        n, c = output.shape[:2]
        spatial = output.shape[2:]
        positions = math.prod(spatial)
        probs = output.softmax(dim=1).reshape(n, c, positions)  # [N, C, P]
        sqrt_p = probs.sqrt()
        eye = torch.eye(c, dtype=output.dtype, device=output.device)
        # block[n, p][j, i] = column i of position p, entry j.
        block = eye * sqrt_p.transpose(1, 2).unsqueeze(-2) - torch.einsum(
            "ncp,nip->npci", probs, sqrt_p
        )
        if isinstance(scale, Tensor):
            block = scale.reshape(n, positions, 1, 1).sqrt() * block
        else:
            block = math.sqrt(scale) * block  # [N, P, C(entry), C(column)]
        # Columns are indexed by (column class i, position p); entries live at position p only.
        cols = torch.zeros(c, positions, n, c, positions, dtype=output.dtype, device=output.device)
        idx = torch.arange(positions, device=output.device)
        cols[:, idx, :, :, idx] = block.permute(1, 3, 0, 2)
        return cols.reshape(c * positions, n, c, *spatial)


def _per_position(scale: Tensor | float) -> Tensor | float:
    """Per-position weights ``[N, *spatial]`` broadcast over the class axis."""
    return scale.unsqueeze(1) if isinstance(scale, Tensor) else scale


def _bernoulli_variance(probs: Tensor) -> Tensor:
    r"""$v = \max(p(1-p), \epsilon)$, the divisor of torch's ``BCELoss`` backward."""
    return ((1.0 - probs) * probs).clamp(min=BCE_EPSILON)


def _bce_hessian(probs: Tensor, target: Tensor) -> Tensor:
    """Per-entry Hessian of ``BCELoss`` (summed) as torch's double backward computes it."""
    eps = 1e-12  # torch's binary_cross_entropy_double_backward (a double here)
    numerator = probs * probs - 2.0 * probs * target + target
    return numerator / ((probs + eps).square() * (1.0 - probs + eps).square())
