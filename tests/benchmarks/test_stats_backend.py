"""Smoke test of ``benchmarks/stats_backend.py``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.benchmarks.loader import benchmark_script


def test_every_configuration_is_timed_against_the_first(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    argv = ["--tasks", "digits-mlp", "--steps", "40", "--threads", "1", "--out", str(tmp_path)]
    try:
        with benchmark_script("stats_backend") as sb:
            sb.main(argv)
    finally:
        torch.set_num_threads(threads)
    payload = json.loads((tmp_path / "stats_backend.json").read_text())
    (task,) = payload["tasks"]
    assert task["task"] == "digits-mlp" and task["windows"] == 2
    rows = task["rows"]
    assert [r["config"] for r in rows][-1] == "auto, layers at once (the defaults)"
    assert len(rows) == 4 and rows[0]["ratio"] == 1.0
    assert all(r["ms_per_step"] > 0.0 and r["vs_adam"] > 0.0 for r in rows)
    table = (tmp_path / "stats_backend.md").read_text()
    assert "--tasks digits-mlp" in table and table.count("| digits-mlp |") == 4
