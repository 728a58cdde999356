"""Turn unfolded inputs and output gradients into the requested statistics.

Formulas and scaling: [`curvlib.core.conventions`][curvlib.core.conventions].
"""

from __future__ import annotations

from collections.abc import Set

import torch
from torch import Tensor

from curvlib.core.layout import CurvatureLayer
from curvlib.core.stats import (
    KroneckerFactors,
    LayerStatistics,
    PerSampleGrads,
    PerSampleIO,
    StatKind,
)


def layer_statistics(
    layer: CurvatureLayer,
    inputs: Tensor,
    grads: Tensor,
    required: Set[StatKind],
    dtype: torch.dtype | None = None,
    num_samples: int | None = None,
) -> LayerStatistics:
    r"""Compute the requested statistics of one layer.

    Args:
        layer: The curvature layer.
        inputs: $\bar a_{nt}$, ``[N, T, in_aug]``.
        grads: $g_{knt}$, ``[K, N, T, out]``.
        required: Which statistics to compute.
        dtype: Storage dtype of the results (default: that of ``inputs``).
        num_samples: The $N$ that ``G`` averages over (default: the rows of
            ``inputs``); differs only when coupled samples spread each sample's
            columns over all rows.

    Returns:
        The statistics; kinds not in ``required`` are ``None``.
    """
    inputs, grads = inputs.detach(), grads.detach()
    dtype = dtype or inputs.dtype
    n, t = inputs.shape[:2]
    kron = io = per_sample = None
    if StatKind.KRONECKER in required:
        a_flat = inputs.reshape(n * t, -1)
        g_flat = grads.reshape(-1, grads.shape[-1])
        A = (a_flat.T @ a_flat) / n
        G = (g_flat.T @ g_flat) / ((num_samples or n) * t)
        # Symmetric up to rounding; the approximations symmetrise where it matters.
        kron = KroneckerFactors(A=A.to(dtype), G=G.to(dtype))
    if StatKind.PER_SAMPLE_IO in required or StatKind.PER_SAMPLE_GRAD in required:
        io = PerSampleIO(inputs=inputs.to(dtype), output_grads=grads.to(dtype))
        if StatKind.PER_SAMPLE_GRAD in required:
            per_sample = PerSampleGrads(io.grads())
        if StatKind.PER_SAMPLE_IO not in required:
            io = None
    return LayerStatistics(layer=layer, kronecker=kron, io=io, grads=per_sample)
