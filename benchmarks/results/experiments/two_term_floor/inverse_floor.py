"""The LAPACK work of the two-term inverse of the MNIST autoencoder, timed alone.

Per side of each of the eight layers (factors ``out`` and ``in + 1`` of
784-1000-500-250-30, mirrored): ``eigh`` of the whitened second factor, the
Cholesky factorisation of the first and three triangular solves with ``n``
right-hand sides (the whitening and the basis), on random SPD matrices of those
sizes; medians of three calls after one, one thread. Their sum is the floor of
``two_term_inverse`` on this machine.

    python inverse_floor.py
"""

import statistics
import time
from collections.abc import Callable

import torch

torch.set_num_threads(1)
SIDES = [1000, 785, 500, 1001, 250, 501, 30, 251, 250, 31, 500, 251, 1000, 501, 784, 1001]


def timed(fn: Callable[[], object], calls: int = 3) -> float:
    """Median ms of ``calls`` calls after a first one."""
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


torch.manual_seed(0)
parts: dict[int, dict[str, float]] = {}
for n in sorted(set(SIDES)):
    x = torch.randn(2 * n, n)
    m = x.T @ x / (2 * n) + 1e-3 * torch.eye(n)
    chol = torch.linalg.cholesky(m)
    parts[n] = {
        "eigh": timed(lambda: torch.linalg.eigh(m)),  # noqa: B023 (called at once)
        "cholesky": timed(lambda: torch.linalg.cholesky(m)),  # noqa: B023
        "3 solves": 3 * timed(lambda: torch.linalg.solve_triangular(chol, m, upper=False)),  # noqa: B023
    }
total = {k: sum(parts[n][k] for n in SIDES) for k in ("eigh", "cholesky", "3 solves")}
print("per side [ms]:", {n: {k: round(v, 1) for k, v in p.items()} for n, p in parts.items()})
print("all 16 sides [ms]:", {k: round(v) for k, v in total.items()})
print("sum [ms]:", round(sum(total.values())))
