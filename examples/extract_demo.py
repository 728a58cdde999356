"""Train a small autoencoder and watch its curvature statistics.

A minimal end-to-end run of curvlib's extractor layer: an MLP autoencoder is
trained with Adam on synthetic smooth curves, and every ``--t-cov`` steps the
same backward pass also records Monte-Carlo Kronecker factors. The script
prints, per layer, the traces of ``A`` and ``G`` and how far ``G ⊗ A`` is from
the exact Fisher block of that batch (relative Frobenius error), which is what
the approximations of curvlib improve on.

    python examples/extract_demo.py
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from curvlib.core import FisherType, StatKind
from curvlib.extract import CurvatureExtractor


def smooth_curves(num: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Random smooth signals in [0, 1]: sums of three low-frequency sines."""
    t = torch.linspace(0, 1, dim)
    freq = torch.randint(1, 4, (num, 3, 1), generator=generator).float()
    phase = 2 * math.pi * torch.rand(num, 3, 1, generator=generator)
    amp = torch.rand(num, 3, 1, generator=generator)
    signal = (amp * torch.sin(2 * math.pi * freq * t + phase)).sum(1)
    return torch.sigmoid(2 * signal)


def kron_error(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Relative Frobenius error of EXACT ``G ⊗ A`` against the exact layer blocks."""
    ex = CurvatureExtractor(
        model, loss_fn, stats={StatKind.KRONECKER, StatKind.PER_SAMPLE_GRAD}, fisher_type="exact"
    )
    with ex.collect():
        loss_fn(model(x), x).backward()
    model.zero_grad()
    errors = {}
    for name, stats in ex.statistics().layers.items():
        assert stats.kronecker is not None and stats.grads is not None
        w = stats.grads.grads.flatten(2).flatten(0, 1)  # [K*N, P]
        exact = w.T @ w / x.shape[0]
        approx = torch.kron(stats.kronecker.G, stats.kronecker.A)
        errors[name] = float((approx - exact).norm() / exact.norm())
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--t-cov", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    data = smooth_curves(4096, 32, gen)
    model = nn.Sequential(
        nn.Linear(32, 24),
        nn.Tanh(),
        nn.Linear(24, 6),
        nn.Linear(6, 24),
        nn.Tanh(),
        nn.Linear(24, 32),
    )
    loss_fn = nn.BCEWithLogitsLoss()
    extractor = CurvatureExtractor(model, loss_fn, fisher_type=FisherType.MC, seed=args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    print(extractor.layout.describe())
    start = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, len(data), (args.batch_size,), generator=gen)
        x = data[idx]
        opt.zero_grad()
        if step % args.t_cov == 0:
            with extractor.collect():
                loss = loss_fn(model(x), x)
                loss.backward()
            factors = extractor.statistics()
            traces = "  ".join(
                f"{name}: tr A={s.kronecker.A.trace():7.2f} tr G={s.kronecker.G.trace():.1e}"
                for name, s in factors.layers.items()
                if s.kronecker is not None
            )
            print(f"step {step:4d}  loss {loss.item():.4f}  {traces}")
        else:
            loss = loss_fn(model(x), x)
            loss.backward()
        opt.step()
    elapsed = time.perf_counter() - start
    errors = kron_error(model, loss_fn, data[:16])
    print(f"final loss {loss.item():.4f} after {args.steps} steps in {elapsed:.1f} s")
    print("relative Frobenius error of G ⊗ A vs the exact Fisher block (16 samples):")
    for name, err in errors.items():
        print(f"  layer {name}: {err:.3f}")


if __name__ == "__main__":
    main()
