r"""Which statistics are averaged over the ranks and which are gathered.

Every rank records the statistics of its own samples. What each rank then
holds is what one process would have recorded on the union of the ranks'
batches, as if they were micro-batches of one step
([`merge_statistics`][curvlib.core.stats.merge_statistics]):

* **means** over samples (the Kronecker factors $A$, $G$ and the diagonal) are
  all-reduced as averages weighted by each rank's number of samples,
  $\bar S = \sum_r n_r S_r / \sum_r n_r$: one message of the size of the
  factors, whatever the world size;
* **per-sample** tensors (inputs and output gradients ``PER_SAMPLE_IO``,
  per-sample gradients ``PER_SAMPLE_GRAD``, the pooled ``CROSS_LAYER``
  statistics) are all-gathered and concatenated along the sample axis in rank
  order, so every rank receives every other rank's samples: each rank's
  traffic and memory grow with the *global* number of samples, and so does
  the work of the approximation (exact natural gradient's $O(m^2P + m^3)$
  with $m = \sum_r n_r$). This is the price of the exact global estimate that
  EKFAC's eigenvalues, KPSVD, Deflation, Lanczos, the natural-gradient
  solvers and the coarse spaces of two-level methods need;
* except where only one rank reads them: when a layer's update is split
  (``DataParallel(split_inverses=True)``) and the approximation reads that
  layer's per-sample statistics only in its owner's fit (its
  ``owner_statistics``), they are gathered to the owner alone, and the other
  ranks hold them with no samples (empty along the sample axis). Each rank then
  receives the other ranks' samples of its own layers only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor

from curvlib.core.stats import (
    CurvatureStatistics,
    KroneckerFactors,
    LayerStatistics,
    PerSampleGrads,
    PerSampleIO,
    PooledIO,
    StatKind,
)


@dataclass(frozen=True)
class SampleTensor:
    """A per-sample tensor, the axis along which it lists the samples, its layer and kind."""

    tensor: Tensor
    axis: int
    layer: str
    kind: StatKind

    @property
    def count(self) -> int:
        """The number of samples it holds."""
        return int(self.tensor.shape[self.axis])


def split_statistics(stats: CurvatureStatistics) -> tuple[list[Tensor], list[SampleTensor]]:
    """The means and the per-sample tensors of ``stats``, in a fixed order.

    The order (layers as in ``stats.layers``, fields as in
    [`LayerStatistics`][curvlib.core.LayerStatistics]) is the same on every rank
    whose statistics have the same layers and kinds; ``join_statistics`` reads it.
    """
    means: list[Tensor] = []
    samples: list[SampleTensor] = []
    for name, s in stats.layers.items():
        if s.kronecker is not None:
            means += [s.kronecker.A, s.kronecker.G]
        if s.diagonal is not None:
            means.append(s.diagonal)
        if s.io is not None:
            io = StatKind.PER_SAMPLE_IO
            samples += [
                SampleTensor(s.io.inputs, 0, name, io),
                SampleTensor(s.io.output_grads, 1, name, io),
            ]
        if s.grads is not None:
            samples.append(SampleTensor(s.grads.grads, 1, name, StatKind.PER_SAMPLE_GRAD))
        if s.pooled is not None:
            pooled = StatKind.CROSS_LAYER
            samples += [
                SampleTensor(s.pooled.inputs, 0, name, pooled),
                SampleTensor(s.pooled.output_grads, 1, name, pooled),
            ]
    return means, samples


def join_statistics(
    template: CurvatureStatistics, means: list[Tensor], samples: list[Tensor], num_samples: int
) -> CurvatureStatistics:
    """Statistics shaped like ``template`` holding the given tensors.

    ``means`` and ``samples`` are in the order ``split_statistics`` lists them.
    """
    mean_iter: Iterator[Tensor] = iter(means)
    sample_iter: Iterator[Tensor] = iter(samples)
    layers: dict[str, LayerStatistics] = {}
    for name, s in template.layers.items():
        kron = None
        if s.kronecker is not None:
            kron = KroneckerFactors(next(mean_iter), next(mean_iter), s.kronecker.num_positions)
        diagonal = None if s.diagonal is None else next(mean_iter)
        io = None if s.io is None else PerSampleIO(next(sample_iter), next(sample_iter))
        grads = None if s.grads is None else PerSampleGrads(next(sample_iter))
        pooled = None if s.pooled is None else PooledIO(next(sample_iter), next(sample_iter))
        layers[name] = LayerStatistics(
            layer=s.layer, kronecker=kron, io=io, grads=grads, diagonal=diagonal, pooled=pooled
        )
    return CurvatureStatistics(layers, template.fisher_type, num_samples)
