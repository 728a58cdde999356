"""``decay=1``: the estimate after a pass over a data set is its mean over all samples."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlib import EKFAC, KFAC, CurvatureExtractor, Diagonal, FisherType
from curvlib.approx.base import LayerwiseApprox

APPROXIMATIONS = [KFAC, Diagonal]
"""The approximations whose estimate is linear in the statistics (factors, diagonals)."""


def _fit(approx: LayerwiseApprox, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    loss_fn = nn.MSELoss()
    extractor = CurvatureExtractor(
        model, loss_fn, stats=approx.required_stats, fisher_type=FisherType.EXACT
    )
    for x, y in batches:
        with extractor.collect():
            loss_fn(model(x), y).backward()
        approx.update(extractor.statistics())


@pytest.mark.parametrize("cls", APPROXIMATIONS, ids=lambda c: c.__name__)
def test_decay_one_is_the_sample_weighted_mean(cls: type[LayerwiseApprox]) -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(23, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(23, 2, generator=generator, dtype=torch.float64)
    sizes = [10, 4, 9]  # unequal batches: a plain mean over updates would be wrong
    batches, start = [], 0
    for size in sizes:
        batches.append((x[start : start + size], y[start : start + size]))
        start += size
    in_pieces, whole = cls(decay=1.0), cls(decay=1.0)
    _fit(in_pieces, batches)
    _fit(whole, [(x, y)])
    assert in_pieces.num_samples_seen == whole.num_samples_seen == 23
    for name in whole.blocks:
        torch.testing.assert_close(
            in_pieces.to_dense(name), whole.to_dense(name), rtol=1e-12, atol=1e-14
        )
    # A windowed average of the same batches is not the data-set mean.
    windowed = cls(decay=0.5)
    _fit(windowed, batches)
    name = next(iter(whole.blocks))
    assert not torch.allclose(windowed.to_dense(name), whole.to_dense(name), rtol=1e-6)


def test_decay_one_resumes_from_a_state_dict() -> None:
    generator = torch.Generator().manual_seed(2)
    batches = [
        (
            torch.randn(n, 3, generator=generator, dtype=torch.float64),
            torch.randn(n, 2, generator=generator, dtype=torch.float64),
        )
        for n in (6, 3, 8)
    ]
    straight = KFAC(decay=1.0)
    _fit(straight, batches)
    first = KFAC(decay=1.0)
    _fit(first, batches[:2])
    resumed = KFAC(decay=1.0)
    resumed.load_state_dict(first.state_dict())
    assert resumed.num_samples_seen == 9
    _fit(resumed, batches[2:])
    for name in straight.blocks:
        torch.testing.assert_close(resumed.to_dense(name), straight.to_dense(name))


@pytest.mark.parametrize("decay", [-0.1, 1.5, float("nan")])
def test_decay_outside_the_unit_interval_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match=r"decay must lie in \[0, 1\]"):
        EKFAC(decay=decay)
