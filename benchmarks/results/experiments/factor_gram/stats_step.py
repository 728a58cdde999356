"""KFAC's statistics steps with the factors' Gram matrices in blocks and as one GEMM.

Two KFAC optimizers at the library defaults on the same task, seed and batches, stepped
in turn; before each step the block thresholds (``curvlib.linalg.factors``) are set so
that one optimizer always gets blocks where ``gram_blocks`` allows them and the other
never does. Median wall time (forward, backward and ``step()``) of their statistics steps
(every 10th, steps 20 to 220), 2 threads.

    python stats_step.py [TASK ...]     (from this folder or by path)
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
from curvlib.linalg import factors  # noqa: E402

DEFAULT = (factors.MIN_GRAM_BLOCK_ROWS, factors.MIN_GRAM_BLOCK_COLS)
NEVER = (1 << 40, 1 << 40)


def run(name: str, steps: int = 221) -> tuple[float, float]:
    task = cv.TASKS[name](False)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = task.make_model()
        runs.append((model, PreconditionedOptimizer(model, KFAC(), loss_fn=task.loss_fn)))
    times: list[list[float]] = [[], []]
    bs, batches = task.batch_size, len(task.inputs) // task.batch_size
    for s in range(steps):
        i = s % batches
        x, y = task.inputs[i * bs : (i + 1) * bs], task.targets[i * bs : (i + 1) * bs]
        for k, (model, opt) in enumerate(runs):
            factors.MIN_GRAM_BLOCK_ROWS, factors.MIN_GRAM_BLOCK_COLS = DEFAULT if k else NEVER
            start = time.perf_counter()
            opt.zero_grad()
            with opt.record():
                task.loss_fn(model(x), y).backward()
            opt.step()
            if s >= 20 and s % 10 == 0:
                times[k].append(time.perf_counter() - start)
    factors.MIN_GRAM_BLOCK_ROWS, factors.MIN_GRAM_BLOCK_COLS = DEFAULT
    return 1e3 * statistics.median(times[0]), 1e3 * statistics.median(times[1])


for task_name in sys.argv[1:] or ["digits-cnn", "digits-convae", "curves"]:
    one, blocks = run(task_name)
    print(
        f"{task_name}: statistics step {one:.2f} ms with one GEMM, {blocks:.2f} ms in blocks "
        f"({blocks / one:.3f})",
        flush=True,
    )
