"""The GAN example's networks: the small DCGAN pair, ``--arch`` and the composite model.

* ``generator``: ``[N, nz]`` noise through ``ConvTranspose2d`` + ``BatchNorm2d``
  (train mode) + ReLU stages to ``tanh`` images.
* ``critic``: strided convolutions with LeakyReLU and a linear score ``[N, 1]``.
* ``networks``: the pair of ``--arch`` (``dcgan`` above, or the WGAN-GP ResNet
  of ``examples/gan_resnet.py``).
* ``GAN``: both networks in one module, ``forward(z) = critic(generator(z))``:
  the model whose Fisher preconditions the generator.
"""

from __future__ import annotations

import argparse

from gan_resnet import resnet_critic, resnet_generator
from torch import Tensor, nn

ARCHS = ("dcgan", "resnet")
"""The names of ``--arch``."""


def generator(nz: int, channels: int, side: int, width: int = 16) -> nn.Sequential:
    """DCGAN generator: ``[N, nz]`` noise to ``[N, channels, side, side]`` images in (-1, 1).

    ``ConvTranspose2d(nz, 4w, side/4)`` + BN + ReLU, ``ConvTranspose2d(4w, 2w, 4, 2)``
    + BN + ReLU, ``ConvTranspose2d(2w, channels, 4, 2)`` + tanh.

    Raises:
        ValueError: If ``side`` is not a multiple of 4.
    """
    if side % 4:
        raise ValueError(f"The image side must be a multiple of 4, got {side}.")
    return nn.Sequential(
        nn.Unflatten(1, (nz, 1, 1)),
        nn.ConvTranspose2d(nz, 4 * width, side // 4, bias=False),
        nn.BatchNorm2d(4 * width),
        nn.ReLU(),
        nn.ConvTranspose2d(4 * width, 2 * width, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.ConvTranspose2d(2 * width, channels, 4, stride=2, padding=1),
        nn.Tanh(),
    )


def critic(channels: int, side: int, width: int = 16) -> nn.Sequential:
    """Critic: two strided 4x4 convs with LeakyReLU(0.2), then a linear score ``[N, 1]``.

    No BatchNorm: the WGAN-GP penalty needs per-sample scores, and the BCE critic
    then sees real and generated images in one batch without coupling them.
    """
    return nn.Sequential(
        nn.Conv2d(channels, 2 * width, 4, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(2 * width, 4 * width, 4, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(4 * width * (side // 4) ** 2, 1),
    )


def networks(args: argparse.Namespace, channels: int, side: int) -> tuple[nn.Module, nn.Module]:
    """The generator and the critic of ``--arch`` for ``[channels, side, side]`` images.

    Raises:
        ValueError: If ``side`` does not suit the architecture.
    """
    if args.arch == "resnet":
        return (
            resnet_generator(args.nz, channels, side, args.width),
            resnet_critic(channels, side, args.width),
        )
    return generator(args.nz, channels, side, args.width), critic(channels, side, args.width)


class GAN(nn.Module):
    """Both networks; ``forward(z) = critic(generator(z))``, the generator's composite model.

    Args:
        generator: Noise to images.
        critic: Images to ``[N, 1]`` scores (logits for ``bce``).
    """

    def __init__(self, generator: nn.Module, critic: nn.Module) -> None:
        super().__init__()
        self.generator = generator
        self.critic = critic

    def forward(self, z: Tensor) -> Tensor:
        """The critic's score of generated images, ``[N, 1]``."""
        return self.critic(self.generator(z))
