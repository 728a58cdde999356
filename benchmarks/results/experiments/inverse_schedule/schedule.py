"""KFAC's inverse on each convergence task: the thread pool's schedule against one layer at a time.

For each task, default KFAC trains 40 steps on the task's first batches; then its
``inverse`` (the statistics step's factorisations) is timed 15 times with the
pool's schedule (the default, ``workers=None``) and with ``workers=1`` (one layer
after the other, each on both threads), interleaved; medians in ms, 2 threads.
The layers' shapes and the rows each side factorises (dead coordinates
decoupled) are listed.

    python schedule.py [TASK ...]        (from this folder or by path; PYTHONPATH picks curvlib)
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

from curvlib import KFAC, PreconditionedOptimizer  # noqa: E402

for name in sys.argv[1:] or list(cv.TASKS):
    task = cv.TASKS[name](False)
    torch.manual_seed(0)
    model = task.make_model()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=task.loss_fn)
    bs, batches = task.batch_size, len(task.inputs) // task.batch_size
    for s in range(40):
        i = s % batches
        x, y = task.inputs[i * bs : (i + 1) * bs], task.targets[i * bs : (i + 1) * bs]
        opt.zero_grad()
        with opt.record():
            task.loss_fn(model(x), y).backward()
        opt.step()
    engine = opt.engines[0]
    approx, damping = engine.approx, engine.damping
    times: dict[str, list[float]] = {"pool": [], "one layer at a time": []}
    for _ in range(15):
        for mode, workers in (("pool", None), ("one layer at a time", 1)):
            approx.workers = workers
            start = time.perf_counter()
            approx.inverse(damping)
            times[mode].append(1e3 * (time.perf_counter() - start))
    approx.workers = None
    rows = []
    for layer, block in approx._blocks.items():
        live_g, live_a = block._live()
        g = block.out_dim if live_g is None else len(live_g)
        a = block.in_dim if live_a is None else len(live_a)
        shape = (block.out_dim, block.in_dim)
        rows.append(f"{layer}:{shape[0]}x{shape[1]}" + (f"({g}x{a})" if (g, a) != shape else ""))
    medians = ", ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in times.items())
    print(f"{name}: {medians} | " + " ".join(rows))
