"""Smoke test of ``benchmarks/fisher_quality.py``: the quick configuration runs and writes."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from curvlib.approx import block_error, exact_block
from curvlib.core import ModelLayout
from curvlib.core.stats import LayerStatistics, PerSampleIO
from tests.benchmarks.loader import benchmark_script

METHODS = {"KFAC", "EKFAC", "KPSVD", "KFAC-corrected", "Deflation", "Lanczos", "Diagonal"}


@pytest.fixture(scope="module")
def fq() -> Iterator[ModuleType]:
    with benchmark_script("fisher_quality") as module:
        yield module


def test_quick_run_writes_its_files(fq: ModuleType, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    fq.main(["--quick", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # restored
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"fisher_quality.{suffix}").stat().st_size > 0
    payload = json.loads((tmp_path / "fisher_quality.json").read_text())
    assert set(payload["methods"]) == METHODS
    assert len(payload["checkpoints"]) >= 2
    for checkpoint in payload["checkpoints"]:
        errors = checkpoint["errors"]
        assert set(errors) == METHODS
        assert all(math.isfinite(v) and v >= 0 for e in errors.values() for v in e.values())
        kpsvd, kfac = errors["KPSVD"]["frobenius"], errors["KFAC"]["frobenius"]
        assert kpsvd <= kfac * (1 + 1e-6) + 1e-12, checkpoint["step"]
        assert errors["EKFAC"]["frobenius"] <= kfac * (1 + 1e-9), checkpoint["step"]
        assert checkpoint["exact_block_check"] < 1e-10
    assert "| **mean** |" in (tmp_path / "fisher_quality.md").read_text()


def test_quick_without_out_writes_nothing(
    fq: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fq, "DEFAULT_OUT", tmp_path / "results")
    fq.main(["--quick", "--steps", "1", "--every", "1", "--eval-batch", "4"])
    assert not (tmp_path / "results").exists()


def test_fisher_block_equals_exact_block(fq: ModuleType) -> None:
    gen = torch.Generator().manual_seed(0)
    io = PerSampleIO(
        inputs=torch.randn(5, 1, 4, generator=gen, dtype=torch.float64),
        output_grads=torch.randn(3, 5, 1, 2, generator=gen, dtype=torch.float64),
    )
    (layer,) = ModelLayout.from_model(torch.nn.Sequential(torch.nn.Linear(3, 2))).layers
    expected = exact_block(LayerStatistics(layer=layer, io=io))
    torch.testing.assert_close(fq.fisher_block(io), expected, rtol=1e-12, atol=1e-12)


def test_errors_equal_block_error(fq: ModuleType) -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randn(6, 9, generator=gen, dtype=torch.float64) for _ in range(2))
    exact, approx = a @ a.T, b @ b.T - 0.5 * torch.eye(6, dtype=torch.float64)
    reference = block_error(exact, approx)
    for shared in (None, fq.eigenvalues(exact)):
        errors = fq.relative_errors(exact, approx, shared)
        assert errors["frobenius"] == pytest.approx(reference.frobenius, rel=1e-12)
        assert errors["spectrum"] == pytest.approx(reference.spectrum, rel=1e-12)
