"""KFAC's inverse per convergence-benchmark task: the thread pool against all layers in order.

The pool of single-threaded workers is curvlib's default on the CPU; "in order" runs the
layers one after the other on torch's threads. 2 threads, after 3 steps of KFAC at the
defaults on the task's first batch; medians of 15 alternating rounds. Run from the
repository root:

    python benchmarks/results/experiments/lapack_amd/inverse_pool.py
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
warnings.simplefilter("ignore")
import convergence as cv  # noqa: E402

import curvlib.approx.base as base  # noqa: E402
from curvlib import KFAC, PreconditionedOptimizer  # noqa: E402

POOL = base.default_workers
TASKS = (
    cv.curves_task, cv.digits_ae_task, cv.digits_mlp_task, cv.digits_cnn_task,
    cv.digits_convae_task,
)  # fmt: skip

for make in TASKS:
    task = make(True)
    torch.manual_seed(0)
    model = task.make_model()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=task.loss_fn)
    x, y = task.inputs[: task.batch_size], task.targets[: task.batch_size]
    for _ in range(3):
        opt.zero_grad()
        with opt.record():
            task.loss_fn(model(x), y).backward()
        opt.step()
    approx = opt.engine.approx
    times: dict[str, list[float]] = {"pool": [], "in order": []}
    for _ in range(15):
        for mode in times:
            base.default_workers = POOL if mode == "pool" else (lambda device: 1)
            start = time.perf_counter()
            approx.inverse(1e-3)
            times[mode].append(time.perf_counter() - start)
    base.default_workers = POOL
    print(task.name, {k: round(1e3 * statistics.median(v), 2) for k, v in times.items()}, "ms")
