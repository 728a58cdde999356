"""Where an approximation's statistics steps spend their time, from ``last_stats``.

Trains each task's model with the approximation at its defaults for 80 steps
and prints the medians of the time keys of the statistics steps from step 20
on (milliseconds): the forward and backward pass with the extraction
(``statistics``), folding the statistics in (``update``), the inverse, the
preconditioning. Run it against two checkouts with ``PYTHONPATH`` to compare.

    python update_times.py TASKS APPROX     (from this folder or by path)
    python update_times.py digits-cnn,digits-convae kpsvd
"""

import statistics
import sys
import warnings
from pathlib import Path

root = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples")]
import torch  # noqa: E402

torch.set_num_threads(2)
import convergence as cv  # noqa: E402

from curvlib import EKFAC, KFAC, KPSVD, PreconditionedOptimizer  # noqa: E402

warnings.simplefilter("ignore")
approx = {"kfac": KFAC, "ekfac": EKFAC, "kpsvd": KPSVD}[sys.argv[2]]
for name in sys.argv[1].split(","):
    task = cv.TASKS[name](False)
    torch.manual_seed(0)
    model = task.make_model()
    opt = PreconditionedOptimizer(model, approx(), loss_fn=task.loss_fn)
    order = torch.Generator().manual_seed(0)
    rows = []
    for step in range(80):
        idx = torch.randperm(len(task.inputs), generator=order)[: task.batch_size]
        opt.zero_grad()
        with opt.record():
            task.loss_fn(model(task.inputs[idx]), task.targets[idx]).backward()
        opt.step()
        if step >= 20 and step % 10 == 0:
            stats = opt.last_stats
            rows.append({k: 1e3 * float(stats[k]) for k in stats if k.startswith("time_")})
    keys = rows[0]
    medians = {k[5:]: round(statistics.median(r.get(k, 0.0) for r in rows), 1) for k in keys}
    print(f"{name:14s} {sys.argv[2]} statistics steps, ms: {medians}")
