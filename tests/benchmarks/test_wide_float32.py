"""``benchmarks/wide_float32.py`` at a small width: float32 survives in function space only."""

from __future__ import annotations

import json
from pathlib import Path

from tests.benchmarks.loader import benchmark_script


def test_float32_function_space_is_accurate_and_parameter_space_is_not(tmp_path: Path) -> None:
    with benchmark_script("wide_float32") as bench:
        errors = bench.main(["--width", "128", "--num-samples", "20", "--out", str(tmp_path)])
    for form in ("exact", "block_diagonal", "block_tridiagonal"):
        assert errors[f"function space {form}, damping 0"] < 1e-3
    assert errors["parameter space exact, damping 1e-08"] > 1.0
    saved = json.loads((tmp_path / "wide_float32.json").read_text())
    assert saved["relative_errors"] == errors and "commit" in saved
