"""EKFAC's plain and statistics steps with its inverse applied in float32 and in bfloat16.

``EKFAC(apply_dtype=None)`` against ``EKFAC()`` (``"auto"``: bfloat16 on a CPU
that multiplies it in hardware, for layers large enough and conditioned well
enough), each next to Adam, on the same 80 batches of each task from the same
weights; the two EKFAC runs alternate three times per task, and the medians of
steps 20 to 80 are printed in Adam steps (statistics steps: every tenth).

    python step_costs.py TASKS       (from this folder or by path)
    python step_costs.py curves,digits-ae,digits-mlp,digits-cnn,digits-convae
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

from curvlib import EKFAC, PreconditionedOptimizer  # noqa: E402


def step_times(task: cv.Task, make: object) -> list[float]:
    torch.manual_seed(0)
    model = task.make_model()
    opt = make(model)  # type: ignore[operator]
    record = getattr(opt, "record", None)
    order = torch.Generator().manual_seed(0)
    times = []
    for _ in range(80):
        idx = torch.randperm(len(task.inputs), generator=order)[: task.batch_size]
        x, y = task.inputs[idx], task.targets[idx]
        start = time.perf_counter()
        opt.zero_grad()
        if record is not None:
            with record():
                task.loss_fn(model(x), y).backward()
        else:
            task.loss_fn(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times


warnings.simplefilter("ignore")
for name in sys.argv[1].split(","):
    task = cv.TASKS[name](False)
    rows: dict[str, list[tuple[float, float]]] = {"float32": [], "auto": []}
    for _ in range(3):
        adam = statistics.median(step_times(task, lambda m: torch.optim.Adam(m.parameters()))[10:])
        for label, dtype in (("float32", None), ("auto", "auto")):
            times = step_times(
                task,
                lambda m, d=dtype, loss=task.loss_fn: PreconditionedOptimizer(
                    m, EKFAC(apply_dtype=d), loss_fn=loss, t_inv=10
                ),
            )
            plain = statistics.median(t for i, t in enumerate(times[20:], 20) if i % 10)
            stats = statistics.median(t for i, t in enumerate(times[20:], 20) if i % 10 == 0)
            rows[label].append((plain / adam, stats / adam))
    print(
        f"{name:14s} "
        + "  ".join(
            f"{label}: plain {min(p for p, _ in r):.2f}-{max(p for p, _ in r):.2f}x, "
            f"statistics {min(s for _, s in r):.1f}-{max(s for _, s in r):.1f}x"
            for label, r in rows.items()
        )
    )
