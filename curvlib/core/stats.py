r"""The statistics handed from the extractors to the approximations.

Shapes and scaling follow [`curvlib.core.conventions`][curvlib.core.conventions]:
``N`` samples (after sub-sampling), ``K`` backpropagated columns per sample
(MC samples, exact loss-Hessian columns, or one for the empirical Fisher),
``T`` output positions of the layer (one for a plain ``Linear``), ``out`` rows
and ``in_aug`` columns of the $[W \mid b]$ matrix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property

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
        DIAGONAL: The diagonal of the layer's curvature block,
            $\frac1N\sum_{k,n} \bar W_{kn} \odot \bar W_{kn}$ as an
            ``[out, in_aug]`` matrix (the GGN diagonal for ``MC``/``EXACT``, the
            empirical Fisher's for ``EMPIRICAL``). ``BatchNorm`` layers have it and
            ``PER_SAMPLE_GRAD``, and answer ``PER_SAMPLE_IO`` with their
            per-sample gradients (each channel has its own input: no factors).
        CROSS_LAYER: Position-pooled per-sample inputs and output gradients
            ([`PooledIO`][curvlib.core.stats.PooledIO]), from which
            [`cross_layer_factors`][curvlib.core.stats.cross_layer_factors]
            forms the cross-layer Kronecker factors $E[\bar a_l \bar a_m^\top]$,
            $E[g_l g_m^\top]$ of any two layers; computed only when asked.
    """

    KRONECKER = "kronecker"
    PER_SAMPLE_IO = "per_sample_io"
    PER_SAMPLE_GRAD = "per_sample_grad"
    DIAGONAL = "diagonal"
    CROSS_LAYER = "cross_layer"


