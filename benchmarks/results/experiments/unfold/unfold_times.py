"""Unfolding a convolution's input: ``unfold_input`` against the implementation it replaced.

The replaced one, kept here: ``F.unfold``, a transpose and the bias column's
concatenation for ``Conv2d``; a transposed convolution with a one-hot kernel for
``ConvTranspose2d``. Batch 100, 16 output channels, bias; best of 20 in ms, 2
threads. Checks that both give the same tensor first.

    python unfold_times.py
"""

import time

import torch
from torch import nn
from torch.nn import functional as F

from curvlib.core.layout import ModelLayout
from curvlib.extract.layers import unfold_input

torch.set_num_threads(2)


def replaced(module: nn.Conv2d | nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """The unfolding before: ``[N, T, C_in * kh * kw + 1]``."""
    kernel = module.kernel_size
    if isinstance(module, nn.Conv2d):
        a = F.unfold(x, kernel, module.dilation, module.padding, module.stride)  # type: ignore[arg-type]
    else:
        c_in = x.shape[1]
        eye = torch.eye(c_in * kernel[0] * kernel[1], dtype=x.dtype)
        one_hot = eye.reshape(c_in, kernel[0] * kernel[1], -1).transpose(1, 2)
        a = F.conv_transpose2d(
            x, one_hot.reshape(c_in, -1, *kernel), stride=module.stride,
            padding=module.padding, output_padding=module.output_padding,  # type: ignore[arg-type]
            dilation=module.dilation,
        ).flatten(2)  # fmt: skip
    a = a.transpose(1, 2)
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)


def best(fn, rounds: int = 20) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


CASES = [
    (nn.Conv2d(1, 16, 5, padding=2), 8),
    (nn.Conv2d(32, 16, 5, padding=2), 4),
    (nn.Conv2d(16, 16, 4, stride=2, padding=1), 4),
    (nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), 2),
    (nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1), 4),
    (nn.ConvTranspose2d(128, 16, 4, stride=2, padding=1), 8),
]
for module, size in CASES:
    layer = ModelLayout.from_model(nn.Sequential(module)).layers[0]
    x = torch.randn(100, module.in_channels, size, size)
    assert torch.equal(replaced(module, x), unfold_input(layer, x))
    before = best(lambda m=module, x=x: replaced(m, x))
    after = best(lambda layer=layer, x=x: unfold_input(layer, x))
    print(f"{module}, {size}x{size}: before {before:.2f} ms, after {after:.2f} ms")
