r"""What the statistics backend and the per-layer factorisations cost in a training run.

Run from the repository root::

    python benchmarks/stats_backend.py                  # the convergence tasks, 200 steps
    python benchmarks/stats_backend.py --quick          # two tasks, 60 steps, writes nothing

For each task of the convergence benchmark (``benchmarks/convergence.py``) one
process trains five copies of the network from the same initialisation on the
same batches, one step of each in turn (the order rotates every step, so a slow
phase of a shared machine hits every copy alike):

* KFAC at the library defaults with ``backend="backpack"`` and
  ``approx.workers = 1`` (every layer factorised on all threads, one after the
  other): the baseline;
* the same with the layers factorised at once (``workers=None``);
* ``Backend.AUTO`` (autograd for the default MC Fisher) with ``workers=1``;
* ``Backend.AUTO`` with ``workers=None``: what ``PreconditionedOptimizer(model,
  KFAC(), loss_fn=...)`` does;
* tuned Adam's step, for scale.

Every copy refreshes its statistics on the same steps, a fixed schedule (steps
0, 1, 2, 4, 8, then every 10th: ``warmup=10, refresh_on_move=0``; refreshes
where the weights moved could fall on different steps for copies whose weights
differ by round-off), so the time of 10 consecutive steps
after the warm-up covers one statistics step and nine plain ones. *Ratio* is
the median over those windows of a copy's time divided by the baseline's in the
same window; *vs Adam* divides by Adam's instead. A network that BackPACK cannot
backpropagate through (the convolutional autoencoder's ``Unflatten``) has no
BackPACK rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import REPO, command, commit, machine, write_json
from convergence import TASKS, Task

from curvlib import KFAC, PreconditionedOptimizer

DEFAULT_OUT = REPO / "benchmarks" / "results"
CONFIGS: list[tuple[str, str, int | None]] = [
    ("backpack, one layer at a time", "backpack", 1),
    ("backpack, layers at once", "backpack", None),
    ("auto, one layer at a time", "auto", 1),
    ("auto, layers at once (the defaults)", "auto", None),
]
WINDOW = 10
WARMUP_STEPS = 20


def measure(task: Task, steps: int) -> dict[str, Any]:
    """Train every configuration and Adam in turn on the same batches; ratios per window."""
    runs: list[tuple[str, torch.nn.Module, Any]] = []
    for label, backend, workers in CONFIGS:
        torch.manual_seed(0)
        model = task.make_model()
        approx = KFAC()
        approx.workers = workers
        try:
            opt = PreconditionedOptimizer(
                model, approx, loss_fn=task.loss_fn, backend=backend, warmup=10, refresh_on_move=0
            )
        except ValueError:  # BackPACK lacks a module of this network
            continue
        runs.append((label, model, opt))
    torch.manual_seed(0)
    adam_model = task.make_model()
    runs.append(("adam", adam_model, torch.optim.Adam(adam_model.parameters(), lr=3e-3)))
    generator = torch.Generator().manual_seed(0)
    times: list[list[float]] = [[] for _ in runs]
    for step in range(steps):
        index = torch.randint(0, len(task.inputs), (task.batch_size,), generator=generator)
        x, y = task.inputs[index], task.targets[index]
        shift = step % len(runs)
        for j in [*range(shift, len(runs)), *range(shift)]:
            label, model, opt = runs[j]
            start = time.perf_counter()
            opt.zero_grad()
            if label == "adam":
                task.loss_fn(model(x), y).backward()
            else:
                with opt.record():
                    task.loss_fn(model(x), y).backward()
            opt.step()
            times[j].append(time.perf_counter() - start)

    def windows(t: list[float]) -> list[float]:
        return [sum(t[k : k + WINDOW]) for k in range(WARMUP_STEPS, steps - WINDOW + 1, WINDOW)]

    base, adam = windows(times[0]), windows(times[-1])
    rows = []
    for (label, _, _), t in zip(runs[:-1], times[:-1], strict=True):
        w = windows(t)
        rows.append({
            "config": label,
            "ratio": statistics.median(a / b for a, b in zip(w, base, strict=True)),
            "vs_adam": statistics.median(a / b for a, b in zip(w, adam, strict=True)),
            "ms_per_step": 1e3 * statistics.median(w) / WINDOW,
        })  # fmt: skip
    return {"task": task.name, "baseline": runs[0][0], "windows": len(base), "rows": rows}


def render(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = [
        "# Statistics backend and per-layer factorisations",
        "",
        f"Measured on {m['date'][:10]} at commit `{payload['commit']}` on {m['cpu']} "
        f"({m['torch_threads']} torch threads), torch {m['torch']}, with "
        f"`{payload['command']}`. KFAC at the library defaults; *ratio* is the median over "
        f"windows of {WINDOW} steps of the time against the task's first row in the same "
        "window, *vs Adam* the same against tuned Adam's step (see the script's docstring).",
        "",
        "| task | configuration | ms per step | ratio | vs Adam |",
        "|---|---|---:|---:|---:|",
    ]
    for task in payload["tasks"]:
        for row in task["rows"]:
            lines.append(
                f"| {task['task']} | {row['config']} | {row['ms_per_step']:.2f} | "
                f"{row['ratio']:.3f} | {row['vs_adam']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two tasks, 60 steps, no files")
    parser.add_argument("--tasks", default=None, help=f"comma-separated subset of {list(TASKS)}")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.tasks.split(",") if args.tasks else list(TASKS)
    if args.quick and not args.tasks:
        names = ["digits-mlp", "digits-ae"]
    if unknown := [n for n in names if n not in TASKS]:
        raise SystemExit(f"Unknown tasks {unknown}; choose from {list(TASKS)}.")
    steps = 60 if args.quick else args.steps
    if steps < WARMUP_STEPS + WINDOW:
        raise SystemExit(f"--steps must be at least {WARMUP_STEPS + WINDOW}.")
    warnings.simplefilter("ignore")  # the unpreconditioned-module notices of some tasks
    payload: dict[str, Any] = {
        "command": command(argv), "commit": commit(), "machine": machine(), "steps": steps,
        "tasks": [measure(TASKS[name](False), steps) for name in names],
    }  # fmt: skip
    text = render(payload)
    print(text)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "stats_backend.json", payload)
        (args.out / "stats_backend.md").write_text(text)
    return payload


if __name__ == "__main__":
    main()
