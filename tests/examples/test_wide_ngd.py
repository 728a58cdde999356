"""``examples/wide_ngd.py`` at a small width: outputs written, natural gradient far ahead of GD."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import wide_ngd  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_small_run_writes_the_figure_and_ngd_beats_gd(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["--width", "256", "--num-samples", "40", "--steps", "3", "--out", str(tmp_path)]
        results = wide_ngd.main(args)
    finally:
        torch.set_num_threads(threads)
    assert set(results) == set(wide_ngd.DEFAULT_METHODS)
    assert (tmp_path / "wide_ngd.png").read_bytes()[:8] == PNG_MAGIC
    with (tmp_path / "wide_ngd.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 * 4  # 3 steps: the loss before each and after the last
    meta = json.loads((tmp_path / "wide_ngd.json").read_text())
    assert meta["settings"]["width"] == 256 and "date" in meta and "commit" in meta
    assert meta["learning_rates"]["block_diagonal"] == pytest.approx(1 / 3)
    initial = results["gd"][0]
    assert all(losses[0] == pytest.approx(initial) for losses in results.values())
    for method in ("exact", "block_diagonal", "block_tridiagonal"):
        assert results[method][1] < initial / 10, (method, results[method])
        assert results[method][-1] < 1e-3 * results["gd"][-1], (method, results[method])


def test_unknown_methods_are_refused() -> None:
    with pytest.raises(SystemExit):
        wide_ngd.main(["--methods", "exact,newton"])


def test_kfac_on_request_at_its_learning_rate(tmp_path: Path) -> None:
    args = ["--width", "256", "--num-samples", "20", "--steps", "2", "--methods", "gd,kfac"]
    results = wide_ngd.main([*args, "--out", str(tmp_path)])
    meta = json.loads((tmp_path / "wide_ngd.json").read_text())
    assert meta["learning_rates"] == {"kfac": pytest.approx(1 / 41)}
    assert results["kfac"][1] < results["kfac"][0] / 3, results["kfac"]
    assert results["kfac"][-1] < results["gd"][-1] / 100, results


def test_unit_wise_on_request_at_its_learning_rate(tmp_path: Path) -> None:
    args = ["--width", "256", "--num-samples", "20", "--steps", "2", "--methods", "gd,unit_wise"]
    results = wide_ngd.main([*args, "--out", str(tmp_path)])
    meta = json.loads((tmp_path / "wide_ngd.json").read_text())
    assert meta["learning_rates"] == {"unit_wise": pytest.approx(1 / 129)}
    assert results["unit_wise"][1] < results["unit_wise"][0] / 10, results["unit_wise"]
    assert results["unit_wise"][-1] < results["gd"][-1] / 100, results
