"""float32 time over bfloat16 time of one layer's two products, conversions included.

The apply of a Kronecker-factored inverse, ``G @ V @ A``, in float32 against
``(G_bf16 @ V.bfloat16() @ A_bf16).float()``, best of 100 calls each, interleaved,
on two threads and on one. Shapes ``d_out x d_in`` with their multiply-adds
$d_o d_i (d_o + d_i)$ (``curvlib.linalg.precision.apply_cost``).

    python products.py          (products.txt)
"""

import time

import torch

SHAPES = [
    (512, 257), (256, 513), (512, 65), (64, 513), (128, 257), (256, 129), (64, 257),
    (16, 129), (400, 785), (784, 401), (64, 801), (32, 801),
]  # fmt: skip

for threads in (2, 1):
    torch.set_num_threads(threads)
    out = []
    for o, i in SHAPES:
        G, A, V = torch.randn(o, o), torch.randn(i, i), torch.randn(o, i)
        Gb, Ab = G.bfloat16(), A.bfloat16()
        best = {"float32": float("inf"), "bfloat16": float("inf")}
        for _ in range(100):
            start = time.perf_counter()
            G @ V @ A
            best["float32"] = min(best["float32"], time.perf_counter() - start)
            start = time.perf_counter()
            (Gb @ V.bfloat16() @ Ab).float()
            best["bfloat16"] = min(best["bfloat16"], time.perf_counter() - start)
        cost = o * i * (o + i) / 1e6
        out.append(f"{o}x{i} ({cost:.1f}M) {best['float32'] / best['bfloat16']:.2f}x")
    print(f"{threads} thread(s): " + ", ".join(out))
