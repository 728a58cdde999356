"""The unfolded inputs of convolutions against torch's own unfolding and the layer's output.

And the Gram matrix of a transposed convolution's unfolded input, computed without
forming its zeros, against the unfolded input's own.

``unfold_input`` gathers each output position's window from a strided view of
the (padded, for a transposed convolution spread) input. Two independent
references: ``F.unfold`` for ``Conv2d`` and a one-hot transposed convolution for
``ConvTranspose2d`` (each kernel element of each channel moved to its own output
channel), both equal to the bit; and the layer's output, which the unfolded
input times the weight matrix must give.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from curvlib.core import CurvatureStatistics, FisherType, StatKind
from curvlib.core.layout import CurvatureLayer, ModelLayout
from curvlib.extract import Backend, CurvatureExtractor, UnsupportedPolicy
from curvlib.extract import _session as session_module
from curvlib.extract.layers import transposed_conv_input_gram, unfold_input
from tests import problems as P
from tests.problems import Problem

KERNELS = [(1, 1), (2, 2), (3, 2), (4, 4)]
STRIDES = [(1, 1), (2, 2), (3, 1)]
DILATIONS = [(1, 1), (2, 1)]
SIZES = [(1, 1), (3, 4), (6, 5)]


def _layer(module: nn.Module):  # type: ignore[no-untyped-def]
    layout = ModelLayout.from_model(nn.Sequential(module))
    assert len(layout.layers) == 1
    return layout.layers[0]


def _one_hot_unfold(module: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """Row ``(c, k)`` at ``t``: the input kernel element ``k`` of channel ``c`` maps to ``t``."""
    c_in, (kh, kw) = x.shape[1], module.kernel_size
    eye = torch.eye(c_in * kh * kw, dtype=x.dtype)
    one_hot = eye.reshape(c_in, kh * kw, c_in * kh * kw).transpose(1, 2)
    out = F.conv_transpose2d(
        x,
        one_hot.reshape(c_in, c_in * kh * kw, kh, kw),
        stride=module.stride,
        padding=module.padding,  # type: ignore[arg-type]
        output_padding=module.output_padding,
        dilation=module.dilation,
    )
    return out.flatten(2).transpose(1, 2)


def _with_ones(a: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], -1) if bias else a


def _check_output(module: nn.Conv2d | nn.ConvTranspose2d, x: torch.Tensor, a: torch.Tensor) -> None:
    weight = module.weight
    if isinstance(module, nn.ConvTranspose2d):
        weight = weight.transpose(0, 1)
    w_mat = weight.reshape(weight.shape[0], -1)
    if module.bias is not None:
        w_mat = torch.cat([w_mat, module.bias[:, None]], 1)
    out = module(x)
    got = (a @ w_mat.T).transpose(1, 2).reshape(out.shape)
    torch.testing.assert_close(got, out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("padding", [(0, 0), (1, 1), (2, 0), "same", "valid"], ids=str)
def test_conv2d_windows_are_torchs_unfold(padding: object, bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for kernel, stride, dilation, size in itertools.product(KERNELS, STRIDES, DILATIONS, SIZES):
        if padding == "same" and (stride != (1, 1) or any(
            d * (k - 1) % 2 for d, k in zip(dilation, kernel, strict=True)
        )):  # fmt: skip
            continue
        module = nn.Conv2d(3, 2, kernel, stride, padding, dilation, bias=bias).double()  # type: ignore[arg-type]
        x = torch.randn(2, 3, *size, generator=gen, dtype=torch.float64)
        try:
            module(x)
        except RuntimeError:  # the kernel does not fit the input
            continue
        layer = _layer(module)
        got = unfold_input(layer, x)
        pad = layer.module.padding if not isinstance(padding, str) else (
            (0, 0) if padding == "valid" else
            tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel, strict=True))
        )  # fmt: skip
        want = F.unfold(x, kernel, dilation=dilation, padding=pad, stride=stride).transpose(1, 2)
        assert torch.equal(got, _with_ones(want, bias)), (kernel, stride, dilation, size)
        _check_output(module, x, got)
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("padding", [(0, 0), (1, 1), (2, 0), (3, 2)], ids=str)
def test_transposed_conv_windows_are_the_one_hot_unfold(
    padding: tuple[int, int], bias: bool
) -> None:
    gen = torch.Generator().manual_seed(1)
    checked = 0
    for kernel, stride, dilation, size, extra in itertools.product(
        KERNELS, STRIDES, DILATIONS, SIZES, [(0, 0), (1, 0)]
    ):
        if any(e >= max(s, d) for e, s, d in zip(extra, stride, dilation, strict=True)):
            continue  # output padding must be smaller than the stride or the dilation
        module = nn.ConvTranspose2d(
            3, 2, kernel, stride, padding, extra, bias=bias, dilation=dilation
        ).double()
        x = torch.randn(2, 3, *size, generator=gen, dtype=torch.float64)
        try:
            module(x)
        except RuntimeError:  # the padding removes the whole output
            continue
        got = unfold_input(_layer(module), x)
        assert torch.equal(got, _with_ones(_one_hot_unfold(module, x), bias)), (
            kernel, stride, dilation, size, extra
        )  # fmt: skip
        _check_output(module, x, got)
        checked += 1
    assert checked > 40


@pytest.mark.parametrize("kind", [nn.Conv2d, nn.ConvTranspose2d], ids=lambda k: k.__name__)
def test_inputs_with_any_strides_and_offset(kind: type[nn.Conv2d | nn.ConvTranspose2d]) -> None:
    """Channels-last, a strided batch and a slice with a storage offset: the same windows."""
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(6, 3, 7, 7, generator=gen, dtype=torch.float64)
    for padding in (0, 1):
        layer = _layer(kind(3, 2, 3, stride=2, padding=padding).double())
        for x in (base[2:4], base.to(memory_format=torch.channels_last)[2:4], base[::2]):
            want = unfold_input(layer, x.contiguous().clone())
            assert torch.equal(unfold_input(layer, x), want)
            _check_output(layer.module, x, want)  # type: ignore[arg-type]


# -- the Gram matrix of a transposed convolution's unfolded input, zeros left out --------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("padding", [(0, 0), (1, 1), (2, 0), (3, 2)], ids=str)
def test_transposed_conv_gram_is_the_unfolded_inputs_gram(
    padding: tuple[int, int], bias: bool
) -> None:
    """Every stride, kernel, padding and output padding, inputs from 1x1 (one element each)."""
    gen = torch.Generator().manual_seed(3)
    checked = 0
    for kernel, stride, size, extra in itertools.product(
        [(1, 1), (2, 2), (3, 2), (4, 4), (7, 7), (5, 3)],
        [(1, 1), (2, 2), (3, 1), (2, 3)],
        [(1, 1), (3, 4), (6, 5)],
        [(0, 0), (1, 0), (1, 1)],
    ):
        if any(e >= s for e, s in zip(extra, stride, strict=True)):
            continue
        module = nn.ConvTranspose2d(3, 2, kernel, stride, padding, extra, bias=bias).double()
        x = torch.randn(2, 3, *size, generator=gen, dtype=torch.float64)
        try:
            module(x)
        except RuntimeError:
            continue
        layer = _layer(module)
        a = _with_ones(_one_hot_unfold(module, x), bias).flatten(0, 1)
        got = transposed_conv_input_gram(layer, x)
        assert got is not None
        torch.testing.assert_close(got, a.T @ a, rtol=1e-12, atol=1e-12)
        checked += 1
    assert checked > 50


def test_a_dilated_transposed_conv_is_left_to_the_unfolding() -> None:
    layer = _layer(nn.ConvTranspose2d(3, 2, 3, stride=2, dilation=2))
    assert transposed_conv_input_gram(layer, torch.randn(2, 3, 4, 4)) is None


@pytest.mark.parametrize("problem", [P.tconv_bce(), P.tconv_unflatten_bce()], ids=lambda p: p.name)
@pytest.mark.parametrize("backend", [Backend.AUTO, Backend.AUTOGRAD], ids=str)
def test_kronecker_factors_of_transposed_convs_equal_those_of_the_unfolded_inputs(
    problem: Problem, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``KRONECKER`` alone: the Gram matrix without unfolding, the same factors.

    With per-sample inputs requested too, the factors come from the unfolded inputs.
    """
    model = problem.model()
    structured: list[str] = []
    inner = session_module.transposed_conv_input_gram

    def spied(layer: CurvatureLayer, x: torch.Tensor) -> torch.Tensor | None:
        structured.append(layer.name)
        return inner(layer, x)

    monkeypatch.setattr(session_module, "transposed_conv_input_gram", spied)

    def statistics(kinds: list[StatKind]) -> CurvatureStatistics:
        ex = CurvatureExtractor(
            model, problem.loss_fn, stats=kinds, fisher_type=FisherType.EXACT, backend=backend,
            unsupported=UnsupportedPolicy.IGNORE,
        )  # fmt: skip
        with ex.collect():
            problem.loss_fn(model(problem.x), problem.y).backward()
        return ex.statistics()

    alone = statistics([StatKind.KRONECKER])
    names = [n for n, m in model.named_modules() if isinstance(m, nn.ConvTranspose2d)]
    assert sorted(structured) == sorted(names)
    unfolded = statistics([StatKind.KRONECKER, StatKind.PER_SAMPLE_IO])
    assert sorted(structured) == sorted(names)  # not taken with per-sample inputs
    for name, layer in alone.layers.items():
        want = unfolded.layers[name].kronecker
        assert layer.kronecker is not None and want is not None
        torch.testing.assert_close(layer.kronecker.A, want.A, rtol=1e-12, atol=1e-12)
        assert torch.equal(layer.kronecker.G, want.G)
        assert layer.kronecker.num_positions == want.num_positions
