"""Triangular solves with a square right-hand side, from the left and from the right.

One thread, float32, means of 7 calls, ms: ``solve_triangular`` of a lower Cholesky
factor ``L`` (or its transpose, as a view or contiguous) against a symmetric matrix,
with ``left=True`` and ``left=False``. Run from the repository root:

    python benchmarks/results/experiments/two_term_floor/solve_sides.py
"""

import time
from collections.abc import Callable

import torch

torch.set_num_threads(1)
solve = torch.linalg.solve_triangular


def timed(fn: Callable[[], object], repeats: int = 7) -> float:
    """Mean ms of ``repeats`` calls after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return round(1e3 * (time.perf_counter() - start) / repeats, 2)


def variants(n: int) -> dict[str, Callable[[], object]]:
    """The solves at size ``n`` on random matrices."""
    x = torch.randn(n, 2 * n)
    chol = torch.linalg.cholesky(x @ x.T / (2 * n) + 1e-2 * torch.eye(n))
    upper = chol.mT.contiguous()
    sym = torch.randn(n, n)
    sym = sym + sym.T
    return {
        "L left": lambda: solve(chol, sym, upper=False),
        "L^T left (view)": lambda: solve(chol.mT, sym, upper=True),
        "L^T left (contiguous)": lambda: solve(upper, sym, upper=True),
        "L^T right (view)": lambda: solve(chol.mT, sym, upper=True, left=False),
        "L right": lambda: solve(chol, sym, upper=False, left=False),
        "L^T right (contiguous)": lambda: solve(upper, sym, upper=True, left=False),
    }


for size in (251, 501, 785, 1001):
    print(size, {name: timed(fn) for name, fn in variants(size).items()})
