"""The examples under ``torchrun``: two ranks train like one process on the whole batch.

``torchrun --nproc_per_node=2`` (as ``python -m torch.distributed.run``) runs
the autoencoder and the CNN example on the CPU (gloo) at a tiny size; each job
runs in its own session with a timeout and is killed with its ranks when it
runs over, so a hung collective fails the test, not the CI run. The statistics
are EMPIRICAL of the whole shard (``--fisher empirical --stats-fraction 1``),
a deterministic function of the samples, so the ranks' steps are one process's
on the whole batch up to the order of float32 sums. A job costs about 20 s on
a busy two-core machine, most of it two interpreters importing torch.
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
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import autoencoder  # noqa: E402
import cnn  # noqa: E402
import torchrun  # noqa: E402
import training  # noqa: E402

from tests.distributed.launch import run_ranks  # noqa: E402
from tests.examples import torchrun_ranks  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed"
    ),
    pytest.mark.usefixtures("one_thread"),
]

EXACT = ["--fisher", "empirical", "--stats-fraction", "1", "--device", "cpu", "--threads", "1"]
"""Statistics that do not depend on a random stream, so that ranks and one process agree."""

AUTOENCODER = [
    "--data", "curves", "--num-train", "200", "--num-test", "100", "--batch-size", "50",
    "--num-epochs", "1", *EXACT,
]  # fmt: skip
CNN = [
    "--num-train", "80", "--num-test", "40", "--batch-size", "40", "--num-epochs", "1",
    "--t-cov", "1", "--t-inv", "1", *EXACT,
]  # fmt: skip

RTOL = 1e-5
"""Float32 losses after a few preconditioned steps. Two ranks sum each half of a batch's
gradient and statistics apart and add the halves (DDP, curvlib's all-reduce), one process
sums all at once: float32 rounding (eps 1.2e-7) in a different order. Measured differences
are below 2e-7 relative (2026-12-05, 2-core Xeon); 1e-5 leaves room for the preconditioner
to amplify them over four steps, and is far below what a wrong split changes: ranks that
each train on the whole batch end 2x off (the damping warm-up counts twice the samples)."""

TIMEOUT = 150.0
"""Seconds a torchrun job may take before it is killed (about 20 s when it works)."""

EXPECTED = {
    "checkpoint.pt", "iterations.csv", "iterations.json", "loss.png", "metrics.csv",
    "metrics.json", "summary.json", "telemetry.json", "telemetry.png",
}  # fmt: skip
"""What one curvlib run writes to ``--out``."""


def start_torchrun(script: str, args: list[str], out: Path) -> subprocess.Popen[str]:
    """Start ``torchrun --nproc_per_node=2 examples/<script> <args> --out <out>``."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    for name in (*torchrun.ENVIRONMENT, "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # this test process is not a rank
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(EXAMPLES / script), *args, "--out", str(out),
    ]  # fmt: skip
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # torchrun and its ranks: one process group to kill
    )  # fmt: skip


