r"""What building the two-term inverse costs at the MNIST autoencoder's layer sizes.

Run from the repository root::

    python benchmarks/two_term_inverse.py                 # 784-1000-500-250-30 mirrored
    python benchmarks/two_term_inverse.py --quick         # small layers, writes nothing

[`two_term_inverse`][curvlib.linalg.kron.two_term_inverse] builds
$((G_1 + \gamma_G I)\otimes(A_1 + \gamma_A I) + G_2 \otimes A_2)^{-1}$ once per
layer on every statistics step of KFAC-corrected, Deflation and Lanczos. This
benchmark times it against the same function at an earlier commit
(``--baseline``, default ``2d40fc5``: whitening with the explicit inverse of
each Cholesky factor), loaded from git into the same process. For each layer
``[W | b]`` of the autoencoder (``out x (in + 1)``) it draws the four factors
once (synthetic, float32: $G_1$, $A_1$ positive definite with eigenvalues
spread over six decades, $G_2$, $A_2$ symmetric indefinite at a tenth of their
scale), then times both versions in ``--repeats`` rounds, alternating which runs
first within each layer, on one thread. A row gives each version's median
time; the headline ratio pairs the versions round by round: the median over
rounds of (new whole-network time) / (old whole-network time).
*Of which eigh* times the two ``eigh`` of the whitened second factors alone
(the rest is Cholesky, triangular solves and $O(n^2)$ work). Both versions
must apply the same inverse to a random matrix (relative difference
reported). ``--dead F`` zeroes the rows and columns of a fraction ``F`` of each
side's coordinates in both terms, as dead ReLU units do (the step-time benchmark's
autoencoder has 3% dead units in its encoder and 43% in its decoder), which the
current version factorises apart (``curvlib.linalg.kron``, decoupled coordinates).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import REPO, command, commit, machine, write_json

from curvlib.linalg import KroneckerSumInverse, damped_cholesky, eigh, pi_split, two_term_inverse
from curvlib.linalg.factors import cpu_live_coordinates, live_block
from curvlib.linalg.kron import _whitened

DEFAULT_OUT = REPO / "benchmarks" / "results"
AUTOENCODER = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
QUICK = (60, 40, 20, 40, 60)
DAMPING = 1e-3

Inverse = Callable[..., KroneckerSumInverse]


def baseline(rev: str) -> Inverse:
    """``two_term_inverse`` as ``curvlib/linalg/kron.py`` defined it at ``rev``."""
    source = subprocess.run(
        ["git", "show", f"{rev}:curvlib/linalg/kron.py"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    module = types.ModuleType(f"kron_at_{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev}:curvlib/linalg/kron.py", "exec"), module.__dict__)
    fn: Inverse = module.two_term_inverse
    return fn


def _spd(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    values = torch.logspace(0, -6, n, dtype=torch.float64)
    return ((q * values) @ q.T).float()


def _indefinite(n: int, gen: torch.Generator) -> torch.Tensor:
    b = torch.randn(n, n, generator=gen, dtype=torch.float64) / n
    return (0.1 * (b + b.T)).float()


def _kill(mats: Sequence[torch.Tensor], fraction: float, gen: torch.Generator) -> None:
    """Zero the rows and columns of ``fraction`` of the coordinates of ``mats``, in place."""
    n = mats[0].shape[0]
    dead = torch.randperm(n, generator=gen)[: round(fraction * n)]
    for mat in mats:
        mat[dead] = 0.0
        mat[:, dead] = 0.0


def factors(out_dim: int, in_dim: int, seed: int, dead: float = 0.0) -> tuple[torch.Tensor, ...]:
    """``(G1, A1, G2, A2)`` of one layer (module docstring), ``dead`` of each side zeroed."""
    gen = torch.Generator().manual_seed(seed)
    G1, A1 = _spd(out_dim, gen), _spd(in_dim, gen)
    G2, A2 = _indefinite(out_dim, gen), _indefinite(in_dim, gen)
    _kill((G1, G2), dead, gen)
    _kill((A1, A2), dead, gen)
    return G1, A1, G2, A2


def _seconds(fn: Inverse, mats: tuple[torch.Tensor, ...]) -> float:
    start = time.perf_counter()
    fn(*mats, DAMPING)
    return time.perf_counter() - start


def _eigh_job(mats: tuple[torch.Tensor, ...]) -> Callable[[], object]:
    """The two ``eigh`` of the whitened second factors inside ``two_term_inverse``, alone."""
    G1, A1, G2, A2 = mats
    # The live blocks that two_term_inverse decomposes (all of each side unless decoupled).
    live_g, live_a = (
        cpu_live_coordinates(G1, G2, eigh=True),
        cpu_live_coordinates(A1, A2, eigh=True),
    )
    G1, G2 = (live_block(m, live_g) for m in (G1, G2))
    A1, A2 = (live_block(m, live_a) for m in (A1, A2))
    gamma_a, gamma_g = pi_split(A1, G1, DAMPING)
    whitened_g = _whitened(damped_cholesky(G1, gamma_g)[0], G2)
    whitened_a = _whitened(damped_cholesky(A1, gamma_a)[0], A2)
    return lambda: (eigh(whitened_g, clamp_negative=False), eigh(whitened_a, clamp_negative=False))


def _difference(old: Inverse, mats: tuple[torch.Tensor, ...]) -> float:
    """Relative difference of the two versions' inverses applied to one random matrix."""
    gen = torch.Generator().manual_seed(1)
    probe = torch.randn(mats[0].shape[0], mats[1].shape[0], generator=gen)
    want = old(*mats, DAMPING)(probe).double()
    got = two_term_inverse(*mats, DAMPING)(probe).double()
    return float((got - want).norm() / want.norm())


