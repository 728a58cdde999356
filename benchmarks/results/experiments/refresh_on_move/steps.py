"""Epochs to tuned Adam's final loss and the statistics steps before them, library schedule.

KFAC (or another approximation) with the optimizer's arguments in ``KWARGS_JSON``;
every step where the engine records statistics is counted. One thread; epochs
depend on the seeds only, so the runs may share the machine.

    python steps.py TASKS SEEDS KWARGS_JSON [APPROX]     (from this folder or by path)
    python steps.py curves,digits-ae 0,1,2 '{"warmup": 3, "refresh_on_move": 0.3}'
"""

import json
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples")]
import torch  # noqa: E402

torch.set_num_threads(1)
import convergence as cv  # noqa: E402

from curvlib.optim.engine import CurvatureEngine  # noqa: E402


def report(task: cv.Task, seed: int, method: cv.Method, stats: list[int], label: object) -> None:
    """Train Adam at 3e-3 and ``method``; print the epochs and steps to Adam's loss."""
    target = cv.train(task, cv.adam(3e-3), seed, None).curve.losses[-1]
    stats.clear()
    run = cv.train(task, method, seed, None)
    curve = run.curve
    # The first evaluation at or below the target, as in ../stats_fraction/epochs.py.
    reached = [i for i, loss in enumerate(curve.losses) if loss <= target]
    ep = curve.epochs[reached[0]] if reached else None
    steps = None if ep is None else ep * task.steps_per_epoch
    before = None if steps is None else sum(1 for s in stats if s < steps)
    print(
        task.name, seed, "tau", label, "target", round(target, 4),
        "final", round(curve.losses[-1], 4),
        "ep", None if ep is None else round(ep / task.epochs, 3),
        "steps", None if steps is None else round(steps),
        "stats_before", before, "stats_total", len(stats), "div", run.diverged, flush=True,
    )  # fmt: skip


if __name__ == "__main__":
    tasks, seeds = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")]
    kwargs = json.loads(sys.argv[3])
    approx = sys.argv[4] if len(sys.argv) > 4 else "kfac"
    STATS: list[int] = []
    prepare = CurvatureEngine.prepare

    def counted(self: CurvatureEngine) -> None:
        if self.stats_due:
            STATS.append(self.step_count)
        prepare(self)

    CurvatureEngine.prepare = counted  # type: ignore[method-assign]
    for name in tasks:
        task = cv.TASKS[name](False)
        for seed in seeds:
            method = cv.curvature(approx, "x", **kwargs)
            report(task, seed, method, STATS, kwargs.get("refresh_on_move"))
