"""Median step times of Adam (lr 3e-3) and of default KFAC's regular and statistics steps.

    python costs.py > costs.json

The five convergence tasks, 60 steps from seed 0 (the first three left out), two
rounds alternating the two methods, two threads: the costs behind ``costs.json`` and
``variants.txt``. For new measurements ``../stats_fraction/costs.py``, which interleaves
the methods step by step, is the one to use.
"""

import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[3] / "benchmarks")]
import torch  # noqa: E402

torch.set_num_threads(2)
warnings.simplefilter("ignore")
import convergence as cv  # noqa: E402

from curvlib import KFAC, PreconditionedOptimizer  # noqa: E402

out = {}
for name in ["curves", "digits-ae", "digits-mlp", "digits-cnn", "digits-convae"]:
    task = cv.TASKS[name](False)
    times: dict[str, list[float]] = {"adam": [], "reg": [], "stats": []}
    for _ in range(2):
        for method in ["adam", "kfac"]:
            torch.manual_seed(0)
            model = task.make_model()
            if method == "adam":
                opt = torch.optim.Adam(model.parameters(), lr=3e-3)
            else:
                opt = PreconditionedOptimizer(model, KFAC(), loss_fn=task.loss_fn)
            order = torch.Generator().manual_seed(0)
            for i in range(60):
                idx = torch.randperm(len(task.inputs), generator=order)[: task.batch_size]
                x, y = task.inputs[idx], task.targets[idx]
                due = method == "kfac" and opt.engine.stats_due
                start = time.perf_counter()
                opt.zero_grad()
                if method == "adam":
                    task.loss_fn(model(x), y).backward()
                else:
                    with opt.record():
                        task.loss_fn(model(x), y).backward()
                opt.step()
                if i >= 3:
                    key = "adam" if method == "adam" else "stats" if due else "reg"
                    times[key].append(1e3 * (time.perf_counter() - start))
    out[name] = {k: round(statistics.median(v), 2) for k, v in times.items()}
print(json.dumps(out, indent=1))
