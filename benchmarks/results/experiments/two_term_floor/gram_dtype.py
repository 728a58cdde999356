"""The sample-space form's Gram matrices: float64 products against float32 ones promoted.

At the MNIST autoencoder's sizes (both sides of its eight layers, 500 statistics samples
of a batch of 1000), one thread, means of 5 calls each. Run from the repository root:

    python benchmarks/results/experiments/two_term_floor/gram_dtype.py
"""

import time
from collections.abc import Callable

import torch

torch.set_num_threads(1)
SAMPLES = 500
SIDES = (785, 1000, 1001, 500, 501, 250, 251, 30, 31, 250, 251, 500, 501, 1000, 1001, 784)


def timed(fn: Callable[[], object], repeats: int = 5) -> float:
    """Mean seconds of ``repeats`` calls after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def kernels(rows: torch.Tensor, dtype: torch.dtype) -> Callable[[], object]:
    """The Hadamard square of the Gram matrix, its product in ``dtype``, held in float64."""
    if dtype == torch.float64:
        wide = rows.double()
        return lambda: (wide @ wide.T).square()
    return lambda: (rows @ rows.T).double().square()


wide = narrow = 0.0
for side in SIDES:
    rows = torch.randn(SAMPLES, side)
    wide += timed(kernels(rows, torch.float64))
    narrow += timed(kernels(rows, torch.float32))
print(f"16 sides: float64 products {1e3 * wide:.1f} ms, float32 products {1e3 * narrow:.1f} ms")
