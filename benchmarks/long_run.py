"""Long-run stability: KFAC and KPSVD on the CURVES autoencoder at small damping.

Trains the deep CURVES autoencoder (784-400-200-100-50-25-6, mirrored, tanh)
for ``--steps`` steps at ``--damping`` and reports, per approximation, whether
any loss or parameter became NaN/Inf, how many steps the guards skipped, the
first and last losses and the mean loss over the last tenth of the steps, and
the resident memory after the first tenth of the run and at its end (flat
memory: no growth beyond allocator noise).

    python benchmarks/long_run.py --steps 2000 --damping 1e-6

The test suite runs the same loop for a few dozen steps
(``tests/benchmarks/test_long_run.py``).
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from _harness import command, commit, machine, progress, write_json
from autoencoder import ARCHITECTURES, autoencoder
from data import load_curves

from curvlib import KFAC, KPSVD, PreconditionedOptimizer

APPROXIMATIONS = {"kfac": KFAC, "kpsvd": KPSVD}


def rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def long_run(
    name: str, steps: int, damping: float, batch: int = 200, seed: int = 0, bar: bool = False
) -> dict[str, Any]:
    """Train ``steps`` steps and report stability figures (see the module docstring)."""
    torch.manual_seed(seed)
    data = load_curves(num_train=2000, num_test=10, seed=seed).train
    model = autoencoder(ARCHITECTURES["curves"])
    loss_fn = nn.BCEWithLogitsLoss()
    opt = PreconditionedOptimizer(model, APPROXIMATIONS[name](), loss_fn=loss_fn, damping=damping)
    losses: list[float] = []
    memory_early = math.nan
    gen = torch.Generator().manual_seed(seed)
    finite = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # skipped steps are counted instead
        for step in progress(range(steps), total=steps, desc=name, enabled=bar):
            idx = torch.randint(0, data.shape[0], (batch,), generator=gen)
            x = data[idx]
            opt.zero_grad()
            with opt.record():
                loss = loss_fn(model(x), x)
                loss.backward()
            opt.step()
            losses.append(loss.item())
            finite = finite and math.isfinite(losses[-1])
            if step == max(steps // 10, 1) - 1:
                memory_early = rss_mib()
    finite = finite and all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return {
        "approx": name,
        "steps": steps,
        "damping": damping,
        "finite": finite,
        "skipped_steps": opt.skipped_steps,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "late_mean_loss": sum(losses[-max(steps // 10, 1) :]) / max(steps // 10, 1),
        "rss_early_mib": memory_early,
        "rss_end_mib": rss_mib(),
    }


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark from the command line and write ``results/long_run.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--damping", type=float, default=1e-6)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--approx", nargs="+", default=list(APPROXIMATIONS))
    parser.add_argument("--out", default=None, help="JSON file (default: results/long_run.json)")
    args = parser.parse_args(argv)
    rows = [long_run(a, args.steps, args.damping, args.batch, bar=True) for a in args.approx]
    for row in rows:
        print(row)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "long_run.json"
    write_json(out, {"machine": machine(), "commit": commit(), "command": command(), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
