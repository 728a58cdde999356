"""Real digits offline in MNIST's format: scikit-learn's 1,797 digits as MNIST's IDX files.

No MNIST file can be downloaded here, but scikit-learn bundles 1,797 real
handwritten digits (8x8 pixels, intensities 0-16). This script upscales them
to 28x28 (bilinear), scales them to bytes 0-255 and writes MNIST's four IDX
files under ``ROOT/MNIST/raw/``: the first 1,497 as the training set, the last
300 as the test set. ``--data mnist --data-root ROOT`` then runs the MNIST
commands of the examples, network included, on real images; it is a stand-in,
30x smaller than MNIST, with blurrier strokes. Needs scikit-learn (the
``test`` and ``benchmarks`` extras).

Example (from the repository root)::

    python examples/digits_as_mnist.py /tmp/digits
    python examples/autoencoder.py --data mnist --data-root /tmp/digits
"""

from __future__ import annotations

import argparse
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

NUM_TRAIN = 1_497
"""Digits written as the training set (the first ones); the other 300 are the test set."""
SIDE = 28
"""MNIST's image side."""
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
"""The IDX headers' magic numbers of MNIST's image and label files."""


def digits_28x28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``[1797, 28, 28]`` uint8 images and ``[1797]`` uint8 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    images = torch.nn.functional.interpolate(images, size=(SIDE, SIDE), mode="bilinear")
    pixels = (images.squeeze(1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return pixels, digits.target.astype(np.uint8)


def write_digits_as_mnist(root: Path) -> Path:
    """Write ``train-``/``t10k-`` ``images-idx3-ubyte`` and ``labels-idx1-ubyte``.

    Args:
        root: The ``--data-root`` to be; the files go to ``root/MNIST/raw/``.

    Returns:
        The directory of the four files.
    """
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    pixels, labels = digits_28x28()
    for prefix, part in (("train", slice(0, NUM_TRAIN)), ("t10k", slice(NUM_TRAIN, None))):
        x, y = pixels[part], labels[part]
        header = struct.pack(">IIII", IMAGES_MAGIC, len(x), SIDE, SIDE)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + x.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", LABELS_MAGIC, len(y)) + y.tobytes()
        )
    return raw


def main(argv: Sequence[str] | None = None) -> Path:
    """Parse ``argv`` (default ``sys.argv``) and write the files."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("root", type=Path, help="the --data-root to write MNIST/raw/ under")
    raw = write_digits_as_mnist(parser.parse_args(argv).root)
    print(f"wrote {NUM_TRAIN} training and {1_797 - NUM_TRAIN} test digits to {raw}/")
    return raw


if __name__ == "__main__":
    main()
