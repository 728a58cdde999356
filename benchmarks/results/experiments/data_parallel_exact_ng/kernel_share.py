"""How much of exact natural gradient's inverse the kernel-block split takes off the busiest rank.

One process, one thread: for each network, the time of a whole inverse
(``inverse(damping)``: every layer's kernel block, their sum's Cholesky factor)
against the busiest rank's part of a split one at 2 and 4 ranks (the blocks of
the layers ``assign_owners`` gives it by ``work_cost``, plus the inverse from
given blocks, which every rank builds). Medians of ``--repeats`` alternating
rounds. Run from the repository root:

    python benchmarks/results/experiments/data_parallel_exact_ng/kernel_share.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "examples"))

from cnn import kpsvd_cnn  # noqa: E402

from curvlib import ExactNaturalGradient, FisherType, StatKind  # noqa: E402
from curvlib.distributed import assign_owners  # noqa: E402
from curvlib.extract import CurvatureExtractor  # noqa: E402


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, model: nn.Module, x: torch.Tensor, classes: int, repeats: int) -> str:
    torch.manual_seed(0)
    loss_fn = nn.CrossEntropyLoss()
    y = torch.randint(0, classes, (x.shape[0],))
    ex = CurvatureExtractor(
        model, loss_fn, stats={StatKind.PER_SAMPLE_IO}, fisher_type=FisherType.EMPIRICAL
    )
    with ex.collect():
        loss_fn(model(x), y).backward()
    approx = ExactNaturalGradient()
    approx.update(ex.statistics())
    layers = ex.layout.layers
    costs = {la.name: approx.work_cost(la) for la in layers}
    grams = approx.grams(approx.layers)
    whole: list[float] = []
    parts: dict[int, list[float]] = {2: [], 4: []}
    for _ in range(repeats):
        whole.append(_timed(lambda: approx.inverse(1e-3)))
        for world in parts:
            owners = assign_owners(costs, world)
            busiest = []
            for rank in range(world):
                mine = [n for n, r in owners.items() if r == rank]
                busiest.append(_timed(lambda mine=mine: approx.grams(mine)))
            solve = _timed(lambda: approx.inverse(1e-3, grams=grams))
            parts[world].append(max(busiest) + solve)
    full = statistics.median(whole)
    cells = [f"{1e3 * full:.1f}"]
    for times in parts.values():
        t = statistics.median(times)
        cells.append(f"{1e3 * t:.1f} ({t / full:.2f})")
    return f"| {name} | {x.shape[0]} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        "| network | rows m | whole inverse (ms) | busiest of 2 ranks (ms, ÷ whole) |"
        " busiest of 4 ranks (ms, ÷ whole) |"
    )
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    print(
        measure(
            "MLP 256-512-512-10 (the benchmark's)",
            _mlp(),
            torch.randn(256, 256, generator=gen),
            10,
            args.repeats,
        )
    )
    print(
        measure(
            "CNN conv5x5 32-32-64 on 8x8 (the examples')",
            kpsvd_cnn(1, 8, 10),
            torch.randn(100, 1, 8, 8, generator=gen),
            10,
            args.repeats,
        )
    )


if __name__ == "__main__":
    main()
