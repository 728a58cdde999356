"""The WGAN-GP ResNet generator and critic for 32x32 images (Gulrajani et al. 2017).

The CIFAR-10 networks of "Improved Training of Wasserstein GANs" (their
``gan_cifar_resnet.py``, unconditional), with ``width`` channels everywhere
(128 in the paper):

* **Generator** (``resnet_generator``): ``Linear(nz, width * (side/8)^2)``
  reshaped to ``[width, side/8, side/8]``, three up-sampling residual blocks
  (``UpBlock``: BN, ReLU, nearest 2x up-sampling, 3x3 conv, BN, ReLU, 3x3 conv;
  shortcut: 2x up-sampling and a 1x1 conv), then BN, ReLU, a 3x3 conv to the
  image channels and ``tanh``. At ``side`` 32 the blocks run at 8, 16 and 32.
* **Critic** (``resnet_critic``): four residual blocks without normalisation
  (the gradient penalty needs per-sample scores): ``FirstDownBlock`` (3x3 conv,
  ReLU, 3x3 conv, 2x2 mean-pool; shortcut: mean-pool then 1x1 conv), one
  ``DownBlock`` (ReLU, 3x3 conv, ReLU, 3x3 conv, mean-pool; shortcut: 1x1 conv
  then mean-pool) and two ``Block`` with identity shortcuts; then ReLU, the mean
  over positions and ``Linear(width, 1)``.

The paper's up-sampling (four copies through ``depth_to_space``) is nearest
up-sampling, and its ``ConvMeanPool``/``MeanPoolConv`` are a convolution and a
2x2 average pool in either order, which is how they are written here. At
``width=128``, ``nz=128`` and 3 channels the generator has 1,204,483 parameters
and the critic 1,053,825. Initialisation is torch's default (the paper uses
He-uniform in the blocks and Glorot-uniform in the shortcuts and output).

Every convolution and linear layer is a curvature layer; the skip connections
make the networks non-sequential, so curvlib computes their statistics with its
autograd backend (``Backend.AUTO`` picks it for the empirical Fisher, the only one
a Wasserstein critic has). The generator's ``BatchNorm2d`` layers take plain
gradient steps.
"""

from __future__ import annotations

from torch import Tensor, nn

BLOCKS_G = 3
"""Up-sampling residual blocks of the generator: the image side is 8 times the first."""


def _up() -> nn.Upsample:
    return nn.Upsample(scale_factor=2, mode="nearest")


class UpBlock(nn.Module):
    """Generator block: ``x up2 -> conv1x1`` plus ``BN ReLU up2 conv3x3 BN ReLU conv3x3``.

    Args:
        channels: Input and output channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            _up(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        self.shortcut = nn.Sequential(_up(), nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C, H, W]`` to ``[N, C, 2H, 2W]``."""
        return self.residual(x) + self.shortcut(x)


class FirstDownBlock(nn.Module):
    """The critic's first block: ``pool -> conv1x1`` plus ``conv3x3 ReLU conv3x3 pool``.

    Args:
        in_channels: Image channels.
        channels: Output channels.
    """

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.AvgPool2d(2),
        )
        self.shortcut = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(in_channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C_in, H, W]`` to ``[N, C, H/2, W/2]``."""
        return self.residual(x) + self.shortcut(x)


class DownBlock(nn.Module):
    """Critic block: ``conv1x1 -> pool`` plus ``ReLU conv3x3 ReLU conv3x3 pool``.

    Args:
        channels: Input and output channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.AvgPool2d(2),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.AvgPool2d(2))

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C, H, W]`` to ``[N, C, H/2, W/2]``."""
        return self.residual(x) + self.shortcut(x)


class Block(nn.Module):
    """Critic block at constant size: ``x`` plus ``ReLU conv3x3 ReLU conv3x3``.

    Args:
        channels: Input and output channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C, H, W]`` to the same shape."""
        return x + self.residual(x)


class SpatialMean(nn.Module):
    """``[N, C, H, W]`` to ``[N, C]``: the mean over positions."""

    def forward(self, x: Tensor) -> Tensor:
        """The mean over the last two axes."""
        return x.mean(dim=(2, 3))


def resnet_generator(nz: int, channels: int, side: int, width: int = 128) -> nn.Sequential:
    """The WGAN-GP ResNet generator: ``[N, nz]`` noise to ``[N, channels, side, side]`` in (-1, 1).

    Args:
        nz: Noise dimension (128 in the paper).
        channels: Image channels.
        side: Image side, a multiple of 8 (32 in the paper).
        width: Channels of every block (128 in the paper).

    Raises:
        ValueError: If ``side`` is not a multiple of 8.
    """
    start = _start(side)
    return nn.Sequential(
        nn.Linear(nz, width * start * start),
        nn.Unflatten(1, (width, start, start)),
        *(UpBlock(width) for _ in range(BLOCKS_G)),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, channels, 3, padding=1),
        nn.Tanh(),
    )


def resnet_critic(channels: int, side: int, width: int = 128) -> nn.Sequential:
    """The WGAN-GP ResNet critic: ``[N, channels, side, side]`` images to ``[N, 1]`` scores.

    Args:
        channels: Image channels.
        side: Image side, a multiple of 8 (32 in the paper; the blocks need 4).
        width: Channels of every block (128 in the paper).

    Raises:
        ValueError: If ``side`` is not a multiple of 8.
    """
    _start(side)
    return nn.Sequential(
        FirstDownBlock(channels, width),
        DownBlock(width),
        Block(width),
        Block(width),
        nn.ReLU(),
        SpatialMean(),
        nn.Linear(width, 1),
    )


def _start(side: int) -> int:
    if side % 2**BLOCKS_G or side < 2**BLOCKS_G:
        raise ValueError(
            f"The ResNet GAN needs an image side that is a multiple of 8 (32 in the paper), "
            f"got {side}: use --data cifar10, cifar100, svhn or synthetic (3x32x32)."
        )
    return side // 2**BLOCKS_G
