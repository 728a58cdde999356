"""The classification networks of ``examples/cnn.py --model``: the papers' and a few small ones.

Every entry of ``NETWORKS`` builds a network from ``(channels, side, num_classes)``
for ``[N, channels, side, side]`` images and says where it comes from. The
networks of the KPSVD, Deflation, Lanczos and two-level K-FAC papers (Koroko et
al.) follow the definitions of those papers' code (``apps/mlp_cnn/models.py``):

* ``cuda-convnet``: three 3x3 / 3x3 / 2x2 valid convolutions (32, 32, 64 channels)
  with ReLU; the first two followed by a 3x3 max-pool (stride 3) and a BatchNorm;
  then one linear layer to the classes;
* ``toy-cnn``: 7x7 and 5x5 valid convolutions (4 and 2 channels) with ``tanh``,
  each followed by a 3x3 max-pool, and a linear layer;
* ``resnet34``, ``resnet50``: torchvision's ImageNet ResNets, fed the 32x32 images
  unchanged as that code does (the 7x7 stride-2 stem and the max-pool leave a 1x1
  map for the last stage);
* ``vgg11``: torchvision's VGG-11 whose classifier reads the 1x1 map of a 32x32
  image directly (see ``vgg11``);
* ``deep-linear``, ``mlp``, ``toy``: the small classifiers of flattened MNIST
  images of the two-level K-FAC experiments (the first two linear layers with
  BatchNorm and no other nonlinearity, as in the papers' code);

and ``resnet110`` is the CIFAR ResNet of He et al. (2016, section 4.2): 3 stages
of 18 basic blocks at 16, 32 and 64 channels with parameter-free shortcuts.
``BatchNorm`` runs in train mode in several of them: curvlib computes their
statistics with its autograd backend (``Backend.AUTO`` picks it) and the
BatchNorm parameters take plain SGD steps.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# -- the KPSVD papers' code --------------------------------------------------------------


def _cuda_convnet_side(side: int) -> int:
    """Height and width of ``cuda_convnet``'s last feature map for ``side`` x ``side`` images."""
    return ((side - 2) // 3 - 2) // 3 - 1


def cuda_convnet(in_channels: int, side: int, num_classes: int) -> nn.Sequential:
    """The ``cuda_convnet`` of the KPSVD papers' code (19,178 parameters on CIFAR-10).

    ``conv3x3(32) ReLU maxpool3 BN conv3x3(32) ReLU maxpool3 BN conv2x2(64) ReLU``,
    all convolutions without padding and the pools with stride 3, then a linear
    layer: a 32x32 image leaves a 64x1x1 map (a 28x28 one too).

    Args:
        in_channels: Image channels.
        side: Image height and width (at least 26).
        num_classes: Outputs (logits).
    """
    last = _cuda_convnet_side(side)
    if last < 1:
        raise ValueError(f"cuda-convnet needs images of at least 26x26 pixels, got {side}x{side}.")
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(3),
        nn.BatchNorm2d(32),
        nn.Conv2d(32, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(3),
        nn.BatchNorm2d(32),
        nn.Conv2d(32, 64, 2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * last * last, num_classes),
    )


def toy_cnn(in_channels: int, side: int, num_classes: int) -> nn.Sequential:
    """The papers' ``ToyCNN`` (824 parameters on CIFAR-10).

    ``conv7x7(4) tanh maxpool3 conv5x5(2) tanh maxpool3``, no padding, then a linear
    layer: a 32x32 image leaves 2x1x1 features.

    Args:
        in_channels: Image channels.
        side: Image height and width (at least 27).
        num_classes: Outputs (logits).
    """
    last = ((side - 6) // 3 - 4) // 3
    if last < 1:
        raise ValueError(f"toy-cnn needs images of at least 27x27 pixels, got {side}x{side}.")
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 7),
        nn.Tanh(),
        nn.MaxPool2d(3),
        nn.Conv2d(4, 2, 5),
        nn.Tanh(),
        nn.MaxPool2d(3),
        nn.Flatten(),
        nn.Linear(2 * last * last, num_classes),
    )


