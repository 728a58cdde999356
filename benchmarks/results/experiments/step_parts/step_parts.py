"""Where KFAC's steps spend their time next to Adam's, at the library's defaults.

For each task: Adam's forward and backward pass and its update; KFAC's plain steps
(forward and backward inside ``record()``, then ``step()``) and its statistics steps
(every 10th), and the preconditioning products alone (the live inverse applied to the
step's gradients, outside the step). Means over steps 20-119 on the task's first
batches; 2 threads. The products' share of the plain step shows what the rest of the
step (guards, KL clip, momentum, update) costs next to Adam's whole update.

    python step_parts.py [TASK ...]        (from this folder or by path)
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
from curvlib.optim.engine import layer_grads  # noqa: E402


def run(task: cv.Task, kind: str, steps: int = 120) -> dict[str, float]:
    """Mean ms of each part of the steps 20 to ``steps``."""
    torch.manual_seed(0)
    model = task.make_model()
    if kind == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    else:
        opt = PreconditionedOptimizer(model, KFAC(), loss_fn=task.loss_fn)
    names = ("fb", "step", "fb_stats", "step_stats", "apply")
    parts: dict[str, list[float]] = {k: [] for k in names}
    bs, batches = task.batch_size, len(task.inputs) // task.batch_size
    for s in range(steps):
        i = s % batches
        x, y = task.inputs[i * bs : (i + 1) * bs], task.targets[i * bs : (i + 1) * bs]
        start = time.perf_counter()
        opt.zero_grad()
        if isinstance(opt, PreconditionedOptimizer):
            with opt.record():
                task.loss_fn(model(x), y).backward()
        else:
            task.loss_fn(model(x), y).backward()
        mid = time.perf_counter()
        opt.step()
        end = time.perf_counter()
        if s < 20:
            continue
        stats = s % 10 == 0 and kind != "adam"
        parts["fb_stats" if stats else "fb"].append(mid - start)
        parts["step_stats" if stats else "step"].append(end - mid)
        if kind != "adam" and not stats:
            precond = opt.engines[0]._precond
            grads = layer_grads(opt.layers)
            start = time.perf_counter()
            precond.apply(grads)
            parts["apply"].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.mean(v) for k, v in parts.items() if v}


for name in sys.argv[1:] or list(cv.TASKS)[:5]:
    task = cv.TASKS[name](False)
    adam, kfac = run(task, "adam"), run(task, "kfac")
    print(
        f"{name}: Adam forward+backward {adam['fb']:.2f} ms, update {adam['step']:.2f} ms | "
        f"KFAC plain {kfac['fb']:.2f} + {kfac['step']:.2f} ms (products {kfac['apply']:.2f} ms), "
        f"statistics step {kfac['fb_stats']:.2f} + {kfac['step_stats']:.2f} ms"
    )
