"""Tuned Adam's and default KFAC's wall time on one task, run after run.

Each round trains tuned Adam (lr 3e-3) and then default KFAC on the task's
seed-0 weights and batches (``convergence.train``, the benchmark's own loop)
and prints both clocks and their ratio: how far the machine's load moves a
run's time from one run to the next, and whether the ratio of two runs a few
seconds apart escapes it.

    python drift.py TASK ROUNDS
"""

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

task = cv.TASKS[sys.argv[1]](False)
adam, kfac = cv.adam(3e-3), cv.curvature("kfac")
start = time.time()
for _ in range(int(sys.argv[2])):
    a = cv.train(task, adam, 0, None)
    k = cv.train(task, kfac, 0, None)
    print(
        f"{time.time() - start:5.0f} s: adam {a.train_time:.3f} s, kfac {k.train_time:.3f} s, "
        f"ratio {k.train_time / a.train_time:.3f}",
        flush=True,
    )
