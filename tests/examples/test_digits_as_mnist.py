"""``examples/digits_as_mnist.py``: scikit-learn's digits written as MNIST's IDX files."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import data  # noqa: E402
import digits_as_mnist  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_mnist_loader_reads_the_digits_with_their_labels(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits
    from torchvision.datasets import MNIST

    digits_as_mnist.main([str(tmp_path)])
    split = data.load_mnist(tmp_path, None, None)
    assert split.train.shape == (1497, 784) and split.test.shape == (300, 784)
    assert float(split.train.min()) >= 0.0 and float(split.train.max()) == 1.0
    digits = load_digits()
    train = MNIST(str(tmp_path), train=True, download=False)
    test = MNIST(str(tmp_path), train=False, download=False)
    assert np.array_equal(train.targets.numpy(), digits.target[:1497])
    assert np.array_equal(test.targets.numpy(), digits.target[1497:])

    # Each 28x28 image, pooled back to 8x8, is its digit: it correlates with its own
    # 8x8 original far better than with the transposed original.
    images = torch.cat([split.train, split.test]).view(-1, 1, 28, 28)
    pooled = torch.nn.functional.adaptive_avg_pool2d(images, 8).flatten(1).double()
    original = torch.tensor(digits.images).double()

    def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))

    own = correlation(pooled, original.flatten(1))
    transposed = correlation(pooled, original.transpose(1, 2).flatten(1))
    assert float(own.min()) > 0.9, float(own.min())
    assert float(own.mean()) > float(transposed.mean()) + 0.2


def test_the_autoencoder_trains_on_the_stand_in(tmp_path: Path) -> None:
    import autoencoder

    digits_as_mnist.write_digits_as_mnist(tmp_path / "root")
    argv = ["--data", "mnist", "--data-root", str(tmp_path / "root"), "--optim", "adam",
            "--num-train", "200", "--num-test", "50", "--batch-size", "50", "--num-epochs", "1",
            "--no-progress", "--out", str(tmp_path / "run")]  # fmt: skip
    (result,) = autoencoder.main(argv)
    assert result.final["train_loss"] < result.metrics[0]["train_loss"]
