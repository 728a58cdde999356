"""The CURVES generator is deterministic, in range, and draws through its control points."""

from __future__ import annotations

import pytest
import torch

from curvlib.data import generate_curves, render_curves


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    first = generate_curves(num_train=50, num_test=20, seed=3)
    second = generate_curves(num_train=50, num_test=20, seed=3, chunk=7)
    other = generate_curves(num_train=50, num_test=20, seed=4)
    assert first.train.shape == (50, 784) and first.test.shape == (20, 784)
    assert torch.equal(first.train, second.train) and torch.equal(first.test, second.test)
    assert not torch.equal(first.train, other.train)


def test_values_are_intensities() -> None:
    images = generate_curves(num_train=100, num_test=0).train
    assert images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    lit = (images > 0.5).float().sum(dim=1)
    assert float(lit.min()) >= 5  # every image shows a stroke, not a dot or nothing
    assert float(lit.mean()) < 0.3 * 784  # and mostly background


def test_curve_passes_through_the_control_points() -> None:
    points = torch.tensor([[[0.2, 0.3], [0.5, 0.8], [0.8, 0.25]]])
    image = render_curves(points, samples_per_curve=201).reshape(28, 28)
    for x, y in points[0]:
        col, row = int(x * 28), int(y * 28)
        assert float(image[row, col]) > 0.5
    assert float(image[0, 0]) < 1e-3


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_train"):
        generate_curves(num_train=0)