@dataclass(frozen=True)
class KroneckerFactors:
    r"""Kronecker factors of one layer's curvature block, $F \approx G \otimes A$.

    Attributes:
        A: Input factor, ``[in_aug, in_aug]``; sums over output positions.
        G: Output-gradient factor, ``[out, out]``; averages over output positions.
        num_positions: $T$, the layer's output positions per sample (1 for a
            ``Linear`` layer); read by position-dependent damping rules.
    """

    A: Tensor
    G: Tensor
    num_positions: int = 1


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
        r"""Per-sample gradient matrices $\bar W_{kn} = \sum_t g_{knt} \bar a_{nt}^\top$.

        Returns:
            ``[K, N, out, in_aug]``.
        """
        return torch.einsum("knto,nti->knoi", self.output_grads, self.inputs)

    def squared_grads_sum(self) -> Tensor:
        r"""$\sum_{k,n} \bar W_{kn} \odot \bar W_{kn}$ without storing every $\bar W_{kn}$.

        With one position per sample the sum factorises,
        $\sum_{k,n} (g_{kn} \odot g_{kn})(\bar a_n \odot \bar a_n)^\top$: one
        GEMM, no per-sample matrix. With several positions (convolutions) the
        per-sample matrices are built for chunks of samples, at most about
        $2^{24}$ entries at once: $O(K N T d_\text{out} d_\text{in})$ time.

        Returns:
            ``[out, in_aug]``.
        """
        inputs, grads = self.inputs, self.output_grads
        k, n, t, out = grads.shape
        if t == 1:
            return torch.einsum("kno,ni->oi", grads[:, :, 0].square(), inputs[:, 0].square())
        total = grads.new_zeros(out, inputs.shape[-1])
        chunk = max(1, _CHUNK_ELEMENTS // (k * out * inputs.shape[-1]))
        for start in range(0, n, chunk):
            stop = start + chunk
            mats = torch.einsum("knto,nti->knoi", grads[:, start:stop], inputs[start:stop])
            total += mats.square().sum((0, 1))
        return total


_CHUNK_ELEMENTS = 1 << 24
"""Per-sample gradient entries ``squared_grads_sum`` builds at once (64 MiB in float32)."""


@dataclass(frozen=True)
class PerSampleGrads:
    r"""Per-sample gradient matrices of one layer.

    Attributes:
        grads: $\bar W_{kn}$, ``[K, N, out, in_aug]``; the layer's curvature block
            is $\frac1N \sum_{k,n} \operatorname{vec}(\bar W_{kn})
            \operatorname{vec}(\bar W_{kn})^\top$.
    """

    grads: Tensor


@dataclass(frozen=True)
class PooledIO:
    r"""Per-sample layer inputs and output gradients pooled over the output positions.

    Layers with different numbers of output positions $T_l$ are made
    comparable sample by sample: inputs are *averaged* and output gradients
    *summed* over positions,

    $$\hat a_n = \frac1T\sum_t \bar a_{nt}, \qquad \hat g_{kn} = \sum_t g_{knt},$$

    so that $\hat g_{kn}\hat a_n^\top$ approximates the per-sample gradient
    $\sum_t g_{knt}\bar a_{nt}^\top$; it is exact for ``Linear`` layers
    ($T = 1$) and for the bias column (constant input 1) of every layer. For
    one-position layers the diagonal factors equal the KFAC factors; for
    convolutions they are the pooled ("reduce") factors, not KFC's.

    Attributes:
        inputs: $\hat a_n$, ``[N, in_aug]``.
        output_grads: $\hat g_{kn}$, ``[K, N, out]``.
    """

    inputs: Tensor
    output_grads: Tensor


def cross_layer_factors(first: PooledIO, second: PooledIO) -> KroneckerFactors:
    r"""The cross-layer Kronecker factors of two layers from their pooled statistics.

    $A_{lm} = \frac1N\sum_n \hat a_{n,l}\hat a_{n,m}^\top$ (``[in_l, in_m]``) and
    $G_{lm} = \frac1N\sum_{k,n} \hat g_{kn,l}\hat g_{kn,m}^\top$ (``[out_l, out_m]``),
    so that the cross block of the Fisher is approximated by $G_{lm} \otimes A_{lm}$.

    Raises:
        ValueError: If the two layers have different numbers of samples or columns.
    """
    if first.output_grads.shape[:2] != second.output_grads.shape[:2]:
        raise ValueError(
            "Cross-layer factors need the same samples and columns (K, N) in both layers, got "
            f"{tuple(first.output_grads.shape[:2])} and {tuple(second.output_grads.shape[:2])}."
        )
    n = first.inputs.shape[0]
    a = first.inputs.T @ second.inputs / n
    g = torch.einsum("kno,knp->op", first.output_grads, second.output_grads) / n
    return KroneckerFactors(A=a, G=g)


@dataclass(frozen=True)
class LayerStatistics:
    """Everything extracted for one layer on one step; unrequested kinds are ``None``.

    Attributes:
        layer: The layer these statistics belong to.
        kronecker: Kronecker factors, if requested.
        io: Per-sample inputs and output gradients, if requested.
        grads: Per-sample gradients, if requested.
        diagonal: The block's diagonal as an ``[out, in_aug]`` matrix, if requested.
        pooled: Position-pooled per-sample inputs and output gradients, if requested.
    """

    layer: CurvatureLayer
    kronecker: KroneckerFactors | None = None
    io: PerSampleIO | None = None
    grads: PerSampleGrads | None = None
    diagonal: Tensor | None = None
    pooled: PooledIO | None = None

    def kinds(self) -> frozenset[StatKind]:
        """The statistic kinds this layer's statistics hold."""
        present = {
            StatKind.KRONECKER: self.kronecker,
            StatKind.PER_SAMPLE_IO: self.io,
            StatKind.PER_SAMPLE_GRAD: self.grads,
            StatKind.DIAGONAL: self.diagonal,
            StatKind.CROSS_LAYER: self.pooled,
        }
        return frozenset(kind for kind, value in present.items() if value is not None)

    def tensors(self) -> list[Tensor]:
        """Every extracted tensor of this layer."""
        tensors: list[Tensor] = []
        if self.kronecker is not None:
            tensors += [self.kronecker.A, self.kronecker.G]
        if self.io is not None:
            tensors += [self.io.inputs, self.io.output_grads]
        if self.grads is not None:
            tensors.append(self.grads.grads)
        if self.diagonal is not None:
            tensors.append(self.diagonal)
        if self.pooled is not None:
            tensors += [self.pooled.inputs, self.pooled.output_grads]
        return tensors


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

    def scaled(self, factor: float) -> CurvatureStatistics:
        """The statistics of output gradients multiplied by ``factor``.

        ``G`` and the diagonal scale by ``factor**2``, output gradients and
        per-sample gradients by ``factor``; inputs and ``A`` are unchanged. Used
        to undo a loss scale (``GradScaler``, gradient accumulation) that
        empirical statistics see.
        """
        if factor == 1.0:
            return self
        layers = {
            name: LayerStatistics(
                layer=s.layer,
                kronecker=None
                if s.kronecker is None
                else KroneckerFactors(
                    A=s.kronecker.A,
                    G=s.kronecker.G * factor**2,
                    num_positions=s.kronecker.num_positions,
                ),
                io=None
                if s.io is None
                else PerSampleIO(inputs=s.io.inputs, output_grads=s.io.output_grads * factor),
                grads=None if s.grads is None else PerSampleGrads(s.grads.grads * factor),
                diagonal=None if s.diagonal is None else s.diagonal * factor**2,
                pooled=None
                if s.pooled is None
                else PooledIO(s.pooled.inputs, s.pooled.output_grads * factor),
            )
            for name, s in self.layers.items()
        }
        return CurvatureStatistics(layers, self.fisher_type, self.num_samples)

    def is_finite(self) -> bool:
        """Whether every extracted tensor is free of NaN and Inf.

        One ``aminmax`` per tensor and a single host synchronisation decide it
        (``all_finite`` in ``curvlib.core.stats``); the answer is cached (the
        engine and the approximation both ask).
        """
        return self._finite

    @cached_property
    def _finite(self) -> bool:
        return all_finite(t for s in self.layers.values() for t in s.tensors())

    def finite_flag(self) -> Tensor | None:
        """``is_finite``'s answer as a device tensor, unread.

        [`finite_flag`][curvlib.core.stats.finite_flag] of every tensor, for a
        caller that reads it with other numbers in one transfer and then tells
        the answer with ``known_finite``.
        """
        return finite_flag(t for s in self.layers.values() for t in s.tensors())

    def known_finite(self, finite: bool) -> None:
        """Record ``is_finite``'s answer, read from ``finite_flag`` by the caller."""
        self.__dict__["_finite"] = finite


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every tensor is free of NaN and Inf.

    The smallest and largest entry of each tensor (one ``aminmax`` pass, which
    cannot overflow, and in which a NaN propagates) and a single host
    synchronisation replace an elementwise check (on the optimizer's hot path,
    and for the statistics).
    """
    flag = finite_flag(tensors)
    return flag is None or bool(flag)


def finite_flag(tensors: Iterable[Tensor]) -> Tensor | None:
    """``all_finite`` as a 0-dimensional boolean tensor, without a host synchronisation.

    ``None`` when there is no floating-point entry. For callers that read it
    together with other numbers, in one transfer.
    """
    extremes = [
        value
        for t in tensors
        if t.numel() and t.is_floating_point()
        for value in torch.aminmax(t.detach())
    ]
    if not extremes:
        return None
    if len({t.device for t in extremes}) > 1:
        extremes = [t.cpu() for t in extremes]
    return torch.isfinite(torch.stack(extremes)).all()


def merge_statistics(parts: Sequence[CurvatureStatistics]) -> CurvatureStatistics:
    """Combine the statistics of several micro-batches into those of their union.

    Kronecker factors and diagonals are averaged with weights ``num_samples``; per-sample
    tensors are concatenated along the sample axis.

    Raises:
        ValueError: If the parts disagree in flavour or layers, or ``parts`` is empty.
    """
    if not parts:
        raise ValueError("merge_statistics needs at least one part.")
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if any(
        p.fisher_type is not first.fisher_type or set(p.layers) != set(first.layers) for p in parts
    ):
        raise ValueError("Cannot merge statistics of different flavours or layers.")
    total = sum(p.num_samples for p in parts)
    layers: dict[str, LayerStatistics] = {}
    for name, head in first.layers.items():
        items = [p.layers[name] for p in parts]
        weights = [p.num_samples / total for p in parts]
        kron = None
        if head.kronecker is not None:
            factors = [s.kronecker for s in items if s.kronecker is not None]
            kron = KroneckerFactors(
                A=_weighted_sum([f.A for f in factors], weights),
                G=_weighted_sum([f.G for f in factors], weights),
                num_positions=factors[0].num_positions,
            )
        io = None
        if head.io is not None:
            io = PerSampleIO(
                inputs=torch.cat([s.io.inputs for s in items]),  # type: ignore[union-attr]
                output_grads=torch.cat([s.io.output_grads for s in items], dim=1),  # type: ignore[union-attr]
            )
        grads = None
        if head.grads is not None:
            grads = PerSampleGrads(torch.cat([s.grads.grads for s in items], dim=1))  # type: ignore[union-attr]
        diagonal = None
        if head.diagonal is not None:
            diagonal = _weighted_sum([s.diagonal for s in items], weights)  # type: ignore[misc]
        pooled = None
        if head.pooled is not None:
            pooled = PooledIO(
                inputs=torch.cat([s.pooled.inputs for s in items]),  # type: ignore[union-attr]
                output_grads=torch.cat([s.pooled.output_grads for s in items], dim=1),  # type: ignore[union-attr]
            )
        layers[name] = LayerStatistics(
            layer=head.layer, kronecker=kron, io=io, grads=grads, diagonal=diagonal, pooled=pooled
        )
    return CurvatureStatistics(layers, first.fisher_type, total)


def _weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    total = tensors[0] * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        total = total + weight * tensor
    return total
