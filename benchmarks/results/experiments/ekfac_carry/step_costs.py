"""Milliseconds of an Adam step, a plain step and a statistics step of an approximation.

Also the amortised step at T = 10, (9 plain + 1 statistics) / 10, over Adam's.
For KFAC configurations ``../stats_fraction/costs.py`` measures the same ratios with
the runs interleaved step by step, which holds better on a loaded machine; this
script takes any of KFAC, EKFAC and KPSVD, one run after the other.

Both train the task's model from the same weights on the same 60 batches, in this
process; the medians of steps 20 to 60 are printed (statistics steps: every tenth).

    python step_costs.py THREADS TASKS [APPROX]     (from this folder or by path)
    python step_costs.py 2 curves,digits-ae,digits-cnn ekfac
"""

import contextlib
import statistics
import sys
import time
import warnings
from pathlib import Path

root = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples")]
import torch  # noqa: E402

torch.set_num_threads(int(sys.argv[1]))
import convergence as cv  # noqa: E402

from curvlib import EKFAC, KFAC, KPSVD, PreconditionedOptimizer  # noqa: E402

APPROXIMATIONS = {"kfac": KFAC, "ekfac": EKFAC, "kpsvd": KPSVD}


def step_times(task: cv.Task, opt: torch.optim.Optimizer, model: torch.nn.Module) -> list[float]:
    record = getattr(opt, "record", None)
    order = torch.Generator().manual_seed(0)
    times = []
    for _ in range(60):
        idx = torch.randperm(len(task.inputs), generator=order)[: task.batch_size]
        x, y = task.inputs[idx], task.targets[idx]
        start = time.perf_counter()
        opt.zero_grad()
        with record() if record is not None else contextlib.nullcontext():
            task.loss_fn(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times


warnings.simplefilter("ignore")
approx = APPROXIMATIONS[sys.argv[3] if len(sys.argv) > 3 else "kfac"]
for name in sys.argv[2].split(","):
    task = cv.TASKS[name](False)
    torch.manual_seed(0)
    model = task.make_model()
    adam = statistics.median(step_times(task, torch.optim.Adam(model.parameters()), model)[10:])
    torch.manual_seed(0)
    model = task.make_model()
    opt = PreconditionedOptimizer(model, approx(), loss_fn=task.loss_fn)
    times = step_times(task, opt, model)
    plain = statistics.median(t for i, t in enumerate(times[20:], 20) if i % 10)
    stats = statistics.median(t for i, t in enumerate(times[20:], 20) if i % 10 == 0)
    amortised = (9 * plain + stats) / 10  # T = 10
    print(
        f"{name:14s} adam {1e3 * adam:7.2f} ms  plain {1e3 * plain:7.2f} ms "
        f"({plain / adam:.2f}x)  statistics {1e3 * stats:7.2f} ms ({stats / adam:.2f}x)  "
        f"amortised at T = 10 {amortised / adam:.2f}x"
    )
