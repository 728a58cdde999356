"""Smoke test of the device mode of ``benchmarks/step_time.py`` (``benchmarks/device_step.py``)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from curvlib.linalg import precision
from tests.benchmarks.loader import benchmark_script


def _run(argv: list[str]) -> None:
    threads = torch.get_num_threads()
    try:
        with benchmark_script("step_time") as st:
            st.main(argv)
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("device_step", None)  # it imported the step_time loaded above


def test_device_mode_times_counts_and_floors_every_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A CPU that multiplies bfloat16 chooses a large layer's apply dtype by its condition
    # number, which an inverse built ahead of its check cannot know: the deferred
    # statistics step then reads as often as the host one. The counts below are those of
    # float32 applies, on every CPU.
    monkeypatch.setattr(precision, "cpu_multiplies_bfloat16", lambda: False)
    # One thread: with two on two cores, any other process stalls OpenMP's barriers.
    argv = ["--device", "cpu", "--batch-sizes", "32", "--intervals", "2", "--methods",
            "sgd,kfac,kfac-deferred", "--windows", "2", "--floor-rounds", "1",
            "--resnet-batch", "0", "--threads", "1", "--out", str(tmp_path)]  # fmt: skip
    _run(argv)
    payload = json.loads((tmp_path / "step_time_cpu.json").read_text())
    assert payload["device"]["type"] == "cpu" and payload["device"]["name"]
    assert payload["commit"] and payload["date"] and "--device cpu" in payload["command"]
    assert payload["device"]["torch"] == torch.__version__
    rows = {(r["name"], r["interval"]): r for r in payload["rows"]}
    assert set(rows) == {("adam", None), ("sgd", None), ("kfac", 2), ("kfac-deferred", 2)}
    for row in rows.values():
        assert row["error"] is None, row["error"]
        assert len(row["windows_ms"]) == 2 and all(t > 0 for t in row["windows_ms"])
        assert row["kernels"]["regular"] > 0  # aten operators: the CPU's proxy
        assert row["peak_mib"] is None and row["sync_warnings"] is None  # CUDA only
    kfac = rows["kfac", 2]
    # One host read per regular step (tests/optim/test_host_syncs.py); the statistics
    # step reads at least as often.
    assert kfac["host_reads"]["regular"] == 1
    assert kfac["host_reads"]["statistics"] >= kfac["host_reads"]["regular"]
    # Deferred checks (the default on a GPU): a regular step reads nothing, not even for
    # the benchmark's own look at the step's times; the statistics step once less (its
    # inverse is checked with the directions' measurements).
    deferred = rows["kfac-deferred", 2]
    assert deferred["host_reads"]["regular"] == 0
    assert deferred["host_reads"]["statistics"] == kfac["host_reads"]["statistics"] - 1
    assert kfac["kernels"]["statistics"] > kfac["kernels"]["regular"]
    assert rows["adam", None]["vs_adam"] == 1.0
    for key in ("vs_adam", "vs_sgd", "floor_ms", "vs_floor"):
        assert math.isfinite(kfac[key]) and kfac[key] > 0
    floor = payload["floors"]["autoencoder/32"]
    assert {"base_step", "apply2", "gemm", "mc_backward", "cholesky"} <= set(floor)
    # The floor is the base step, the apply and a T-th of the statistics and inverses.
    expected = floor["base_step"] + floor["apply2"]
    expected += (floor["gemm"] + floor["mc_backward"] + floor["cholesky"]) / 2
    assert kfac["floor_ms"] == pytest.approx(1e3 * expected)
    table = (tmp_path / "step_time_cpu.md").read_text()
    assert payload["commit"] in table and "| autoencoder | KFAC (PI) | 32 | 2 |" in table


def test_resnet_rows_say_why_without_torchvision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision fails
    argv = ["--device", "cpu", "--batch-sizes", "", "--methods", "kfac", "--intervals", "2",
            "--resnet-batch", "2", "--out", str(tmp_path)]  # fmt: skip
    _run(argv)
    rows = json.loads((tmp_path / "step_time_cpu.json").read_text())["rows"]
    assert [(r["problem"], r["name"]) for r in rows] == [("resnet18", "adam"), ("resnet18", "kfac")]
    assert all("torchvision not importable" in r["error"] for r in rows)
