"""The layout finds curvature layers and maps parameters to [W | b] matrices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlib.core import LayerKind, ModelLayout


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.ConvTranspose2d(3, 4, 2, stride=2, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 5),
    )


def test_layers_kinds_and_shapes() -> None:
    layout = ModelLayout.from_model(_net())
    assert layout.names == ("0", "3", "5")
    conv, convt, lin = layout.layers
    assert (conv.kind, conv.out_dim, conv.in_dim, conv.has_bias) == (
        LayerKind.CONV2D,
        3,
        18,
        True,
    )
    assert (convt.kind, convt.out_dim, convt.in_dim, convt.has_bias) == (
        LayerKind.CONV_TRANSPOSE2D,
        4,
        12,
        False,
    )
    assert (lin.out_dim, lin.in_dim_aug, lin.num_params) == (5, 257, 5 * 257)
    assert [u.name for u in layout.unsupported] == ["1"]
    assert "BatchNorm2d" in layout.describe()


@pytest.mark.parametrize("index", [0, 3, 5])
def test_matrix_round_trip(index: int) -> None:
    torch.manual_seed(0)
    net = _net()
    layer = ModelLayout.from_model(net)[str(index)]
    weight = torch.randn(7, *layer.weight.shape)
    bias = torch.randn(7, layer.out_dim) if layer.has_bias else None
    mat = layer.to_matrix(weight, bias)
    assert mat.shape == (7, layer.out_dim, layer.in_dim_aug)
    back_w, back_b = layer.from_matrix(mat)
    assert torch.equal(back_w, weight)
    assert (back_b is None and bias is None) or torch.equal(back_b, bias)


def test_conv_transpose_matrix_swaps_channel_axes() -> None:
    layer = ModelLayout.from_model(nn.ConvTranspose2d(2, 3, 1, bias=False))[""]
    weight = torch.arange(6.0).reshape(2, 3, 1, 1)  # (C_in, C_out, 1, 1)
    assert torch.equal(layer.weight_matrix(weight), weight[:, :, 0, 0].T)


def test_frozen_excluded_and_grouped_layers() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Conv2d(2, 2, 1, groups=2))
    net[0].requires_grad_(False)
    layout = ModelLayout.from_model(net, exclude=["1"])
    assert layout.names == ()
    reasons = {u.name: u.reason for u in layout.unsupported}
    assert reasons["1"] == "excluded by the user"
    assert "groups" in reasons["2"]
    only = ModelLayout.from_model(net, include=[nn.Linear])
    assert only.names == ("1",)


def test_shared_parameter_is_rejected_with_both_names() -> None:
    first = nn.Linear(3, 3)
    second = nn.Linear(3, 3)
    second.weight = first.weight
    with pytest.raises(ValueError, match="'0' and '1'"):
        ModelLayout.from_model(nn.Sequential(first, second))


def test_bias_mismatch_is_an_error() -> None:
    layer = ModelLayout.from_model(nn.Linear(2, 2, bias=False))[""]
    with pytest.raises(ValueError, match="bias"):
        layer.to_matrix(torch.zeros(2, 2), torch.zeros(2))
