"""What decoupling dead rows costs next to what it saves, one thread, ms per call.

For factor sizes and dead counts of the convergence benchmark's tasks: finding them
(``cpu_live_coordinates``, the mask), copying the live block out (``live_block``) and one
factor back in (``embed_live``), against a Cholesky inverse of the whole damped factor and
of its live block.

    python copies.py
"""

import time

import torch

from curvlib.linalg import live_coordinates
from curvlib.linalg.factors import (
    cholesky_inverse,
    cpu_live_coordinates,
    embed_live,
    first_cholesky,
    live_block,
)

torch.set_num_threads(1)


def ms(fn, repeats=50):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def cholesky_inverse_of(mat):
    return cholesky_inverse(first_cholesky(mat, 0.1, symmetric=True)[0])


def row(n, dead):
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(n, n, generator=gen)
    m = b @ b.T / n
    idx = torch.randperm(n, generator=gen)[:dead]
    m[idx] = 0.0
    m[:, idx] = 0.0
    live = live_coordinates(m)
    sub = live_block(m, live)
    inv = cholesky_inverse_of(sub)
    return (
        f"{n} rows, {dead} dead: find {ms(lambda: cpu_live_coordinates(m)):.3f}, "
        f"block {ms(lambda: live_block(m, live)):.3f}, "
        f"embed {ms(lambda: embed_live(inv, live, n, 1.0)):.3f}, "
        f"whole Cholesky inverse {ms(lambda: cholesky_inverse_of(m)):.3f}, "
        f"live block's {ms(lambda: cholesky_inverse_of(sub)):.3f}"
    )


for n, dead in ((129, 21), (257, 14), (257, 37), (513, 73), (801, 257)):
    print(row(n, dead))