def finish(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    """Wait for a job; kill it with its ranks at ``TIMEOUT`` and fail."""
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun ran past {TIMEOUT:g} s (killed): a hung rank?\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def losses(out: Path) -> dict[str, Any]:
    metrics = json.loads((out / "metrics.json").read_text())
    iterations = json.loads((out / "iterations.json").read_text())
    final = metrics[-1]
    return {
        "train_loss": final["train_loss"],
        "test_loss": final["test_loss"],
        "train_accuracy": final["train_accuracy"],
        "batch_losses": [row["loss"] for row in iterations],
    }


def check_job(
    job: subprocess.CompletedProcess[str], out: Path, reference: Path, optim: str = "kfac"
) -> None:
    """Exit 0, one set of outputs and one report, and one process's losses."""
    assert job.returncode == 0, job.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == EXPECTED
    assert {p.name for p in reference.iterdir()} == EXPECTED
    # Rank 0 alone prints and shows the progress bar (tqdm draws 0/N once per bar).
    assert job.stdout.count("outputs in") == 1, job.stdout
    assert job.stdout.count("epoch   1") == 1, job.stdout
    assert "2 ranks" in job.stdout
    assert job.stderr.count(f"{optim}:   0%") == 1, job.stderr[-3000:]
    got, expected = losses(out), losses(reference)
    assert len(got["batch_losses"]) == len(expected["batch_losses"]) > 1
    for key in ("train_loss", "test_loss", "batch_losses"):
        torch.testing.assert_close(got[key], expected[key], rtol=RTOL, atol=0.0, msg=key)
    assert got["train_accuracy"] == expected["train_accuracy"]
    state = torch.load(out / training.CHECKPOINT, weights_only=True)
    assert not any(k.startswith("module.") for k in state["model"]), "the unwrapped model"


@pytest.mark.parametrize("script", ["autoencoder", "cnn"])
def test_the_example_under_torchrun_trains_like_one_process(tmp_path: Path, script: str) -> None:
    example, args = {"autoencoder": (autoencoder, AUTOENCODER), "cnn": (cnn, CNN)}[script]
    job = start_torchrun(f"{script}.py", args, tmp_path / "two")
    try:  # the reference while the ranks start
        example.main([*args, "--no-progress", "--out", str(tmp_path / "one")])
    finally:
        done = finish(job)
    check_job(done, tmp_path / "two", tmp_path / "one")


@pytest.mark.parametrize(
    ("script", "optim", "split"),
    [("cnn", "kfac", "directions"), ("autoencoder", "exact-ng", "inverses")],
    ids=["cnn-kfac-directions", "autoencoder-exact-ng-kernels"],
)
def test_the_curvature_work_split_over_the_ranks_trains_like_one_process(
    tmp_path: Path, script: str, optim: str, split: str
) -> None:
    """``--split-inverses``: KFAC's inverses (directions sent), exact NG's kernel blocks."""
    example, args = {"autoencoder": (autoencoder, AUTOENCODER), "cnn": (cnn, CNN)}[script]
    args = [*args, "--optim", optim]
    job = start_torchrun(f"{script}.py", [*args, "--split-inverses", split], tmp_path / "two")
    try:
        example.main([*args, "--no-progress", "--out", str(tmp_path / "one")])
    finally:
        done = finish(job)
    check_job(done, tmp_path / "two", tmp_path / "one", optim)
    assert f"2 ranks, curvature work split (owners send {split})" in done.stdout


def test_the_split_flag_reaches_the_optimizers_data_parallel(tmp_path: Path) -> None:
    from optimizers import OPTIMIZERS, OptimConfig

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model, loss_fn = torch.nn.Sequential(torch.nn.Linear(3, 2)), torch.nn.MSELoss()
        for split in ("directions", "inverses"):
            config = OptimConfig(lr=0.1, split_inverses=split)
            opt: Any = OPTIMIZERS["kfac"].build(model, loss_fn, config)
            assert opt.sync.split_inverses and opt.sync.broadcast == split
        plain: Any = OPTIMIZERS["kfac"].build(model, loss_fn, OptimConfig(lr=0.1))
        assert not plain.sync.split_inverses
    finally:
        dist.destroy_process_group()


def test_splitting_the_curvature_work_needs_torchrun(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        autoencoder.main([*AUTOENCODER, "--split-inverses", "directions", "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert "start the script with torchrun" in capsys.readouterr().err


def test_only_rank_zero_writes_and_ranks_hold_the_same_results(tmp_path: Path) -> None:
    """Each rank gets its own ``--out``: rank 1's stays empty; the group is left alone."""
    results = run_ranks(
        torchrun_ranks.autoencoder_rank, 2, str(tmp_path), AUTOENCODER, timeout=120.0
    )
    assert {p.name for p in (tmp_path / "rank0").iterdir()} == EXPECTED
    assert not (tmp_path / "rank1").exists()
    assert results[0]["group_alive"] and results[1]["group_alive"]
    assert results[0]["metrics"] == results[1]["metrics"]


def test_a_batch_that_does_not_split_evenly_names_the_sizes_that_do() -> None:
    training.check_shards(48, torchrun.World(rank=1, size=3))
    training.check_shards(2, torchrun.World(rank=0, size=2))
    with pytest.raises(training.UsageError, match=r"--batch-size 50 .* 3 equal parts.* 48 or 51"):
        training.check_shards(50, torchrun.World(rank=0, size=3))


def test_torchrun_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in torchrun.ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    assert not torchrun.launched() and torchrun.main_process()
    with torchrun.process_group(torch.device("cpu")) as world:
        assert world == torchrun.SINGLE and not dist.is_initialized()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert torchrun.launched() and not torchrun.main_process()
    assert torchrun.local_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(torchrun.LaunchError, match=r"local rank 1, but this machine has 1 GPU"):
        torchrun.local_device(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert torchrun.local_device(torch.device("cuda")) == torch.device("cuda", 1)


def test_an_example_with_its_own_loop_refuses_several_ranks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import dcgan_kfac

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit) as stop:
        dcgan_kfac.main(["--num-epochs", "1"])
    assert stop.value.code == 2
    assert "run it with python, not torchrun" in capsys.readouterr().err


def test_one_world_shards_nothing_and_two_split_contiguously() -> None:
    t = torch.arange(10)
    assert torchrun.SINGLE.shard(t) is t
    assert torchrun.SINGLE.sum([1.5, 2.0]) == [1.5, 2.0]
    halves = [torchrun.World(rank=r, size=2).shard(t) for r in range(2)]
    assert torch.equal(torch.cat(halves), t) and [len(h) for h in halves] == [5, 5]
