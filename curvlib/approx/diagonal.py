r"""Diagonal approximations: the diagonal of the GGN or of the empirical Fisher.

The statistic is ``StatKind.DIAGONAL``, $\operatorname{diag}(F_\text{layer})$
laid out as the layer's $[W \mid b]$ matrix; which matrix's diagonal it is
follows the extractor's flavour ([`FisherType`][curvlib.core.FisherType]):

* ``EXACT``: the exact GGN diagonal, $\frac1N\sum_n \operatorname{diag}(J_n^\top
  H_n J_n)$, backpropagating one column per network output (BackPACK's
  ``DiagGGNExact``);
* ``MC``: its Monte-Carlo estimate with sampled targets (``DiagGGNMC``);
* ``EMPIRICAL``: the diagonal of the empirical Fisher, the mean of the squared
  per-sample gradients (BackPACK's ``SumGradSquared`` divided by $N$).

Scaling follows [`curvlib.core.conventions`][curvlib.core.conventions], so a
diagonal and a Kronecker approximation of the same network are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from curvlib.approx.base import (
    InverseDraft,
    LayerBlock,
    LayerInverse,
    LayerwiseApprox,
    running_average,
    settle_condition,
)
from curvlib.core.layout import KRONECKER_KINDS, NORM_KINDS, CurvatureLayer, LayerKind
from curvlib.core.stats import LayerStatistics, StatKind


class _ScaleInverse:
    """Entry-wise scaling by the damped inverse diagonal, with its exact condition number."""

    def __init__(self, scale: Tensor, condition_number: float) -> None:
        self.scale, self.condition_number = scale, condition_number

    def __call__(self, mat: Tensor) -> Tensor:
        return mat.to(self.scale.dtype) * self.scale


class _DiagonalBlock(LayerBlock):
    cheap_condition = True

    def __init__(self, out_dim: int, in_dim: int, dtype: torch.dtype | None) -> None:
        super().__init__(out_dim, in_dim, dtype)
        self.diagonal: Tensor | None = None

    def update(self, stats: LayerStatistics, rho: float) -> None:
        assert stats.diagonal is not None
        self.diagonal = running_average(self.diagonal, self._cast(stats.diagonal), rho)

    def _diag(self) -> Tensor:
        if self.diagonal is None:
            raise RuntimeError("Diagonal block has no estimate yet: update() first.")
        return self.diagonal

    def matvec(self, mat: Tensor) -> Tensor:
        diag = self._diag()
        return mat.to(diag.dtype) * diag

    def inverse(self, damping: float) -> LayerInverse:
        built = self.draft_inverse(damping).read()
        assert built is not None  # this block's drafts cannot fail
        return built

    def draft_inverse(self, damping: float) -> InverseDraft:
        """The inverse, and its condition number to read (``condition_number``)."""
        scale = 1.0 / (self._diag() + damping)
        ratio = self._condition(damping).reshape(1).double()
        return InverseDraft(
            ratio,
            lambda v: _ScaleInverse(scale, v[0]),
            lambda: _ScaleInverse(scale, math.nan),
            settle_condition,
        )

    def _condition(self, damping: float) -> Tensor:
        diag = self._diag()
        return (diag.max() + damping) / (diag.min() + damping)

    def to_dense(self) -> Tensor:
        return torch.diag(self._diag().flatten())

    def trace(self) -> Tensor:
        """$O(P)$."""
        return self._diag().sum()

    def logdet(self, damping: float) -> Tensor:
        r"""$\sum \log(d + \lambda)$, $O(P)$."""
        return torch.log(self._diag() + damping).sum()

    def sample(
        self, damping: float, num_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""$z \oslash \sqrt{d + \lambda}$ for standard normal $z$: $O(P)$ per draw."""
        diag = self._diag()
        z = torch.randn(
            (num_samples, *diag.shape), generator=generator, dtype=diag.dtype, device=diag.device
        )
        return z * torch.rsqrt(diag + damping)

    def condition_number(self, damping: float) -> float:
        r"""Exact: $(\max d + \lambda) / (\min d + \lambda)$, $O(P)$."""
        return float(self._condition(damping))

    def state_dict(self) -> dict[str, Any]:
        return {"diagonal": self._diag().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.diagonal = state["diagonal"].clone()


class Diagonal(LayerwiseApprox):
    r"""The diagonal of the Fisher block of every layer, normalisation layers included.

    $C = \operatorname{diag}(d)$ with $d$ the running average of the
    ``DIAGONAL`` statistics; the damped inverse is $(d + \lambda)^{-1}$ entry
    by entry, so damping is exact Tikhonov damping. Choose the matrix with the
    extractor's ``fisher_type``: ``EXACT`` or ``MC`` for the GGN diagonal,
    ``EMPIRICAL`` for the empirical Fisher's (see the module docstring).

    Unlike the Kronecker approximations it also covers the affine parameters
    $[\gamma \mid \beta]$ of ``BatchNorm1d``/``2d``/``3d`` in eval mode,
    ``LayerNorm`` and ``GroupNorm`` (the ``NORM_KINDS``, listed in
    ``supported_kinds``). In train mode
    BatchNorm couples the samples and no per-sample diagonal exists: the
    extractor refuses the step with a message naming the layer.

    Cost per layer of $P$ parameters: update, inverse and apply $O(P)$; the
    statistics cost one backward of the sampled (``MC``), all $D$ (``EXACT``)
    or the data (``EMPIRICAL``) loss-Hessian columns plus, for convolutions, the
    per-sample gradients in chunks.

    Example:
        >>> Diagonal().required_stats == frozenset({StatKind.DIAGONAL})
        True

    Args:
        decay: Upper bound of the running-average weight on the old estimate.
        dtype: Storage dtype of the diagonals (default: that of the statistics).

    References:
        F. Dangel, F. Kunstner and P. Hennig, "BackPACK: Packing more into
        backprop", ICLR 2020 (``DiagGGNExact``, ``DiagGGNMC``, ``SumGradSquared``).
    """

    required_stats: ClassVar[frozenset[StatKind]] = frozenset({StatKind.DIAGONAL})
    supported_kinds: ClassVar[frozenset[LayerKind]] = KRONECKER_KINDS | NORM_KINDS
    default_damping: ClassVar[float] = 3e-3
    r"""The optimizer's $\lambda$ for this approximation when no ``damping`` is given.

    ``PreconditionedOptimizer(model, Diagonal(), loss_fn=...)`` damps with
    ``DampingWarmup(3e-3, samples=400)``, ten times KFAC's $\lambda$
    ([`default_damping`][curvlib.optim.defaults.default_damping]). KFAC's
    $\lambda$ is split between two factors and adds to products of their
    eigenvalues; here it is the whole shift of every coordinate. At KFAC's
    $3\cdot10^{-4}$ the coordinates whose diagonal lies below $\lambda$
    dominate the first, KL-clipped steps, single coordinates move by up to
    $0.3$ a step, and the Diagonal stalled on all five tasks of the
    convergence benchmark (both autoencoders at the mean image). Chosen on the
    benchmark's five tasks over three seeds, 2026-12-05 (the table is on the
    Diagonal's page of the docs, the outputs in
    ``benchmarks/results/experiments/diagonal_defaults/``).
    """

    def work_cost(self, layer: CurvatureLayer) -> float:
        r"""$P_l = d_\text{out} d_\text{in}$: its inverse is elementwise."""
        return float(layer.out_dim * layer.in_dim_aug)

    def _make_block(self, out_dim: int, in_dim: int) -> LayerBlock:
        return _DiagonalBlock(out_dim, in_dim, self.dtype)
