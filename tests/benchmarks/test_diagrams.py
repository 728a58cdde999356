"""The documentation's diagrams are drawn from curvlib's own layouts and statistics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from tests.benchmarks.loader import benchmark_script


@pytest.fixture(scope="module")
def diagrams() -> Iterator[ModuleType]:
    with benchmark_script("diagrams") as module:
        yield module


def test_the_layout_figure_shows_curvlibs_vectorisation(diagrams: ModuleType) -> None:
    mat = diagrams.indexed_matrix(nn.Conv2d(2, 3, kernel_size=2))
    assert mat.shape == (3, 2 * 2 * 2 + 1)
    # Row-major [W | b]: the weights of output channel o in storage order, then its bias.
    torch.testing.assert_close(mat[1, :-1], torch.arange(8, 16, dtype=torch.float64))
    assert mat[:, -1].tolist() == [24.0, 25.0, 26.0]


def test_the_rearrangement_of_a_kronecker_product_has_rank_one(diagrams: ModuleType) -> None:
    g, a = torch.randn(3, 3, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    r = diagrams.rearranged(torch.kron(g, a), 3, 4)
    torch.testing.assert_close(r, torch.outer(g.flatten(), a.flatten()))


def test_the_figures_are_written(diagrams: ModuleType, tmp_path: Path) -> None:
    diagrams.main(["--out", str(tmp_path)])
    for name in ("layout.png", "rearrangement.png"):
        assert (tmp_path / name).stat().st_size > 10_000
