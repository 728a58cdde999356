"""Where default KFAC's statistics steps spend their time, next to Adam's step, per task.

Adam and KFAC train side by side on the task's first batches (120 steps, the
first 20 not counted); the statistics steps (every 10th) are split into parts
timed by wrapping the library's methods from outside: the loss hook (the Monte
Carlo targets and their pull-back), the session's ``finish`` (the unfolded
inputs and the factors' Gram matrices), the running average and the inverse.
Medians in ms, 2 threads. ``ROOT`` picks the checkout whose benchmarks and
examples are used (``PYTHONPATH`` the library).

    python phases.py TASK [TASK ...]
"""

import collections
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

root = Path(os.environ.get("ROOT", Path(__file__).resolve().parents[4]))
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples")]
import torch  # noqa: E402

torch.set_num_threads(2)
warnings.simplefilter("ignore")
import convergence as cv  # noqa: E402

from curvlib import KFAC, PreconditionedOptimizer  # noqa: E402
from curvlib.extract._session import CollectSession  # noqa: E402
from curvlib.optim.engine import CurvatureEngine  # noqa: E402

parts: dict[str, float] = collections.defaultdict(float)


def timed(cls: type, name: str, key: str) -> None:
    """Add the time of every call of ``cls.name`` to ``parts[key]``."""
    method = getattr(cls, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            parts[key] += time.perf_counter() - start

    setattr(cls, name, wrapper)


timed(CollectSession, "_loss_hook", "MC targets+pull-back")
timed(CollectSession, "finish", "unfold+Grams")
timed(CurvatureEngine, "_update", "running average")
timed(CurvatureEngine, "_invert", "inverse")

for name in sys.argv[1:]:
    task = cv.TASKS[name](False)
    bs, batches = task.batch_size, len(task.inputs) // task.batch_size
    torch.manual_seed(0)
    model, adam_model = task.make_model(), task.make_model()
    adam = torch.optim.Adam(adam_model.parameters(), 3e-3)
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=task.loss_fn)
    rows: dict[str, list[float]] = collections.defaultdict(list)
    for s in range(120):
        i = s % batches
        x, y = task.inputs[i * bs : (i + 1) * bs], task.targets[i * bs : (i + 1) * bs]
        start = time.perf_counter()
        adam.zero_grad()
        task.loss_fn(adam_model(x), y).backward()
        adam.step()
        adam_time = time.perf_counter() - start
        parts.clear()
        start = time.perf_counter()
        opt.zero_grad()
        with opt.record():
            task.loss_fn(model(x), y).backward()
        mid = time.perf_counter()
        opt.step()
        end = time.perf_counter()
        if s < 20:
            continue
        rows["adam"].append(adam_time)
        kind = "statistics" if s % 10 == 0 else "plain"
        rows[f"{kind} forward+backward"].append(mid - start)
        rows[f"{kind} step"].append(end - mid)
        if kind == "statistics":
            for key, value in parts.items():
                rows[key].append(value)
    medians = {key: 1e3 * statistics.median(values) for key, values in rows.items()}
    print(f"{name}: " + " | ".join(f"{key} {value:.2f}" for key, value in medians.items()))
