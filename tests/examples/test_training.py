"""The shared telemetry of ``examples/training.py``: per-epoch summary of ``last_stats``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import training  # noqa: E402


class FakeCurvatureOptimizer(torch.optim.SGD):
    """Exposes ``last_stats`` and ``skipped_steps`` like curvlib's optimizer."""

    def __init__(self) -> None:
        super().__init__([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        self.last_stats: dict[str, Any] = {}
        self.skipped_steps = 0


def test_epoch_summary_gives_mean_and_last_and_counts(tmp_path: Path) -> None:
    opt = FakeCurvatureOptimizer()
    telemetry = training.Telemetry()
    stats = [
        {"kl_clip_factor": 0.5, "damping": 1e-3, "lm_ratio": None, "inverse_failures": 0,
         "time_step": 0.1, "time_inverse": 0.05},
        {"skipped": True, "skipped_steps": 1},
        {"kl_clip_factor": 1.0, "damping": 2e-3, "lm_ratio": 0.7, "inverse_failures": 2,
         "time_step": 0.2},
    ]  # fmt: skip
    for step, s in enumerate(stats, start=1):
        opt.last_stats = s
        opt.skipped_steps = 1 if step >= 2 else 0
        telemetry.observe(opt, step)
    row = telemetry.epoch_summary(opt)
    assert set(row) == set(training.TELEMETRY_FIELDS)
    assert row["kl_clip_factor"] == pytest.approx(0.75) and row["kl_clip_factor_last"] == 1.0
    assert row["damping"] == pytest.approx(1.5e-3) and row["damping_last"] == 2e-3
    assert row["lm_ratio"] == 0.7 and row["inverse_failures"] == 2 and row["skipped_steps"] == 1
    assert row["time_step"] == pytest.approx(0.3) and row["time_inverse"] == pytest.approx(0.05)
    assert [s["step"] for s in telemetry.steps] == [1, 3]  # the skipped step has no ν
    empty = telemetry.epoch_summary(opt)  # a new epoch without steps
    assert empty["kl_clip_factor"] is None and empty["time_step"] == 0.0
    training.write_telemetry(tmp_path, telemetry.steps, "t")
    assert (tmp_path / "telemetry.png").read_bytes()[:4] == b"\x89PNG"


def test_torch_optimizers_have_no_telemetry(tmp_path: Path) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    telemetry = training.Telemetry()
    telemetry.observe(opt, 1)
    assert all(v is None for v in telemetry.epoch_summary(opt).values())
    training.write_telemetry(tmp_path, telemetry.steps, "t")
    assert not (tmp_path / "telemetry.png").exists()
