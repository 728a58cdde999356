"""Default KFAC's batch loss and KL-clip factor per step, in the benchmark's batch order.

``loss/factor`` per step: the batch loss (in the task's reported scale) and
``last_stats["kl_clip_factor"]`` of that step (1: not shortened). The initial weights and
the batch order are those of ``benchmarks/convergence.py``'s ``train`` for the seed.

    python loss_trace.py TASK SEED [STEPS]
    python loss_trace.py digits-ae 0 40
"""

import sys
from pathlib import Path

root = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples")]
import torch  # noqa: E402

torch.set_num_threads(1)
import convergence as cv  # noqa: E402

from curvlib import KFAC, PreconditionedOptimizer  # noqa: E402

task, seed = cv.TASKS[sys.argv[1]](False), int(sys.argv[2])
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 40
torch.manual_seed(seed)
model = task.make_model()
opt = PreconditionedOptimizer(model, KFAC(), loss_fn=task.loss_fn)
order = torch.Generator().manual_seed(seed)
n, bs = len(task.inputs), task.batch_size
rows = []
for step in range(steps):
    b = step % task.steps_per_epoch
    if b == 0:
        perm = torch.randperm(n, generator=order)
    idx = perm[b * bs : (b + 1) * bs]
    opt.zero_grad()
    with opt.record():
        loss = task.loss_fn(model(task.inputs[idx]), task.targets[idx])
        loss.backward()
    opt.step()
    factor = opt.last_stats["kl_clip_factor"]
    rows.append(f"{step}:{loss.item() * task.report_scale:.1f}/{float(factor or 0.0):.2f}")
print(" ".join(rows))
