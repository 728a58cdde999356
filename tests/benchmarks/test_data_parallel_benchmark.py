"""Smoke test of ``benchmarks/data_parallel.py``: one and two gloo ranks, a tiny MLP."""

from __future__ import annotations

from tests.benchmarks.loader import benchmark_script


def test_every_configuration_reports_time_and_bytes() -> None:
    argv = ["--quick", "--approx", "kfac", "--widths", "12", "16", "4", "--batch", "32"]
    with benchmark_script("data_parallel") as dp:
        payload = dp.main(argv)
        text = dp.table(payload["rows"], payload)
    rows = payload["rows"]
    assert [(r["ranks"], r["split"]) for r in rows] == [(1, False), (2, False), (2, True)]
    assert all(r["ms_per_step"] > 0.0 for r in rows)
    one, two, split = rows
    assert one["stats_bytes"] == 0, "one rank communicates nothing"
    factors = 13**2 + 16**2 + 17**2 + 4**2
    assert two["stats_bytes"] == 4 * 8 + 4 * factors, "the header and the float32 factors"
    assert split["curvlib_bytes_per_step"] > two["curvlib_bytes_per_step"], "+ the directions"
    assert text.count("| KFAC |") == 3
