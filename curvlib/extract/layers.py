r"""Per-layer-kind views: unfolded inputs $\bar a_{nt}$ and output gradients $g_{knt}$.

Both follow [`curvlib.core.conventions`][curvlib.core.conventions]; the
statistics computed from them live in
[`curvlib.extract.statistics`][curvlib.extract.statistics].
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from curvlib.core.layout import CurvatureLayer, LayerKind
from curvlib.linalg.factors import gram


def unfold_input(layer: CurvatureLayer, x: Tensor) -> Tensor:
    r"""The layer input as $\bar a_{nt}$: ``[N, T, in_aug]`` with the trailing one.

    Args:
        layer: The curvature layer.
        x: The input the module received, ``[N, ...]``.

    Returns:
        The unfolded input, one row per output position, bias column appended.
    """
    module = layer.module
    if layer.kind is LayerKind.LINEAR:
        a = x.reshape(x.shape[0], -1, x.shape[-1])
        if layer.has_bias:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        return a
    if layer.kind is LayerKind.CONV2D:
        assert isinstance(module, nn.Conv2d)
        (ph, pw), flip = _conv_padding(module), False
        # Contiguous in NCHW order, as the windows' strides assume (a padded
        # channels-last input stays channels-last).
        padded = (F.pad(x, (pw, pw, ph, ph)) if ph or pw else x).contiguous()
        stride = module.stride
    else:
        assert isinstance(module, nn.ConvTranspose2d)
        padded, flip, stride = _spread_input(module, x), True, (1, 1)
    return _windows(padded, module.kernel_size, stride, module.dilation, layer.has_bias, flip)


def _windows(
    padded: Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    bias: bool,
    flip: bool,
) -> Tensor:
    r"""The kernel's windows over a padded ``[N, C, H, W]`` input: ``[N, T, C * kh * kw (+ 1)]``.

    Row ``t`` holds the window of output position ``t`` in ``(c, ky, kx)`` order
    (``flip``: the kernel's elements in reverse order on both axes), and a one in
    the last column with ``bias``. The windows are a strided view of the input,
    copied once into the result: ``F.unfold`` and a transpose would copy twice,
    the second time across the whole result.
    """
    n, c, h, w = padded.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    view = padded.as_strided((n, oh, ow, c, kh, kw), (c * h * w, sh * w, sw, h * w, dh * w, dw))
    out = padded.new_empty(n, oh * ow, c * kh * kw + int(bias))
    target = out[..., : c * kh * kw].view(n, oh, ow, c, kh, kw)
    if not flip:
        target.copy_(view)
    else:  # no negative strides in torch: one slice per kernel element
        for i in range(kh):
            for j in range(kw):
                target[..., i, j].copy_(view[..., kh - 1 - i, kw - 1 - j])
    if bias:
        out[..., -1] = 1.0
    return out


def _spread_input(module: nn.ConvTranspose2d, x: Tensor) -> Tensor:
    r"""A transposed convolution's input laid out for a stride-1 unfold with the kernel flipped.

    Element $k$ of the kernel maps input $i$ to output $t = is - p + kd$ (per
    spatial axis: stride $s$, padding $p$, dilation $d$). Spread out by the
    stride ($s - 1$ zeros between entries) and padded by $d(K-1) - p$ on each
    side (the output padding too at the end; a negative pad crops), the input
    holds $i$ at element $K - 1 - k$ of output $t$'s window. So row ``(c, k)``
    of the unfolded input at position ``t`` is the input entry that kernel
    element ``k`` of channel ``c`` maps to ``t``, and the layer output is
    ``W_mat @ unfolded`` with ``W_mat = weight.transpose(0, 1).reshape(C_out, -1)``.
    """
    n, c_in, h, w = x.shape
    (kh, kw), (sh, sw) = module.kernel_size, module.stride
    (dh, dw), (ph, pw) = module.dilation, _conv_padding(module)
    oh, ow = module.output_padding
    spread = x.new_zeros(n, c_in, (h - 1) * sh + 1, (w - 1) * sw + 1)
    spread[:, :, ::sh, ::sw] = x
    left_h, left_w = dh * (kh - 1) - ph, dw * (kw - 1) - pw
    return F.pad(spread, (left_w, left_w + ow, left_h, left_h + oh)).contiguous()


def _conv_padding(module: nn.Conv2d | nn.ConvTranspose2d) -> tuple[int, ...]:
    """Explicit padding; ``"same"`` is symmetric here (the layout rejects odd totals)."""
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":
        return tuple(
            d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size, strict=True)
        )
    assert not isinstance(module.padding, str)
    return tuple(module.padding)


def output_grads(layer: CurvatureLayer, s: Tensor) -> Tensor:
    """Backpropagated columns at the layer output as $g_{knt}$: ``[K, N, T, out]``.

    Args:
        layer: The curvature layer.
        s: ``[K, N, *output.shape[1:]]`` (channels first for convolutions).

    Returns:
        One row per column, sample and output position.
    """
    k, n = s.shape[:2]
    if layer.kind is LayerKind.LINEAR:
        return s.reshape(k, n, -1, layer.out_dim)
    return s.flatten(3).transpose(2, 3)


def norm_grads(layer: CurvatureLayer, x: Tensor, s: Tensor) -> Tensor:
    r"""Per-sample gradient matrices $[\gamma \mid \beta]$ of a normalisation layer.

    The layer computes $z_{net} = \gamma_e \hat x_{net} + \beta_e$ for each
    normalised feature $e$ (a channel of ``BatchNorm`` and ``GroupNorm``, an
    element of ``normalized_shape`` of ``LayerNorm``) at the positions $t$ it
    is repeated over, so the gradient of column $k$ is $\sum_t s_{knet}\hat
    x_{net}$ for $\gamma_e$ and $\sum_t s_{knet}$ for $\beta_e$. $\hat x$ is
    recomputed from the stored input exactly as torch computes it:
    ``BatchNorm`` (eval mode) with its running statistics, ``LayerNorm`` and
    ``GroupNorm`` with each sample's own mean and biased variance (no
    coupling between samples) and the module's ``eps``.

    Args:
        layer: A layer of one of the ``NORM_KINDS``.
        x: The input the module received, ``[N, ...]``.
        s: Backpropagated columns at the output, ``[K, N, ...]``.

    Returns:
        ``[K, N, E, in_aug]`` (``in_aug`` is 2 with a trainable bias, else 1).
    """
    x_hat, g = _normalised(layer, x.to(s.dtype)), s
    k, n, e = s.shape[0], s.shape[1], layer.out_dim
    if layer.kind is LayerKind.LAYERNORM:
        # Features last: [N, *, E] -> [N, E, T].
        x_hat = x_hat.reshape(n, -1, e).transpose(1, 2)
        g = g.reshape(k, n, -1, e).transpose(2, 3)
    else:
        # Channels second: [N, C, *] -> [N, C, T].
        x_hat = x_hat.reshape(n, e, -1)
        g = g.reshape(k, n, e, -1)
    cols = [(g * x_hat).sum(-1)]
    if layer.has_bias:
        cols.append(g.sum(-1))
    return torch.stack(cols, dim=-1)


def _normalised(layer: CurvatureLayer, x: Tensor) -> Tensor:
    r"""$\hat x$, the input normalised as the module normalises it (without the affine map)."""
    module = layer.module
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, eps=module.eps)
    assert isinstance(module, nn.modules.batchnorm._BatchNorm)
    mean, var = module.running_mean, module.running_var
    assert mean is not None and var is not None, "BatchNorm without running statistics"
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean.reshape(shape).to(x)) * torch.rsqrt(var.reshape(shape).to(x) + module.eps)


def transposed_conv_input_gram(layer: CurvatureLayer, x: Tensor) -> Tensor | None:
    r"""$\sum_{n,t} \bar a_{nt} \bar a_{nt}^\top$ of a transposed convolution, zeros left out.

    ``unfold_input`` of a transposed convolution is mostly zeros: output $t$
    receives input $i$ through kernel element $k = t + p - is$ only (per axis),
    so of the $K$ elements along an axis at most $\lceil K/s \rceil$ reach an
    input, and fewer at the border (a $1\times1$ input reaches one element of
    each window). Along each axis the output positions fall into runs that
    reach the same kernel elements (an arithmetic progression, step $s$) from
    consecutive inputs; for each pair of runs the windows are a strided view of
    the input itself, and their Gram matrix is added at those elements' rows and
    columns. The result is the Gram matrix of ``unfold_input(layer, x)`` (to
    rounding) at a fraction of its multiply-adds: $1/s^4$ of them for a kernel
    of $s$ times the stride, and no unfolded copy of the zeros.

    Returns:
        ``[in_aug, in_aug]``, or ``None`` for a dilated transposed convolution
        (the caller unfolds it).
    """
    module = layer.module
    assert isinstance(module, nn.ConvTranspose2d)
    if module.dilation != (1, 1) or x.dim() != 4:
        return None
    x = x.contiguous()
    n, c_in, h, w = x.shape
    (kh, kw), pad = module.kernel_size, _conv_padding(module)
    runs_y = _transposed_runs(h, kh, module.stride[0], pad[0], module.output_padding[0])
    runs_x = _transposed_runs(w, kw, module.stride[1], pad[1], module.output_padding[1])
    size = c_in * kh * kw + int(layer.has_bias)
    out = x.new_zeros(size * size)
    channels = torch.arange(c_in) * (kh * kw)
    rows = 0
    for (count_y, first_y, elements_y), (count_x, first_x, elements_x) in itertools.product(
        runs_y, runs_x
    ):
        rows += n * count_y * count_x
        if not elements_y or not elements_x:
            continue  # positions no input reaches: the bias column alone
        # The windows as columns, the input's rows innermost: long contiguous copies.
        view = x.as_strided(
            (c_in, len(elements_y), len(elements_x), n, count_y, count_x),
            (h * w, w, 1, c_in * h * w, w, 1),
            x.storage_offset() + first_y * w + first_x,
        )
        cols = c_in * len(elements_y) * len(elements_x)
        columns = x.new_empty(cols + int(layer.has_bias), n * count_y * count_x)
        columns[:cols].view(view.shape).copy_(view)
        kernel = torch.tensor(elements_y)[:, None] * kw + torch.tensor(elements_x)
        index = (channels[:, None] + kernel.flatten()[None, :]).flatten()
        if layer.has_bias:
            columns[cols] = 1.0
            index = torch.cat([index, torch.tensor([size - 1])])
        flat = (index[:, None] * size + index[None, :]).flatten()
        out.index_add_(0, flat, gram(columns.mT).flatten())
    out = out.view(size, size)
    if layer.has_bias:
        out[-1, -1] = float(rows)  # every row's one, reached by some input or not
    return out


@functools.lru_cache(maxsize=256)
def _transposed_runs(
    size: int, kernel: int, stride: int, pad: int, extra: int
) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
    r"""A transposed convolution's output positions along one axis, in runs of equal reach.

    Output $t$ receives input $i$ through element $k = t + p - is$ for each
    $0 \le i <$ ``size`` with $0 \le k <$ ``kernel``. A run is consecutive
    positions of one residue modulo the stride that reach the same elements;
    step $m$ of it reaches inputs ``first + m + j``, $j = 0, 1, \dots$, through
    the elements ``elements[j]`` (decreasing by the stride). Cached: a layer
    sees the same input size step after step.

    Returns:
        ``(positions, first input, elements)`` per run (elements empty where
        no input reaches the positions).
    """
    length = (size - 1) * stride - 2 * pad + kernel + extra
    runs: list[list[Any]] = []  # [next position, positions, first input, elements]
    current: dict[tuple[int, tuple[int, ...]], int] = {}  # (residue, elements) -> run
    for t in range(length):
        low = max(0, -((kernel - 1 - t - pad) // stride))  # ceil((t + p - K + 1) / s)
        high = min(size - 1, (t + pad) // stride)
        elements = tuple(t + pad - i * stride for i in range(low, high + 1))
        key = (t % stride, elements)
        index = current.get(key)
        if index is not None and runs[index][0] == t:  # the run's next position
            runs[index][0] += stride
            runs[index][1] += 1
        else:
            current[key] = len(runs)
            runs.append([t + stride, 1, low, elements])
    return tuple((count, first, elements) for _, count, first, elements in runs)
