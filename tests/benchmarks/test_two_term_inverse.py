"""Smoke test of ``benchmarks/two_term_inverse.py``."""

from __future__ import annotations

import torch

from tests.benchmarks.loader import benchmark_script


def test_both_versions_are_timed_on_every_layer_and_agree() -> None:
    threads = torch.get_num_threads()
    with benchmark_script("two_term_inverse") as bench:
        payload = bench.main(
            ["--quick", "--repeats", "1", "--baseline", "HEAD"]
        )  # any clone has HEAD
    assert torch.get_num_threads() == threads  # restored after the one-thread run
    rows = payload["rows"]
    assert [r["layer"] for r in rows] == ["60->40", "40->20", "20->40", "40->60"]
    assert all(r["A"] == int(r["layer"].split("->")[0]) + 1 for r in rows)  # the bias column
    assert all(r["old_ms"] > 0.0 and r["new_ms"] > 0.0 and r["eigh_ms"] > 0.0 for r in rows)
    assert all(r["rel_diff"] < 1e-4 for r in rows)  # the same inverse, float32
    (ratio,) = payload["round_ratios"]  # one round: the whole network's new time over its old
    assert ratio == sum(r["new_ms"] for r in rows) / sum(r["old_ms"] for r in rows)
    assert payload["ratio"] == ratio


def test_dead_coordinates_are_drawn_on_every_side_of_both_terms() -> None:
    with benchmark_script("two_term_inverse") as bench:
        G1, A1, G2, A2 = bench.factors(40, 61, seed=0, dead=0.25)
        payload = bench.main(["--quick", "--repeats", "1", "--baseline", "HEAD", "--dead", "0.5"])
    for first, second, dead in ((G1, G2, 10), (A1, A2, 15)):
        zero = first.eq(0).all(0)
        assert int(zero.sum()) == dead
        assert bool(second[:, zero].eq(0).all()) and bool(second[zero].eq(0).all())
    assert payload["dead"] == 0.5
    assert all(r["rel_diff"] < 1e-4 for r in payload["rows"])
