"""Smoke test of ``benchmarks/data_parallel.py``: one and two gloo ranks, a tiny MLP."""

from __future__ import annotations

from pathlib import Path

from tests.benchmarks.loader import benchmark_script


def test_every_configuration_reports_time_and_bytes(tmp_path: Path) -> None:
    argv = ["--quick", "--approx", "kfac", "ekfac", "--widths", "12", "16", "4", "--batch", "32"]
    with benchmark_script("data_parallel") as dp:
        payload = dp.main(argv)
        text = dp.table(payload["rows"], payload)
        dp.plot(payload, tmp_path / "data_parallel.png")
    assert (tmp_path / "data_parallel.png").stat().st_size > 10_000, "a figure was drawn"
    rows = payload["rows"]
    kfac_configs = [(1, None), (2, None), (2, "directions"), (2, "inverses")]
    assert [(r["approx"], r["ranks"], r["split"]) for r in rows] == [
        *(("kfac", *config) for config in kfac_configs),
        *(("ekfac", *config) for config in kfac_configs[:3]),  # its inverse: on every rank
    ]
    assert all(r["ms_per_step"] > 0.0 for r in rows)
    one, two, split, inverses = rows[:4]
    assert one["stats_bytes"] == 0, "one rank communicates nothing"
    factors = 13**2 + 16**2 + 17**2 + 4**2
    assert two["stats_bytes"] == 4 * 8 + 4 * factors, "the header and the float32 factors"
    assert split["curvlib_bytes_per_step"] > two["curvlib_bytes_per_step"], "+ the directions"
    assert split["shared_bytes"] == 4 * (12 * 16 + 16 + 16 * 4 + 4), "float32 directions"
    # Inverses: G'^{-1}, A'^{-1} and the condition number of both layers, once per rebuild.
    assert inverses["shared_bytes"] == 4 * (factors + 2)
    assert two["curvlib_bytes_per_step"] < inverses["curvlib_bytes_per_step"]
    assert inverses["curvlib_bytes_per_step"] < split["curvlib_bytes_per_step"]
    assert text.count("| KFAC |") == 4 and "| KFAC | 2 | inverses |" in text
    # EKFAC's split broadcasts, last, the new scalings of both layers ([d_out, d_in + 1]
    # each) on the last statistics step.
    _, ekfac_two, ekfac_split = rows[4:]
    assert ekfac_two["shared_bytes"] == 0
    assert ekfac_split["shared_bytes"] == 4 * (16 * 13 + 4 * 17)
    assert text.count("| EKFAC |") == 3
