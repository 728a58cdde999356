"""A training process killed with SIGKILL mid-epoch resumes to the uninterrupted result.

The examples write ``checkpoint.pt`` after every epoch; ``--resume`` restores the
model, the optimizer (curvature, momentum, random state of the MC targets) and
the data order, so the epoch the kill interrupted is trained again exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import training  # noqa: E402

ARGS = [
    "--data", "curves", "--num-train", "120", "--num-test", "40", "--batch-size", "40",
    "--num-epochs", "3", "--optim", "kfac", "--threads", "1", "--no-progress",
]  # fmt: skip
STEPS_PER_EPOCH = 3

# Runs examples/autoencoder.py; with KILL_AT set, the process sends itself SIGKILL
# just before that (1-based) training step: mid-epoch, with no chance to clean up.
SCRIPT = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import autoencoder, training
kill_at, taken = int(os.environ.get("KILL_AT", "0")), []
step = training.step_optimizer
def killing_step(optimizer, *losses):
    taken.append(1)
    if len(taken) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(optimizer, *losses)
training.step_optimizer = killing_step
autoencoder.main(sys.argv[2:])
"""


def _run(out: Path, *extra: str, kill_at: int = 0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KILL_AT": str(kill_at), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(EXAMPLES), *ARGS, "--out", str(out), *extra],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def _without_times(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    timed = {"wall_time", "epoch_time", *training.TIMINGS}
    return [{k: v for k, v in row.items() if k not in timed} for row in rows]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = _run(straight)
    assert done.returncode == 0, done.stderr
    # Killed in the middle of epoch 2: its checkpoint is that of epoch 1.
    crash = _run(killed, kill_at=STEPS_PER_EPOCH + 2)
    assert crash.returncode == -signal.SIGKILL, crash.stderr
    partial = torch.load(killed / training.CHECKPOINT, weights_only=True)
    assert partial["epoch"] == 1
    resumed = _run(killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 1" in resumed.stdout + resumed.stderr

    a = torch.load(straight / training.CHECKPOINT, weights_only=True)
    b = torch.load(killed / training.CHECKPOINT, weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    assert list(a["model"]) == list(b["model"])
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    history_a = json.loads((straight / "metrics.json").read_text())
    history_b = json.loads((killed / "metrics.json").read_text())
    assert [row["epoch"] for row in history_b] == [0, 1, 2, 3]
    assert _without_times(history_a) == _without_times(history_b)
    telemetry_a = json.loads((straight / "telemetry.json").read_text())
    telemetry_b = json.loads((killed / "telemetry.json").read_text())
    assert len(telemetry_a) == 3 * STEPS_PER_EPOCH and telemetry_a == telemetry_b
    iterations_a = json.loads((straight / "iterations.json").read_text())
    iterations_b = json.loads((killed / "iterations.json").read_text())
    assert len(iterations_a) == 3 * STEPS_PER_EPOCH
    assert _without_times(iterations_a) == _without_times(iterations_b)


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / training.CHECKPOINT
    training.save_checkpoint(path, {"epoch": 1, "weights": torch.arange(5.0)})
    previous = path.read_bytes()

    def failing_save(payload: Any, fh: Any) -> None:
        fh.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(training.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        training.save_checkpoint(path, {"epoch": 2, "weights": torch.zeros(5)})
    assert path.read_bytes() == previous
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [training.CHECKPOINT]


def test_a_stale_temporary_file_of_a_killed_save_is_overwritten(tmp_path: Path) -> None:
    path = tmp_path / training.CHECKPOINT
    (tmp_path / f"{training.CHECKPOINT}.tmp").write_bytes(b"left by a process killed mid-save")
    training.save_checkpoint(path, {"epoch": 3})
    assert torch.load(path, weights_only=True) == {"epoch": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == [training.CHECKPOINT]
