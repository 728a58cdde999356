"""How the GAN example scores its generator: the data, the scores and their floors.

``Setup`` holds the real images of a run (pixels in [-1, 1]) with the scores
fitted to them: the offline Fréchet distance in PCA space ``fd``
(``examples/gan_quality.py``) and, with ``--fid-weights``, the Fréchet Inception
Distance ``fid`` (``examples/gan_fid.py``), each next to its floor, the score of
real training images against the same test images. ``Setup.score`` is the row
of those scores that every epoch of ``metrics.csv`` holds; ``samples`` draws
images without moving the generator's BatchNorm statistics.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from data import ImageSplit
from gan_fid import FrechetInception
from gan_quality import FrechetPCA
from report import Row, finite
from torch import Tensor, nn

QUALITY_FIT = 2_000
"""Real training images the PCA basis of ``fd`` is fitted to (the first ones)."""


@dataclass(frozen=True)
class Setup:
    """Data and scores shared by every run of a comparison.

    Attributes:
        train: ``[N, C, H, W]`` real images in [-1, 1].
        test: Real images for the quality score.
        quality: The fitted ``FrechetPCA``.
        fd_real: Real training images against ``test``: the score's floor.
        name: Data set name.
        fid: The FID against ``test`` (``--fid-weights``), or ``None``.
        fid_real: The FID of real training images: its floor.
    """

    train: Tensor
    test: Tensor
    quality: FrechetPCA
    fd_real: float
    name: str
    fid: FrechetInception | None = None
    fid_real: float | None = None

    def score(self, generator: nn.Module, z: Tensor) -> Row:
        """``fd`` and ``fd_real`` (and ``fid``, ``fid_real``) of images generated from ``z``."""
        fake = samples(generator, z)
        row: Row = {"fd": finite(self.quality.score(self.test, fake.cpu()))}
        row["fd_real"] = self.fd_real
        if self.fid is not None:
            row["fid"], row["fid_real"] = finite(self.fid.score(fake)), self.fid_real
        return row


def prepare(
    split: ImageSplit, fd_dims: int, fid_weights: Path | None, device: torch.device
) -> Setup:
    """Scale ``split``'s images to [-1, 1] (the training images on ``device``), fit the scores.

    The last ``len(test)`` training images give the floors ``fd_real`` and ``fid_real``.

    Args:
        split: Images in [0, 1].
        fd_dims: PCA directions of ``fd``.
        fid_weights: torch-fidelity's InceptionV3 weights, or ``None`` for no ``fid``.
        device: Where training (and the Inception network) runs.

    Raises:
        FidUnavailable: If ``fid_weights`` is given but cannot be used.
    """
    train = (split.train_x * 2 - 1).to(device)
    test = split.test_x * 2 - 1
    quality = FrechetPCA(train[:QUALITY_FIT].cpu(), fd_dims)
    fd_real = quality.score(test, train[-len(test) :].cpu())
    fid, fid_real = None, None
    if fid_weights is not None:
        fid = FrechetInception(fid_weights, test, device)
        fid_real = finite(fid.score(train[-len(test) :]))
    return Setup(train, test, quality, fd_real, split.name, fid, fid_real)


@torch.no_grad()
def samples(generator: nn.Module, z: Tensor) -> Tensor:
    """Images from ``z`` by a copy of ``generator`` in train mode (batch statistics).

    The copy keeps the sampling from moving the running BatchNorm statistics.
    """
    return copy.deepcopy(generator).train()(z)
