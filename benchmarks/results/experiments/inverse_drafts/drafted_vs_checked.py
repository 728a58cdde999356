"""KFAC's inverse on CURVES: drafted (one host read for all layers) against the checked path.

Run from the repository root::

    python benchmarks/results/experiments/inverse_drafts/drafted_vs_checked.py

Both run in one process, alternating, 40 times each, on the factors after 12 training
steps at the defaults; the checked path is forced by giving the KFAC blocks no draft.
"""

import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import convergence as cv

from curvlib import KFAC, PreconditionedOptimizer
from curvlib.approx import kfac

torch.set_num_threads(2)
warnings.simplefilter("ignore")
task = cv.TASKS["curves"](True)
torch.manual_seed(0)
model = task.make_model()
opt = PreconditionedOptimizer(model, KFAC(), loss_fn=task.loss_fn)
bs, batches = task.batch_size, len(task.inputs) // task.batch_size
for s in range(12):
    i = s % batches
    x, y = task.inputs[i * bs : (i + 1) * bs], task.targets[i * bs : (i + 1) * bs]
    opt.zero_grad()
    with opt.record():
        task.loss_fn(model(x), y).backward()
    opt.step()
approx, draft = opt.engines[0].approx, kfac._KFACBlock.draft_inverse
drafted, checked = [], []
for _ in range(40):
    for times, hook in ((drafted, draft), (checked, lambda self, damping: None)):
        kfac._KFACBlock.draft_inverse = hook  # type: ignore[method-assign]
        start = time.perf_counter()
        approx.inverse(1e-3)
        times.append(time.perf_counter() - start)
kfac._KFACBlock.draft_inverse = draft  # type: ignore[method-assign]
print(
    f"drafted {1e3 * statistics.median(drafted):.2f} ms, "
    f"checked {1e3 * statistics.median(checked):.2f} ms (medians of 40)"
)
