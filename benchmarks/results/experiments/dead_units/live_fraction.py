"""How much of KFAC's factors is dead during training on the convergence benchmark's tasks.

For each task, KFAC at the library defaults (2 threads, seed 0), and at steps 0, 40, 80
and 120 the live rows of each layer's running factors (``curvlib.linalg.live_coordinates``
of ``G`` and ``A``), printed as ``G_rows x A_rows: live G_live x A_live``. What skipping
the dead rows could save in the preconditioning products $G'^{-1} V A'^{-1}$ follows from
the live fractions of the large layers.

    python live_fraction.py [TASK ...]     (from this folder or by path)
"""

import sys
import warnings
from pathlib import Path

root = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples")]
import torch  # noqa: E402

torch.set_num_threads(2)
warnings.simplefilter("ignore")
import convergence as cv  # noqa: E402

from curvlib import KFAC, PreconditionedOptimizer  # noqa: E402
from curvlib.linalg import live_coordinates  # noqa: E402


def count(mat: torch.Tensor) -> int:
    live = live_coordinates(mat)
    return mat.shape[0] if live is None else len(live)


for name in sys.argv[1:] or ["digits-ae", "digits-mlp"]:
    task = cv.TASKS[name](False)
    torch.manual_seed(0)
    model = task.make_model()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=task.loss_fn)
    bs, batches = task.batch_size, len(task.inputs) // task.batch_size
    for s in range(121):
        i = s % batches
        x, y = task.inputs[i * bs : (i + 1) * bs], task.targets[i * bs : (i + 1) * bs]
        opt.zero_grad()
        with opt.record():
            task.loss_fn(model(x), y).backward()
        opt.step()
        if s % 40 == 0:
            blocks = opt.engines[0].approx.blocks.values()
            sizes = [
                f"{b.G.shape[0]}x{b.A.shape[0]}: live {count(b.G)}x{count(b.A)}" for b in blocks
            ]
            print(name, "step", s, "; ".join(sizes), flush=True)
