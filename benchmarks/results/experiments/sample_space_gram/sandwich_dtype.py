"""One Gram product of the sample-space form in float64 and in float32, and their difference.

The shapes of the largest sample-space layers of the digits CNN (second convolution:
100 samples, 16 positions, 801 input columns) and convolutional autoencoder (100, 16,
513): ``python benchmarks/results/experiments/sample_space_gram/sandwich_dtype.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fit_times import median_ms

from curvlib.linalg.sample_space import _sandwich

torch.set_num_threads(2)

gen = torch.Generator().manual_seed(0)
for samples, positions, columns in ((100, 16, 801), (100, 16, 513)):
    rows = torch.randn(samples * positions, columns, generator=gen)
    wide = (rows.double() @ rows.double().T).view(samples, positions, -1)
    narrow = (rows @ rows.T).view(samples, positions, -1)
    coef = torch.randn(samples, positions, positions, generator=gen, dtype=torch.float64)
    coef = coef + coef.mT
    exact = _sandwich(wide, coef)
    error = float((_sandwich(narrow, coef) - exact).abs().max() / exact.abs().max())
    slow = median_ms(lambda wide=wide, coef=coef: _sandwich(wide, coef))
    fast = median_ms(lambda narrow=narrow, coef=coef: _sandwich(narrow, coef))
    print(
        f"S={samples} T={positions} d={columns}: float64 {slow:.2f} ms, float32 {fast:.2f} ms, "
        f"largest difference {error:.1e} of the largest entry"
    )
