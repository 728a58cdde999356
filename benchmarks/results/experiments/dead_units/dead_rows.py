"""How many rows of KFAC's factors are zero on the convergence benchmark's tasks.

KFAC at the library's defaults on each task's quick budget (``--quick``), seed 0, one
thread; every inverse counts the zero rows of each factor it inverts (the rows that
``curvlib.approx.kfac`` factorises apart on the CPU). Printed per factor size: the mean
number of zero rows over all inverses.

    python dead_rows.py
"""

import collections
import sys
import warnings
from pathlib import Path

root = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples")]
import torch  # noqa: E402

torch.set_num_threads(1)
warnings.simplefilter("ignore")
import convergence  # noqa: E402

import curvlib.approx.kfac as kfac  # noqa: E402

counts: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
live = kfac.cpu_live_coordinates


def counted(factor: torch.Tensor) -> torch.Tensor | None:
    entry = counts[factor.shape[-1]]
    entry[0] += int(factor.eq(0).all(-1).sum())
    entry[1] += 1
    return live(factor)


kfac.cpu_live_coordinates = counted
for name in ("curves", "digits-ae", "digits-mlp", "digits-cnn", "digits-convae"):
    counts.clear()
    convergence.train(convergence.TASKS[name](True), convergence.curvature("kfac"), 0, None)
    zero = {size: round(z / calls, 1) for size, (z, calls) in sorted(counts.items())}
    print(name, "rows: mean zero rows", zero, flush=True)
