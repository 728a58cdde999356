"""Per-step cost of KFAC configurations relative to Adam's, interleaved step by step.

One Adam and one step of each configuration on the same batch, in turn, for
``ROUNDS`` rounds after 20 warm-up rounds; steps 0, 10, 20, ... of the rounds are
statistics steps (``t_cov = t_inv = 10``). Interleaving puts a change in the
machine's load on all of them alike, so the ratios hold on a shared machine.

    python costs.py TASK '{"name": {"stats_fraction": 0.5}, ...}' [ROUNDS]
"""

import json
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
from optimizers import APPROXIMATIONS  # noqa: E402

from curvlib import PreconditionedOptimizer  # noqa: E402

task = cv.TASKS[sys.argv[1]](False)
configs = json.loads(sys.argv[2])
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 100
gen = torch.Generator().manual_seed(0)
batches = [
    torch.randint(0, len(task.inputs), (task.batch_size,), generator=gen)
    for _ in range(rounds + 20)
]
torch.manual_seed(0)
adam_model = task.make_model()
models = {"adam": (adam_model, torch.optim.Adam(adam_model.parameters(), 3e-3))}
for name, kwargs in configs.items():
    torch.manual_seed(0)
    model = task.make_model()
    opt = PreconditionedOptimizer(model, APPROXIMATIONS["kfac"](), loss_fn=task.loss_fn, **kwargs)
    models[name] = (model, opt)
times: dict[str, dict[str, list[float]]] = {n: {"plain": [], "stats": []} for n in models}
for i, idx in enumerate(batches):
    x, y = task.inputs[idx], task.targets[idx]
    for name, (model, opt) in models.items():
        start = time.perf_counter()
        opt.zero_grad()
        if name == "adam":
            task.loss_fn(model(x), y).backward()
        else:
            with opt.record():
                task.loss_fn(model(x), y).backward()
        opt.step()
        if i >= 20:
            times[name]["stats" if i % 10 == 0 else "plain"].append(time.perf_counter() - start)
adam = statistics.median(times["adam"]["plain"] + times["adam"]["stats"])
print(f"{sys.argv[1]} adam {adam * 1e3:.2f} ms")
for name, t in times.items():
    if name != "adam":
        plain, stats = statistics.median(t["plain"]) / adam, statistics.median(t["stats"]) / adam
        mean = (9 * plain + stats) / 10
        print(f"  {name:12s} plain {plain:.2f}x  stats {stats:.2f}x  per-10 mean {mean:.2f}x")
