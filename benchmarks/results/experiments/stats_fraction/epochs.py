"""Epochs (and noisy one-thread times) to tuned Adam's final loss: Adam at 3e-3 against KFAC.

Adam at 3e-3 is the tuned rate of every task of ``benchmarks/convergence.py``
(the best of its grid on every seed). Epochs depend on the seeds only; the times
of this script ran on a shared machine and are not used.

    python epochs.py TASKS SEEDS [APPROX [KWARGS_JSON]]   (from this folder or by path)
    python epochs.py curves,digits-ae 0,1,2 kfac '{"stats_fraction": 0.5}'
"""

import json
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples")]
import torch  # noqa: E402

torch.set_num_threads(1)
import convergence as cv  # noqa: E402

tasks, seeds = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")]
approx = sys.argv[3] if len(sys.argv) > 3 else "kfac"
kwargs = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
for name in tasks:
    task = cv.TASKS[name](False)
    for seed in seeds:
        adam = cv.train(task, cv.adam(3e-3), seed, None)
        target = adam.curve.losses[-1]
        run = cv.train(task, cv.curvature(approx, "x", **kwargs), seed, None)
        curve = run.curve
        # The first evaluation at or below the target, as the stored outputs were made;
        # convergence.py's Curve.epochs_to/time_to interpolate between evaluations instead.
        reached = [i for i, loss in enumerate(curve.losses) if loss <= target]
        ep = curve.epochs[reached[0]] if reached else None
        tt = curve.times[reached[0]] if reached else None
        print(
            name,
            seed,
            "target",
            round(target, 4),
            "final",
            round(curve.losses[-1], 4),
            "ep",
            None if ep is None else round(ep / task.epochs, 3),
            "time",
            None if tt is None else round(tt / adam.curve.times[-1], 3),
            "div",
            run.diverged,
            flush=True,
        )
