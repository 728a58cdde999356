r"""The Gram matrix of a factor, xᵀx, as one GEMM against the upper block rows only.

A Kronecker factor is $A = \bar a^\top \bar a / n$: a GEMM computes both triangles.
Split the columns into ``k`` blocks and compute, for each block row, its product with
the columns from its diagonal block on (one GEMM per block row), mirroring the rest:
$(k + 1) / 2k$ of the multiply-adds. Median of 15 interleaved rounds per shape and
``k`` (``k = 1`` is the plain GEMM), float32, on this machine's threads.

    python gram.py THREADS
"""

import statistics
import sys
import time

import torch

from curvlib.linalg.factors import gram


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    shapes = [(125, 785), (256, 513), (400, 801), (500, 1001), (1000, 785), (1600, 801)]
    splits = (1, 2, 3, 4, 6)
    print(f"# {torch.get_num_threads()} threads; ms, median of 15 interleaved rounds")
    for rows, cols in shapes:
        x = torch.randn(rows, cols)
        fns = {k: (lambda k=k, x=x: gram(x, k)) for k in splits}
        times: dict[int, list[float]] = {k: [] for k in splits}
        for _ in range(16):
            for k, fn in fns.items():
                times[k].append(timed(fn))
        med = {k: 1e3 * statistics.median(v[1:]) for k, v in times.items()}
        cells = ", ".join(f"k={k} {v:.2f}" for k, v in med.items())
        print(f"{rows}x{cols}: {cells}; best k={min(med, key=med.get)}", flush=True)


if __name__ == "__main__":
    main()