def run(widths: Sequence[int], repeats: int, rev: str, dead: float = 0.0) -> dict[str, Any]:
    """Rows per layer ``widths[i] -> widths[i + 1]`` and the paired whole-network ratios.

    Each round builds every layer's inverse with both versions (alternating
    which goes first); a round's ratio is its new total over its old total, so
    a load change between rounds hits both sides of a ratio alike.
    """
    old = baseline(rev)
    layers = [
        (f"{fan_in}->{fan_out}", factors(fan_out, fan_in + 1, seed=i, dead=dead))
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths))
    ]
    old_ms: list[list[float]] = [[] for _ in layers]
    new_ms: list[list[float]] = [[] for _ in layers]
    eigh_ms: list[list[float]] = [[] for _ in layers]
    eigh_jobs = [_eigh_job(mats) for _, mats in layers]
    for r in range(repeats + 1):  # the first round warms up
        for k, (_, mats) in enumerate(layers):
            start = time.perf_counter()
            eigh_jobs[k]()
            if r:
                eigh_ms[k].append(1e3 * (time.perf_counter() - start))
            pair = [(old, old_ms[k]), (two_term_inverse, new_ms[k])]
            for fn, times in pair if (r + k) % 2 else pair[::-1]:
                seconds = _seconds(fn, mats)
                if r:
                    times.append(1e3 * seconds)
    ratios = [sum(t[r] for t in new_ms) / sum(t[r] for t in old_ms) for r in range(repeats)]
    rows = [
        {
            "layer": name,
            "G": mats[0].shape[0],
            "A": mats[1].shape[0],
            "old_ms": statistics.median(old_ms[k]),
            "new_ms": statistics.median(new_ms[k]),
            "eigh_ms": statistics.median(eigh_ms[k]),
            "rel_diff": _difference(old, mats),
        }
        for k, (name, mats) in enumerate(layers)
    ]
    return {"rows": rows, "round_ratios": ratios}


def table(payload: dict[str, Any]) -> str:
    """The Markdown report."""
    rev = payload["baseline"]
    lines = [
        f"`{payload['command']}` at commit {payload['commit']}, {payload['machine']['date']}, "
        f"{payload['machine']['cpu']}, 1 thread, float32, baseline {rev}, "
        f"{payload['dead']:.0%} of each side's coordinates dead.",
        "",
        f"| layer | G | A | {rev} ms | now ms | ratio | of which eigh ms | rel. diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['layer']} | {r['G']} | {r['A']} | {r['old_ms']:.1f} | {r['new_ms']:.1f} "
            f"| {r['new_ms'] / r['old_ms']:.2f} | {r['eigh_ms']:.1f} | {r['rel_diff']:.1e} |"
        )
    total_old, total_new = payload["total_old_ms"], payload["total_new_ms"]
    lines.append(
        f"| **all layers** | | | {total_old:.1f} | {total_new:.1f} "
        f"| {total_new / total_old:.2f} | {payload['total_eigh_ms']:.1f} | |"
    )
    low, high = min(payload["round_ratios"]), max(payload["round_ratios"])
    lines += [
        "",
        f"Whole network, paired by round: **{payload['ratio']:.2f}** (median over "
        f"{payload['repeats']} rounds; range {low:.2f}–{high:.2f}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11, help="timed runs of each version")
    parser.add_argument("--baseline", default="2d40fc5", help="git revision to compare with")
    parser.add_argument("--quick", action="store_true", help="small layers, write nothing")
    parser.add_argument(
        "--dead", type=float, default=0.0, help="fraction of each side's coordinates zeroed"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the results")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run(QUICK if args.quick else AUTOENCODER, args.repeats, args.baseline, args.dead)
    finally:
        torch.set_num_threads(threads)
    rows = result["rows"]
    payload = {
        "command": command(argv), "commit": commit(), "machine": machine(),
        "baseline": args.baseline, "repeats": args.repeats, "dead": args.dead, "rows": rows,
        "total_old_ms": sum(r["old_ms"] for r in rows),
        "total_new_ms": sum(r["new_ms"] for r in rows),
        "total_eigh_ms": sum(r["eigh_ms"] for r in rows),
        "round_ratios": result["round_ratios"],
        "ratio": statistics.median(result["round_ratios"]),
    }  # fmt: skip
    report = table(payload)
    print(report)
    if not args.quick:
        write_json(args.out / "two_term_inverse.json", payload)
        (args.out / "two_term_inverse.md").write_text(report)
    return payload


if __name__ == "__main__":
    main()
