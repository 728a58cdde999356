"""What the distance of ``refresh_on_move`` costs per step, next to Adam's own update.

The median of 200 calls of ``engine.weights_moved`` (cache cleared each time) and of
``adam.step()`` alone (no forward or backward pass), interleaved, 2 threads.

    python distance_cost.py          (from this folder or by path)
"""

import statistics
import sys
import time
import warnings
from pathlib import Path

root = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples")]
import torch  # noqa: E402

torch.set_num_threads(2)
import convergence as cv  # noqa: E402

from curvlib import KFAC, PreconditionedOptimizer  # noqa: E402

warnings.simplefilter("ignore")
for name in ("curves", "digits-ae", "digits-mlp", "digits-cnn"):
    task = cv.TASKS[name](False)
    torch.manual_seed(0)
    model = task.make_model()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=task.loss_fn, refresh_on_move=0.3)
    x, y = task.inputs[: task.batch_size], task.targets[: task.batch_size]
    opt.zero_grad()
    with opt.record():
        task.loss_fn(model(x), y).backward()
    opt.step()
    adam = torch.optim.Adam(model.parameters())
    eng = opt.engine
    tm, ta = [], []
    for _ in range(200):
        eng._moved_at = None
        start = time.perf_counter()
        _ = eng.weights_moved
        tm.append(time.perf_counter() - start)
        start = time.perf_counter()
        adam.step()
        ta.append(time.perf_counter() - start)
    print(
        name,
        f"distance {statistics.median(tm) * 1e3:.3f} ms,",
        f"Adam's update alone {statistics.median(ta) * 1e3:.3f} ms",
    )
