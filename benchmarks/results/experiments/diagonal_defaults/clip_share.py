r"""Where the Diagonal's step goes: the share of the KL term from the flattest coordinates.

Trains the Diagonal on one task of ``benchmarks/convergence.py`` (one seed) and, at a
few steps, splits the clip's quadratic form $q = \sum_i g_i^2 / (d_i + \lambda)$ (the
gradient $g$, the running diagonal $d$ of every curvature layer) by the curvature of
the coordinates: the share of $q$ from coordinates with $d_i < \lambda$ and from the
flattest half, and the clip factor $\nu = \min(1, \sqrt{c / (\eta^2 q)})$ of the
plain direction (momentum left out), the share of coordinates whose diagonal is exactly zero (no
sample's gradient reaches them: dead ReLU units) and the largest entry of the step
$\nu\eta g_i / (d_i + \lambda)$. With $\nu < 1$, the whole step is scaled so that
$q$ fits the clip: when the flat coordinates carry most of $q$, the well-curved ones
move by a small fraction of their Newton step $g_i / d_i$.

    python clip_share.py TASK SEED DAMPING [DAMPING ...]   (a number, or value:samples)
"""

import sys
from pathlib import Path

root = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples")]
import torch  # noqa: E402

torch.set_num_threads(1)
import convergence as cv  # noqa: E402

from curvlib import Diagonal, PreconditionedOptimizer  # noqa: E402
from curvlib.optim import DampingWarmup  # noqa: E402
from curvlib.optim.defaults import DEFAULTS  # noqa: E402

REPORT_AT = (0, 1, 2, 4, 8, 12, 20, 50, 100, 200, 400)


def parse(text: str) -> float | DampingWarmup:
    value, _, samples = text.partition(":")
    return DampingWarmup(float(value), int(samples)) if samples else float(value)


def shares(opt: PreconditionedOptimizer) -> tuple[float, float, float, float, float, float]:
    """``q``, its shares from ``d < lambda`` and the flattest half, ``nu``, dead share, max step."""
    lam = opt.engine.damping
    blocks = opt.engine.approx.blocks
    d = torch.cat([blocks[la.name].diagonal.flatten() for la in opt.layers])
    g = torch.cat([la.grad_matrix().flatten() for la in opt.layers])
    terms = g.square() / (d + lam)
    q = float(terms.sum())
    flat = float(terms[d < lam].sum()) / q
    half = float(terms[d <= d.median()].sum()) / q
    nu = min(1.0, (DEFAULTS.kl_clip / (DEFAULTS.lr**2 * q)) ** 0.5)
    dead = float((d == 0).float().mean())
    largest = float((g.abs() / (d + lam)).max()) * nu * DEFAULTS.lr
    return q, flat, half, nu, dead, largest


task_name, seed = sys.argv[1], int(sys.argv[2])
task = cv.TASKS[task_name](False)
for text in sys.argv[3:]:
    torch.manual_seed(seed)
    model = task.make_model()
    opt = PreconditionedOptimizer(model, Diagonal(), loss_fn=task.loss_fn, damping=parse(text))
    order = torch.Generator().manual_seed(seed)
    step, n, bs = 0, len(task.inputs), task.batch_size
    while step <= max(REPORT_AT):
        perm = torch.randperm(n, generator=order)
        for b in range(task.steps_per_epoch):
            idx = perm[b * bs : (b + 1) * bs]
            opt.zero_grad()
            with opt.record():
                task.loss_fn(model(task.inputs[idx]), task.targets[idx]).backward()
            if step in REPORT_AT and opt.engine.approx.blocks:
                q, flat, half, nu, dead, largest = shares(opt)
                print(
                    f"damping {text} step {step} lambda {opt.engine.damping:.2e} "
                    f"q {q:.3g} share(d<lambda) {flat:.2f} share(flattest half) {half:.2f} "
                    f"nu {nu:.3f} d=0 {dead:.2f} max|step| {largest:.2g} "
                    f"loss {cv.training_loss(model, task):.2f}",
                    flush=True,
                )
            opt.step()
            step += 1
