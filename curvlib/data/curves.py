r"""CURVES: synthetic 28x28 images of smooth curves (Hinton & Salakhutdinov 2006).

The deep-autoencoder benchmark of Hinton & Salakhutdinov ("Reducing the
dimensionality of data with neural networks", Science 2006) trains on images of
curves drawn through three random points in the plane. The original files are
not redistributed with curvlib; this module generates a data set of the same
kind, deterministically for a seed, in a few seconds:

1. three control points $p_0, p_1, p_2$ are drawn uniformly from the square
   $[0.15, 0.85]^2$ of the image;
2. the curve is the quadratic through them, $c(t) = \sum_j p_j L_j(t)$ with the
   Lagrange polynomials of the nodes $t = 0, \frac12, 1$ (so it passes through
   all three points), sampled at ``samples_per_curve`` points on $t \in [0, 1]$;
3. each pixel's intensity is $\max_s \exp(-d_s^2 / (2\sigma^2))$ with $d_s$ the
   distance from the pixel centre to curve point $s$ (in pixels) and pen width
   $\sigma$ = ``pen`` pixels, so values lie in $[0, 1]$ with a soft stroke;
   values below float32's smallest normal number are set to zero (far from the
   stroke: subnormal inputs make CPU matrix products about ten times slower).

Images are returned flattened, ``[num, 784]``, as float32 in $[0, 1]$: the
targets of a Bernoulli likelihood (``BCEWithLogitsLoss``) over the 784 pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IMAGE_SIZE = 28


@dataclass(frozen=True)
class CurvesSplit:
    """A generated data set.

    Attributes:
        train: ``[num_train, 784]`` images in $[0, 1]$.
        test: ``[num_test, 784]`` images in $[0, 1]$.
    """

    train: Tensor
    test: Tensor


def _lagrange(t: Tensor) -> Tensor:
    """Quadratic Lagrange basis of the nodes 0, 1/2, 1 at ``t``: ``[len(t), 3]``."""
    return torch.stack(
        [2 * (t - 0.5) * (t - 1.0), -4 * t * (t - 1.0), 2 * t * (t - 0.5)],
        dim=-1,
    )


def render_curves(points: Tensor, samples_per_curve: int = 64, pen: float = 0.8) -> Tensor:
    r"""Draw the quadratic curve through each triple of control points.

    Args:
        points: Control points in image coordinates $[0, 1]^2$, ``[num, 3, 2]``.
        samples_per_curve: Points sampled along each curve.
        pen: Stroke width $\sigma$ in pixels.

    Returns:
        ``[num, 784]`` images in $[0, 1]$.
    """
    t = torch.linspace(0.0, 1.0, samples_per_curve, dtype=points.dtype)
    curve = torch.einsum("sj,njc->nsc", _lagrange(t), points) * IMAGE_SIZE  # pixels
    centres = torch.arange(IMAGE_SIZE, dtype=points.dtype) + 0.5
    grid = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), dim=-1).reshape(-1, 2)
    dist2 = torch.cdist(grid.unsqueeze(0).expand(len(points), -1, -1), curve).square()
    images = torch.exp(-dist2.min(dim=-1).values / (2 * pen**2))
    return images.masked_fill(images < torch.finfo(torch.float32).tiny, 0.0)


def generate_curves(
    num_train: int = 20_000,
    num_test: int = 10_000,
    seed: int = 0,
    samples_per_curve: int = 64,
    pen: float = 0.8,
    chunk: int = 2_000,
) -> CurvesSplit:
    """Generate the CURVES data set deterministically for ``seed``.

    Args:
        num_train: Training images.
        num_test: Test images.
        seed: Seed of the control points; the same seed gives the same images.
        samples_per_curve: Points sampled along each curve.
        pen: Stroke width in pixels.
        chunk: Images rendered at once (bounds the memory).

    Returns:
        The train and test images, float32, ``[num, 784]``.

    Raises:
        ValueError: For non-positive sizes.
    """
    if num_train < 1 or num_test < 0 or chunk < 1 or samples_per_curve < 2 or pen <= 0:
        raise ValueError(
            "generate_curves needs num_train >= 1, num_test >= 0, chunk >= 1, "
            "samples_per_curve >= 2 and pen > 0."
        )
    gen = torch.Generator().manual_seed(seed)
    total = num_train + num_test
    points = 0.15 + 0.7 * torch.rand(total, 3, 2, generator=gen)
    images = torch.cat(
        [
            render_curves(points[i : i + chunk], samples_per_curve, pen).float()
            for i in range(0, total, chunk)
        ]
    )
    return CurvesSplit(train=images[:num_train], test=images[num_train:])
