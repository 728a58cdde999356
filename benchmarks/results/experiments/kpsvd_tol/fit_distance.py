r"""How far KPSVD's fit at ``tol=1e-2`` is from the converged one, per layer.

Trains default KPSVD for 25 steps on a task of ``benchmarks/convergence.py``,
keeps the per-sample statistics of its last refresh, and fits each layer's
$G \otimes A$ again in float64 at ``tol=1e-2`` and at ``tol=1e-10``: prints
their relative Frobenius distance and both iteration counts.

    python benchmarks/results/experiments/kpsvd_tol/fit_distance.py digits-cnn
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "examples")]

import convergence as cv  # noqa: E402

import curvlib.approx.kpsvd as kpsvd_module  # noqa: E402
from curvlib import KPSVD, PreconditionedOptimizer  # noqa: E402
from curvlib.core import PerSampleIO  # noqa: E402
from curvlib.linalg.rearrange import balanced_factors, power_svd, psd_start  # noqa: E402
from curvlib.linalg.sample_space import rearranged  # noqa: E402


def fitted(io: PerSampleIO, tol: float) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
    op, _ = rearranged(io, torch.float64)
    triple = power_svd(op, psd_start(op, None), tol=tol, max_iter=500)
    return balanced_factors(triple), triple.iterations


def distance(p: tuple[torch.Tensor, torch.Tensor], q: tuple[torch.Tensor, torch.Tensor]) -> float:
    """``||P - Q||_F / ||P||_F`` for Kronecker products ``P = G_p (x) A_p``, ``Q = G_q (x) A_q``."""
    (g1, a1), (g2, a2) = p, q
    n1, n2 = g1.norm() ** 2 * a1.norm() ** 2, g2.norm() ** 2 * a2.norm() ** 2
    inner = (g1 * g2).sum() * (a1 * a2).sum()
    return float((n1 + n2 - 2 * inner).clamp_min(0).sqrt() / n1.sqrt())


def main(name: str) -> None:
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    caught: dict[tuple[int, int], PerSampleIO] = {}
    fit = kpsvd_module._KPSVDBlock._fit

    def keeping(self, stats):  # type: ignore[no-untyped-def]
        caught[(self.out_dim, self.in_dim)] = stats.io
        return fit(self, stats)

    kpsvd_module._KPSVDBlock._fit = keeping  # type: ignore[method-assign]
    task = cv.TASKS[name](False)
    torch.manual_seed(0)
    model = task.make_model()
    opt = PreconditionedOptimizer(model, KPSVD(), loss_fn=task.loss_fn)
    order = torch.Generator().manual_seed(0)
    for _ in range(25):
        idx = torch.randperm(len(task.inputs), generator=order)[: task.batch_size]
        opt.zero_grad()
        with opt.record():
            task.loss_fn(model(task.inputs[idx]), task.targets[idx]).backward()
        opt.step()
    for (d_out, d_in), io in caught.items():
        tight, tight_iterations = fitted(io, 1e-10)
        loose, loose_iterations = fitted(io, 1e-2)
        print(
            f"{name} [{d_out}, {d_in}]: distance {distance(tight, loose):.1e}, "
            f"iterations {loose_iterations} against {tight_iterations}"
        )


if __name__ == "__main__":
    main(sys.argv[1])