def torchvision_resnet(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """Torchvision's ``resnet18``, ``resnet34`` or ``resnet50``, untrained, as the papers use it.

    Only the first convolution changes, and only for ``in_channels != 3``.
    """
    from torchvision import models

    model: nn.Module = getattr(models, name)(num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


def vgg11(in_channels: int, num_classes: int) -> nn.Module:
    """Torchvision's VGG-11 (configuration A) for 32x32 images: 28,144,010 parameters at 10 classes.

    The papers' code runs torchvision's ``vgg11`` unchanged on 32x32 images: its
    five max-pools leave a 512x1x1 map, which the adaptive average pool copies
    49 times into the 25,088 inputs of the first classifier layer (128.8 M
    parameters, a K-FAC input factor of 25,089² entries). Those 49 copies see the
    same input, so that layer computes what a 512-input layer with their sum as
    its weight computes: here the pool keeps the 1x1 map and the layer has 512
    inputs. The functions are the same; the parametrisation and the
    initialisation's scale differ.

    Args:
        in_channels: Image channels.
        num_classes: Outputs (logits).
    """
    from torchvision.models import vgg11 as tv_vgg11

    model = tv_vgg11(num_classes=num_classes)
    if in_channels != 3:
        model.features[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier[0] = nn.Linear(512, 4096)
    return model


# -- the CIFAR ResNets of He et al. (2016) -----------------------------------------------


class CifarBasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a parameter-free shortcut (He et al.'s option A).

    Where the block halves the map and widens the channels, the shortcut takes
    every other pixel and pads the new channels with zeros. Every ReLU is its own
    module and the residual is added out of place.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.stride = stride
        self.extra = out_channels - in_channels

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """The identity, subsampled and zero-padded where the block changes the shape."""
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


def cifar_resnet(
    depth: int, in_channels: int, num_classes: int, widths: Sequence[int] = (16, 32, 64)
) -> nn.Sequential:
    """He et al.'s (2016) CIFAR ResNet of ``depth = 6n + 2`` layers.

    A 3x3 convolution to ``widths[0]`` channels, ``len(widths)`` stages of ``n``
    ``CifarBasicBlock`` (the first block of each later stage halves the map),
    global average pooling and a linear layer. ``depth=110`` (``n = 18``) has
    1,727,962 parameters at 10 classes (the paper: 1.7 M).

    Args:
        depth: ``6n + 2`` (20, 32, 44, 56, 110, ...).
        in_channels: Image channels.
        num_classes: Outputs (logits).
        widths: Channels of the stages.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"A CIFAR ResNet has 6n + 2 layers (n >= 1), got depth {depth}.")
    n = (depth - 2) // 6
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    ]
    width = widths[0]
    for stage, out in enumerate(widths):
        for block in range(n):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(CifarBasicBlock(width, out, stride))
            width = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


# -- small classifiers of flattened images (the two-level K-FAC experiments) -------------


def linear_bn_stack(
    widths: Sequence[int], activation: Callable[[], nn.Module] | None = None, *, bn: bool = True
) -> nn.Sequential:
    """``Flatten``, then ``Linear`` layers through ``widths`` with BatchNorm and/or ``activation``.

    Args:
        widths: Input features first, outputs (logits) last.
        activation: A module factory put after every hidden layer, or ``None``.
        bn: Put ``BatchNorm1d`` after every hidden layer.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            if bn:
                layers.append(nn.BatchNorm1d(fan_out))
            if activation is not None:
                layers.append(activation())
    return nn.Sequential(*layers)


def deep_linear(
    in_features: int, num_classes: int, depth: int = 64, width: int = 10
) -> nn.Sequential:
    """``DeepLinear``: ``depth`` linear layers of width 10 with BatchNorm, no activation.

    16,040 parameters on MNIST (784 inputs, 10 classes).
    """
    return linear_bn_stack([in_features, *[width] * (depth - 1), num_classes])


MLP_WIDTHS = (1000, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 20)
"""Hidden widths of the papers' ``MLP``."""


def bn_mlp(in_features: int, num_classes: int, widths: Sequence[int] = MLP_WIDTHS) -> nn.Sequential:
    """``MLP``: 13 linear layers (784-1000-900-...-20-10) with BatchNorm, no activation.

    The papers' code has no nonlinearity between the layers of this network
    (only BatchNorm), and neither has this one: 4,106,920 parameters on MNIST.
    """
    return linear_bn_stack([in_features, *widths, num_classes])


def toy_net(in_features: int, num_classes: int) -> nn.Sequential:
    """``ToyNet``: 784-10-30-20-15-10 with ``tanh`` units (9,275 parameters on MNIST)."""
    return linear_bn_stack([in_features, 10, 30, 20, 15, num_classes], nn.Tanh, bn=False)


# -- curvlib's own small networks --------------------------------------------------------


def kpsvd_cnn(
    in_channels: int, side: int, num_classes: int, channels: Sequence[int] = (32, 32, 64)
) -> nn.Sequential:
    """The small conv net: ``len(channels)`` stages of conv5x5 + ReLU + max-pool, two linears.

    Args:
        in_channels: Image channels ``C``.
        side: Image height and width (28 or 32).
        num_classes: Outputs (logits).
        channels: Output channels of the conv stages.

    Returns:
        A network mapping ``[N, C, side, side]`` images to ``[N, num_classes]`` logits.
    """
    layers: list[nn.Module] = []
    width = in_channels
    for out in channels:
        layers += [nn.Conv2d(width, out, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)]
        width, side = out, side // 2
    layers += [
        nn.Flatten(),
        nn.Linear(width * side * side, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    ]
    return nn.Sequential(*layers)


def resnet_small(
    in_channels: int, num_classes: int, widths: Sequence[int] = (16, 32, 64)
) -> nn.Module:
    """A CIFAR-style ResNet from torchvision's ``BasicBlock`` (one block per stage).

    The blocks are torchvision's own, with their reused in-place ReLU and in-place
    residual add, so this is what a torchvision ResNet asks of curvlib at a size
    that trains on a CPU.
    """
    from torchvision.models.resnet import BasicBlock

    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
    ]
    width = widths[0]
    for i, out in enumerate(widths):
        stride = 1 if i == 0 else 2
        down = None
        if stride != 1 or width != out:
            down = nn.Sequential(
                nn.Conv2d(width, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )
        layers.append(BasicBlock(width, out, stride=stride, downsample=down))
        width = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


def resnet18(in_channels: int, num_classes: int) -> nn.Module:
    """Torchvision's ``resnet18`` (first conv adapted to ``in_channels``)."""
    return torchvision_resnet("resnet18", in_channels, num_classes)


# -- the registry ------------------------------------------------------------------------


@dataclass(frozen=True)
class Network:
    """One ``--model`` choice.

    Attributes:
        make: ``make(channels, side, num_classes)`` builds the network.
        help: One line for ``--help``.
        min_side: The smallest image height and width it takes.
    """

    make: Callable[[int, int, int], nn.Module]
    help: str
    min_side: int = 1

    def check(self, name: str, side: int) -> None:
        """Raise ``ValueError`` naming the fix if ``side`` x ``side`` images are too small."""
        if side < self.min_side:
            raise ValueError(
                f"--model {name} needs images of at least {self.min_side}x{self.min_side} "
                f"pixels, got {side}x{side}; choose a 32x32 data set (synthetic, cifar10, "
                "cifar100, svhn)."
            )


NETWORKS: dict[str, Network] = {
    "kpsvd-cnn": Network(
        lambda c, side, k: kpsvd_cnn(c, side, k), "three conv5x5 + max-pool stages, two linears"
    ),
    "cuda-convnet": Network(
        cuda_convnet, "the KPSVD papers' cuda_convnet (3x3 convs, max-pool 3, BatchNorm)", 26
    ),
    "toy-cnn": Network(toy_cnn, "the papers' ToyCNN (two tanh convs, 4 and 2 channels)", 27),
    "resnet-small": Network(
        lambda c, side, k: resnet_small(c, k), "CIFAR ResNet, one torchvision BasicBlock a stage"
    ),
    "resnet18": Network(lambda c, side, k: resnet18(c, k), "torchvision's resnet18"),
    "resnet34": Network(
        lambda c, side, k: torchvision_resnet("resnet34", c, k), "torchvision's resnet34"
    ),
    "resnet50": Network(
        lambda c, side, k: torchvision_resnet("resnet50", c, k), "torchvision's resnet50"
    ),
    "resnet110": Network(
        lambda c, side, k: cifar_resnet(110, c, k), "He et al.'s CIFAR ResNet-110"
    ),
    "vgg11": Network(lambda c, side, k: vgg11(c, k), "torchvision's VGG-11 for 32x32 images", 32),
    "deep-linear": Network(
        lambda c, side, k: deep_linear(c * side * side, k), "64 linear layers of width 10 + BN"
    ),
    "mlp": Network(
        lambda c, side, k: bn_mlp(c * side * side, k), "13 linear layers 1000-...-20 + BN"
    ),
    "toy": Network(lambda c, side, k: toy_net(c * side * side, k), "tanh MLP 10-30-20-15"),
}
"""``--model`` name to its ``Network``."""
