r"""The sample-space form's Gram sandwich: the former implementation against the current one.

``_sandwich(gram, coef)`` is $\sum_m M^{nm} C_m (M^{nm})^\top$ for every row block
$n$ of a symmetric ``[S T, S T]`` Gram matrix. The former implementation
multiplied the transposed row blocks and then copied an $S^2 T^2$ tensor into
a transposed layout; the current one multiplies contiguous row blocks and reads
the first product in place. Both in float64, as the form iterates; two threads;
best of two rounds of five.

    python sandwich_times.py      (from this folder or by path)
"""

import sys
import time
from pathlib import Path

root = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(root))
import torch  # noqa: E402

from curvlib.linalg.sample_space import _sandwich  # noqa: E402

torch.set_num_threads(2)


def former(gram: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    size, t = coef.shape[0], coef.shape[-1]
    mc = torch.bmm(gram.transpose(1, 2), coef)
    mc = mc.view(size, size, t, t).permute(1, 2, 0, 3).reshape(size, t, size * t)
    return torch.bmm(mc, gram.transpose(1, 2))


def best_ms(fn: object, gram: torch.Tensor, coef: torch.Tensor) -> float:
    fn(gram, coef)  # type: ignore[operator]
    rounds = []
    for _ in range(2):
        start = time.perf_counter()
        for _ in range(5):
            fn(gram, coef)  # type: ignore[operator]
        rounds.append((time.perf_counter() - start) / 5 * 1e3)
    return min(rounds)


# S samples, T positions, d features: the digits CNN's second and third convolutions
# on half a batch of 200, and the convolutional autoencoder's second one.
for size, t, d, what in ((100, 16, 801, "CNN conv 2"), (100, 4, 801, "CNN conv 3"),
                         (100, 16, 513, "conv AE conv 2")):  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(size * t, d, generator=gen, dtype=torch.float64)
    gram = (x @ x.T).view(size, t, size * t)
    coef = torch.randn(size, t, t, generator=gen, dtype=torch.float64)
    reference = former(gram, coef)
    error = float((_sandwich(gram, coef) - reference).abs().max() / reference.abs().max())
    print(
        f"{what:15s} S={size} T={t}: former {best_ms(former, gram, coef):6.2f} ms, "
        f"current {best_ms(_sandwich, gram, coef):6.2f} ms (largest difference {error:.1e} of "
        "the largest entry)"
    )
