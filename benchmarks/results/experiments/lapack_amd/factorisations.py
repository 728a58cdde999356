"""LAPACK and BLAS calls of curvlib's inverses at its benchmark networks' sizes, one thread.

Float32, means of 5 calls, ms: triangular solves with a square right-hand side (lower,
upper, from the right), a GEMM of the same size, ``eigh``, Cholesky and the Cholesky
inverse (``potri``). Run from the repository root:

    python benchmarks/results/experiments/lapack_amd/factorisations.py
"""

import time
from collections.abc import Callable

import torch

torch.set_num_threads(1)


def timed(fn: Callable[[], object], repeats: int = 5) -> float:
    """Mean ms of ``repeats`` calls after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return round(1e3 * (time.perf_counter() - start) / repeats, 2)


def calls(n: int) -> dict[str, Callable[[], object]]:
    """The calls at size ``n``, on random matrices (symmetric, and one SPD with its factor)."""
    x = torch.randn(n, 2 * n)
    spd = x @ x.T / (2 * n) + 1e-2 * torch.eye(n)
    sym = torch.randn(n, n)
    sym = sym + sym.T
    chol = torch.linalg.cholesky(spd)
    return {
        "trsm lower": lambda: torch.linalg.solve_triangular(chol, sym, upper=False),
        "trsm upper": lambda: torch.linalg.solve_triangular(chol.mT, sym, upper=True),
        "trsm right": lambda: torch.linalg.solve_triangular(chol.mT, sym, upper=True, left=False),
        "gemm": lambda: sym @ sym,
        "eigh": lambda: torch.linalg.eigh(sym),
        "cholesky": lambda: torch.linalg.cholesky_ex(spd),
        "potri": lambda: torch.cholesky_inverse(chol),
    }


for size in (251, 501, 1001):
    print(size, {name: timed(fn) for name, fn in calls(size).items()})
