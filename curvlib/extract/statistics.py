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
    PooledIO,
    StatKind,
)
from curvlib.linalg.factors import factor_gram, gram, gram_blocks

BATCHNORM_KINDS = frozenset({StatKind.DIAGONAL, StatKind.PER_SAMPLE_GRAD, StatKind.PER_SAMPLE_IO})
"""The statistic kinds a normalisation layer (``NORM_KINDS``) answers (``batchnorm_statistics``)."""


def widened(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``tensor`` in ``dtype`` where that is wider (autocast's float16/bfloat16 activations).

    The statistics are then formed in the storage dtype, not rounded to it afterwards;
    a narrower ``dtype`` is applied to the results.
    """
    if dtype is None or not tensor.is_floating_point():
        return tensor
    wider = torch.finfo(dtype).bits > torch.finfo(tensor.dtype).bits
    return tensor.to(dtype) if wider else tensor


def _kronecker(
    input_gram: Tensor, grads: Tensor, n: int, dtype: torch.dtype, num_samples: int | None
) -> KroneckerFactors:
    r"""$A$ from $\sum_{n,t} \bar a_{nt} \bar a_{nt}^\top$ (scaled in place) and $G$ from ``grads``.

    The scaling of [`curvlib.core.conventions`][curvlib.core.conventions]: $A$
    over the $N$ samples, $G$ over ``num_samples`` (default $N$) and the $T$
    positions.
    """
    t = grads.shape[2]
    g_flat = grads.reshape(-1, grads.shape[-1])
    # In place: the products are new tensors, and a second pass would allocate.
    A = input_gram.div_(n)
    G = gram(g_flat, gram_blocks(g_flat)).div_((num_samples or n) * t)
    # Symmetric up to rounding (exactly where computed in blocks); the approximations
    # symmetrise where it matters.
    return KroneckerFactors(A=A.to(dtype), G=G.to(dtype), num_positions=t)


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
    inputs, grads = widened(inputs.detach(), dtype), widened(grads.detach(), dtype)
    dtype = dtype or inputs.dtype
    n, t = inputs.shape[:2]
    kron = io = per_sample = None
    if StatKind.KRONECKER in required:
        kron = _kronecker(factor_gram(inputs.reshape(n * t, -1)), grads, n, dtype, num_samples)
    if StatKind.PER_SAMPLE_IO in required or StatKind.PER_SAMPLE_GRAD in required:
        io = PerSampleIO(inputs=inputs.to(dtype), output_grads=grads.to(dtype))
        if StatKind.PER_SAMPLE_GRAD in required:
            per_sample = PerSampleGrads(io.grads())
        if StatKind.PER_SAMPLE_IO not in required:
            io = None
    diagonal = None
    if StatKind.DIAGONAL in required:
        if per_sample is not None:
            diagonal = per_sample.grads.square().sum((0, 1)) / n
        else:
            diagonal = (PerSampleIO(inputs, grads).squared_grads_sum() / n).to(dtype)
    pooled = None
    if StatKind.CROSS_LAYER in required:
        # Inputs averaged, output gradients summed over positions (see PooledIO).
        pooled = PooledIO(inputs=inputs.mean(1).to(dtype), output_grads=grads.sum(2).to(dtype))
    return LayerStatistics(
        layer=layer, kronecker=kron, io=io, grads=per_sample, diagonal=diagonal, pooled=pooled
    )


def kronecker_statistics(
    layer: CurvatureLayer,
    input_gram: Tensor,
    rows: int,
    grads: Tensor,
    dtype: torch.dtype | None = None,
    num_samples: int | None = None,
) -> LayerStatistics:
    r"""``layer_statistics`` of ``KRONECKER`` alone, from the inputs' Gram matrix.

    For a layer whose $\sum_{n,t} \bar a_{nt} \bar a_{nt}^\top$ costs less
    than unfolding its input (a transposed convolution:
    [`transposed_conv_input_gram`][curvlib.extract.layers.transposed_conv_input_gram]).

    Args:
        layer: The curvature layer.
        input_gram: $\sum_{n,t} \bar a_{nt} \bar a_{nt}^\top$, ``[in_aug, in_aug]``.
        rows: $N$, the samples of the inputs (``inputs.shape[0]`` of ``layer_statistics``).
        grads: $g_{knt}$, ``[K, N, T, out]``.
        dtype: Storage dtype of the results (default: that of ``input_gram``).
        num_samples: As for ``layer_statistics``.
    """
    grads = widened(grads.detach(), dtype)
    kron = _kronecker(input_gram.clone(), grads, rows, dtype or input_gram.dtype, num_samples)
    return LayerStatistics(layer=layer, kronecker=kron)


def batchnorm_statistics(
    layer: CurvatureLayer,
    per_sample: Tensor,
    required: Set[StatKind],
    dtype: torch.dtype | None = None,
) -> LayerStatistics:
    r"""The statistics a normalisation layer has: per-sample gradients and the diagonal.

    For ``BATCHNORM``, ``LAYERNORM`` and ``GROUPNORM`` alike, each normalised
    feature's $[\gamma_c \mid \beta_c]$ has its own input, so there is no
    shared-input factorisation: ``PER_SAMPLE_IO`` is answered with the
    per-sample gradients (``grads``), which is what an approximation asking for it
    per unit needs (the unit-wise natural gradient).

    Args:
        layer: The normalisation layer.
        per_sample: Its per-sample gradient matrices, ``[K, N, C, in_aug]``.
        required: Which statistics to compute (``DIAGONAL``, ``PER_SAMPLE_GRAD``,
            ``PER_SAMPLE_IO``).
        dtype: Storage dtype of the results (default: that of ``per_sample``).
    """
    per_sample = per_sample.detach().to(dtype or per_sample.dtype)
    n = per_sample.shape[1]
    diagonal = per_sample.square().sum((0, 1)) / n if StatKind.DIAGONAL in required else None
    wants_grads = required & {StatKind.PER_SAMPLE_GRAD, StatKind.PER_SAMPLE_IO}
    grads = PerSampleGrads(per_sample) if wants_grads else None
    return LayerStatistics(layer=layer, grads=grads, diagonal=diagonal)
