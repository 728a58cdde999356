r"""The statistics handed from the extractors to the approximations.

Shapes and scaling follow [`curvlib.core.conventions`][curvlib.core.conventions]:
``N`` samples (after sub-sampling), ``K`` backpropagated columns per sample
(MC samples, exact loss-Hessian columns, or one for the empirical Fisher),
``T`` output positions of the layer (one for a plain ``Linear``), ``out`` rows
and ``in_aug`` columns of the $[W \mid b]$ matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import Tensor

from curvlib.core.layout import CurvatureLayer


class FisherType(Enum):
    """Which curvature matrix the statistics estimate.

    Attributes:
        MC: The Fisher (equal to the GGN for these losses), with targets sampled
            from the model's predictive distribution inside the same backward.
        EXACT: The GGN with the exact loss Hessian (type-2 Fisher); backpropagates
            one column per network output, so it is expensive for many outputs.
        EMPIRICAL: The empirical Fisher, from the per-sample gradients of the loss
            with the data targets.
    """

    MC = "mc"
    EXACT = "exact"
    EMPIRICAL = "empirical"


class StatKind(Enum):
    r"""The kinds of statistics an approximation can ask the extractor for.

    Attributes:
        KRONECKER: The Kronecker factors $A$ and $G$ of every layer.
        PER_SAMPLE_IO: Per-sample layer inputs $\bar a_{nt}$ and output
            gradients $g_{knt}$ (per output position for convolutions).
        PER_SAMPLE_GRAD: Per-sample gradient matrices $\bar W_{kn}$; costs an
            ``N x out x in`` tensor per layer, so ask only when needed.
    """

    KRONECKER = "kronecker"
    PER_SAMPLE_IO = "per_sample_io"
    PER_SAMPLE_GRAD = "per_sample_grad"


@dataclass(frozen=True)
class KroneckerFactors:
    r"""Kronecker factors of one layer's curvature block, $F \approx G \\otimes A$.

    Attributes:
        A: Input factor, ``[in_aug, in_aug]``; sums over output positions.
        G: Output-gradient factor, ``[out, out]``; averages over output positions.
    """

    A: Tensor
    G: Tensor


@dataclass(frozen=True)
class PerSampleIO:
    r"""Per-sample layer inputs and output gradients of one layer.

    Attributes:
        inputs: $\bar a_{nt}$ with the trailing one when the layer has a bias,
            ``[N, T, in_aug]``.
        output_grads: $g_{knt}$, ``[K, N, T, out]``.
    """

    inputs: Tensor
    output_grads: Tensor

    def grads(self) -> Tensor:
        r"""Per-sample gradient matrices $\bar W_{kn} = \\sum_t g_{knt} \bar a_{nt}^\top$.

        Returns:
            ``[K, N, out, in_aug]``.
        """
        return torch.einsum("knto,nti->knoi", self.output_grads, self.inputs)


@dataclass(frozen=True)
class PerSampleGrads:
    r"""Per-sample gradient matrices of one layer.

    Attributes:
        grads: $\bar W_{kn}$, ``[K, N, out, in_aug]``; the layer's curvature block
            is $\frac1N \\sum_{k,n} \\operatorname{vec}(\bar W_{kn})
            \\operatorname{vec}(\bar W_{kn})^\top$.
    """

    grads: Tensor


@dataclass(frozen=True)
class LayerStatistics:
    """Everything extracted for one layer on one step; unrequested kinds are ``None``.

    Attributes:
        layer: The layer these statistics belong to.
        kronecker: Kronecker factors, if requested.
        io: Per-sample inputs and output gradients, if requested.
        grads: Per-sample gradients, if requested.
    """

    layer: CurvatureLayer
    kronecker: KroneckerFactors | None = None
    io: PerSampleIO | None = None
    grads: PerSampleGrads | None = None


@dataclass(frozen=True)
class CurvatureStatistics:
    """Statistics of all curvature layers from one statistics step.

    Attributes:
        layers: Per-layer statistics keyed by the layer's qualified name.
        fisher_type: The flavour they estimate.
        num_samples: ``N``, the number of samples the statistics average over.
    """

    layers: Mapping[str, LayerStatistics] = field(repr=False)
    fisher_type: FisherType
    num_samples: int

    def __getitem__(self, name: str) -> LayerStatistics:
        return self.layers[name]

    def is_finite(self) -> bool:
        """Whether every extracted tensor is free of NaN and Inf."""
        for stats in self.layers.values():
            tensors: list[Tensor] = []
            if stats.kronecker is not None:
                tensors += [stats.kronecker.A, stats.kronecker.G]
            if stats.io is not None:
                tensors += [stats.io.inputs, stats.io.output_grads]
            if stats.grads is not None:
                tensors.append(stats.grads.grads)
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                return False
        return True
