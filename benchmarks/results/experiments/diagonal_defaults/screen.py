"""Epochs to tuned Adam's final loss for the Diagonal at several settings, Adam run once.

Like ``../stats_fraction/epochs.py`` (Adam at 3e-3 is the tuned rate of every task of
``benchmarks/convergence.py``; the first evaluation at or below Adam's final loss), but
Adam's final losses are computed once per task and seed and several settings of the
Diagonal are trained after it. A damping given as ``[value, samples]`` is
``DampingWarmup(value, samples)``, a number is used as it is. ``clipped`` is the
fraction of steps whose KL-clip factor was below one.

    python screen.py TASKS SEEDS CONFIGS_JSON
    python screen.py digits-ae 0,1,2 '{"default": {}, "1e-1": {"damping": 0.1}}'
"""

import json
import sys
from pathlib import Path
from typing import Any

root = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples")]
import torch  # noqa: E402

torch.set_num_threads(1)
import convergence as cv  # noqa: E402

from curvlib.optim import DampingWarmup  # noqa: E402


def options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The optimizer keywords, with ``[value, samples]`` dampings as ``DampingWarmup``."""
    out = dict(kwargs)
    if isinstance(out.get("damping"), list):
        out["damping"] = DampingWarmup(*out["damping"])
    return out


tasks, seeds = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")]
configs: dict[str, dict[str, Any]] = json.loads(sys.argv[3])
for name in tasks:
    task = cv.TASKS[name](False)
    for seed in seeds:
        target = cv.train(task, cv.adam(3e-3), seed, None).curve.losses[-1]
        for label, kwargs in configs.items():
            run = cv.train(task, cv.curvature("diag", label, **options(kwargs)), seed, None)
            curve = run.curve
            reached = [i for i, loss in enumerate(curve.losses) if loss <= target]
            ep = curve.epochs[reached[0]] / task.epochs if reached else None
            print(
                label, name, seed, "target", round(target, 4), "final", round(curve.losses[-1], 4),
                "ep", None if ep is None else round(ep, 3), "div", run.diverged,
                "clipped", round(run.clipped_steps / max(run.steps, 1), 2), flush=True,
            )  # fmt: skip
