"""Smoke test of the interleaved mode of ``benchmarks/step_time.py``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.benchmarks.loader import benchmark_script


def test_interleaved_mode_times_every_row_and_writes_its_ratios(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    argv = ["--interleave", "2", "--batch-sizes", "32", "--intervals", "2,6",
            "--only", "kfac,kfac+nicolaides-additive", "--out", str(tmp_path)]  # fmt: skip
    try:
        with benchmark_script("step_time") as st:
            st.main(argv)
    finally:
        torch.set_num_threads(threads)
    payload = json.loads((tmp_path / "step_time_interleaved.json").read_text())
    for name in ("kfac", "kfac+nicolaides-additive"):
        times = payload["times"][name]
        # Two windows of T=2 steps: one statistics+inverse step and one plain step each.
        assert len(times["special"]) == 2 and len(times["plain"]) == 2
        assert all(t > 0.0 for t in times["special"] + times["plain"])
    table = (tmp_path / "step_time_interleaved.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| KFAC")]
    assert len(rows) == 2
    assert rows[0].endswith("| 1.000 | 1.000 |")  # the first row is the reference
    assert "--interleave 2" in table[0]
    capability = torch.backends.cpu.get_cpu_capability()
    assert payload["machine"]["cpu_capability"] == capability
    assert f"{capability}; bfloat16 products " in table[0]
