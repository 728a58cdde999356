r"""Time per step and bytes per statistics step of data-parallel training (gloo, CPU).

Run from the repository root::

    python benchmarks/data_parallel.py          # 1, 2 and 4 ranks, five approximations
    python benchmarks/data_parallel.py --quick  # 1 and 2 ranks, few steps, writes nothing

Each configuration starts ``W`` processes in a gloo process group on this
machine (one thread each, ``--threads``: a parallel region of several threads
stalls whenever another process holds one of its cores), wraps
an MLP classifier in ``DistributedDataParallel`` and trains it with
``PreconditionedOptimizer`` at the library defaults (statistics and inverses
every 10 steps after the warm-up) on a fixed global batch split over the
ranks, with the work split over the ranks by layer (``split_inverses=True``:
KFAC's inverses, EKFAC's eigenbases, KPSVD's and Deflation's fits to each
batch and their inverses; exact natural gradient's kernel blocks) or not; the
owners send preconditioned gradients on every step (split *directions*) or
whole inverses once per rebuild (split *inverses*, not for EKFAC, whose inverse
is built on every rank); exact natural gradient's owners send their layers'
$m \times m$ kernel blocks once per rebuild (split *kernels*). Reported per
configuration, by rank 0:

* *ms/step*: the mean wall time of the steps after the warm-up, a whole number
  of 10-step windows (one statistics and inverse step each); the median over
  ``--repeats`` runs, with the smallest and largest in brackets;
* *ms/stats step*: the median wall time of the statistics steps among them
  (those that rebuilt the inverse), the median over the runs;
* *bytes/stats step*: what rank 0 put into curvlib's collectives on the last
  statistics step (``DataParallel.last_statistics``): header, factors, and for
  EKFAC, KPSVD and Deflation the per-sample statistics;
* *received/stats step*: what the collectives of that statistics step
  delivered to the rank that received most (``Traffic.received``): the other
  ranks' headers, the factors' sum, and the other ranks' per-sample statistics
  (with the split, of the layers that rank owns only);
* *curvlib bytes/step*: everything rank 0 put into curvlib's collectives,
  per step (with the split: the broadcasts of KFAC's preconditioned gradients,
  every step, or of EKFAC's eigenbases, every refresh);
* *bytes/split broadcast*: the last of those broadcasts
  (``DataParallel.last_shared``): the directions, one refresh's bases, one
  statistics step's fitted factors, or one rebuild's inverses or kernel blocks;
* *DDP bytes/step*: the gradient DDP all-reduces, $4P$ bytes.

On a machine with fewer cores than ranks the processes compete for the cores,
and the times say more about that than about the method.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as torch_mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import REPO, command, commit, machine, progress, write_json

DEFAULT_OUT = REPO / "benchmarks" / "results"
DOCS_RESULTS = REPO / "docs" / "results"
WIDTHS = (256, 512, 512, 10)
GLOBAL_BATCH = 512
WINDOW = 10
WARMUP_STEPS = 20
SPLITS = {"ekfac": ("directions",), "exact-ng": ("kernels",)}
"""The splits other than directions and inverses: EKFAC sends no inverses; exact natural
gradient splits its kernel blocks and sends nothing per step."""


def _model(widths: Sequence[int]) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _rank_main(rank: int, world_size: int, store: str, config: dict[str, Any], out: str) -> None:
    import torch.distributed as dist

    from curvlib import (
        EKFAC,
        KFAC,
        KPSVD,
        Deflation,
        ExactNaturalGradient,
        PreconditionedOptimizer,
    )
    from curvlib.distributed import DataParallel

    threads = int(config["threads"])
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=120),
    )
    widths = config["widths"]
    net = _model(widths)
    model = nn.parallel.DistributedDataParallel(net)
    loss_fn = nn.CrossEntropyLoss()
    approx = {
        "kfac": KFAC,
        "ekfac": EKFAC,
        "kpsvd": KPSVD,
        "deflation": Deflation,
        "exact-ng": ExactNaturalGradient,
    }[config["approx"]]()
    split = config["split"]
    sync = DataParallel(
        split_inverses=split is not None,
        broadcast=split if split in ("directions", "inverses") else "directions",
    )
    opt = PreconditionedOptimizer(model, approx, loss_fn=loss_fn, data_parallel=sync)
    gen = torch.Generator().manual_seed(1 + rank)
    local = config["batch"] // world_size
    x = torch.randn(local, widths[0], generator=gen)
    y = torch.randint(0, widths[-1], (local,), generator=gen)
    steps = config["steps"]
    times: list[float] = []
    stats_times: list[float] = []
    stats_bytes = stats_messages = stats_received = 0
    traffic_before = 0
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            traffic_before = sync.traffic.bytes
        start = time.perf_counter()
        opt.zero_grad()
        with opt.record():
            loss_fn(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
        if step >= WARMUP_STEPS and opt.last_stats["inverse_rebuilt"]:
            stats_times.append(times[-1])
        if sync.last_statistics.messages:
            stats_bytes, stats_messages = sync.last_statistics.bytes, sync.last_statistics.messages
            stats_received = sync.last_statistics.received
    received_by_rank: list[Any] = [None] * world_size
    dist.all_gather_object(received_by_rank, stats_received)
    if rank == 0:
        params = sum(p.numel() for p in net.parameters())
        result = {
            **config,
            "ranks": world_size,
            "threads": threads,
            "ms_per_step": 1e3 * sum(times[WARMUP_STEPS:]) / steps,
            "ms_per_stats_step": 1e3 * statistics.median(stats_times),
            "stats_bytes": stats_bytes,
            "stats_messages": stats_messages,
            "stats_received": received_by_rank,
            "curvlib_bytes_per_step": (sync.traffic.bytes - traffic_before) / steps,
            "shared_bytes": sync.last_shared.bytes,
            "ddp_bytes_per_step": 4 * params,
        }
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def run(config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """One configuration on ``world_size`` new processes; rank 0's measurements."""
    with tempfile.TemporaryDirectory() as folder:
        store, out = os.path.join(folder, "store"), os.path.join(folder, "result.json")
        torch_mp.start_processes(
            _rank_main,
            args=(world_size, store, config, out),
            nprocs=world_size,
            join=True,
            start_method="forkserver",
        )
        result: dict[str, Any] = json.loads(Path(out).read_text())
        return result


def table(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The Markdown table of the docs."""
    lines = [
        f"Measured {meta['machine']['date']} on {meta['machine']['cpu']} "
        f"({meta['machine']['cpu_count']} cores), torch {meta['machine']['torch']}, "
        f"commit `{meta['commit']}`: `{meta['command']}`. MLP "
        f"{'-'.join(map(str, meta['widths']))}, global batch {meta['batch']}, "
        f"{meta['steps']} steps after a warm-up of {WARMUP_STEPS}, "
        f"{meta['threads']} thread(s) per rank, median of "
        f"{meta['repeats']} runs (smallest–largest). The byte counts are exact; the "
        "times come from processes sharing the machine's cores and vary between runs.",
        "",
        "| approximation | ranks | split | ms/step | ms/stats step | bytes/stats step | "
        "received/stats step | curvlib bytes/step | bytes/split broadcast | DDP bytes/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['approx'].upper()} | {r['ranks']} | {r['split'] or 'no'} | "
            f"{r['ms_per_step']:.1f} ({r['ms_runs'][0]:.1f}–{r['ms_runs'][-1]:.1f}) | "
            f"{r['ms_per_stats_step']:.1f} | "
            f"{r['stats_bytes']:,} | {max(r['stats_received']):,} | "
            f"{r['curvlib_bytes_per_step']:,.0f} | {r.get('shared_bytes', 0):,} | "
            f"{r['ddp_bytes_per_step']:,} |"
        )
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: Path) -> None:
    """Per approximation, the time per step and per statistics step of every configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    approxes = list(dict.fromkeys(r["approx"] for r in rows))
    fig, axes = plt.subplots(
        1, 2, figsize=(12, 4.2), constrained_layout=True, sharey=False, squeeze=False
    )
    for ax, key, title in zip(
        axes[0],
        ("ms_per_step", "ms_per_stats_step"),
        ("mean step (ms)", "median statistics step (ms)"),
        strict=True,
    ):
        configs = list(dict.fromkeys((r["ranks"], r["split"]) for r in rows))
        width = 0.8 / len(configs)
        for k, (ranks, split) in enumerate(configs):
            by_approx = {r["approx"]: r for r in rows if (r["ranks"], r["split"]) == (ranks, split)}
            xs = [i + (k - (len(configs) - 1) / 2) * width for i in range(len(approxes))]
            values = [by_approx[a][key] if a in by_approx else 0.0 for a in approxes]
            label = f"{ranks} rank{'s' if ranks > 1 else ''}, " + (split or "no split")
            ax.bar(xs, values, width, label=label, alpha=0.85)
        ax.set_xticks(range(len(approxes)), [a.upper() for a in approxes])
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        f"data-parallel MLP {'-'.join(map(str, payload['widths']))}, global batch "
        f"{payload['batch']}, {payload['threads']} thread(s) per rank "
        f"({payload['machine']['cpu']}, commit {payload['commit']})",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--approx",
        nargs="+",
        choices=["kfac", "ekfac", "kpsvd", "deflation", "exact-ng"],
        default=["kfac", "ekfac", "kpsvd", "deflation", "exact-ng"],
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=GLOBAL_BATCH)
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="1 and 2 ranks, 10 steps, no files")
    parser.add_argument(
        "--plot", type=Path, default=None, help="only redraw the PNG of a data_parallel.json"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.ranks, args.steps, args.repeats = [1, 2], WINDOW, 1
    if args.steps % WINDOW:
        parser.error(f"--steps must be a multiple of {WINDOW} (whole statistics windows)")
    if args.plot is not None:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        if args.plot.resolve() == (DEFAULT_OUT / "data_parallel.json").resolve():
            shutil.copy(DEFAULT_OUT / "data_parallel.png", DOCS_RESULTS / "data_parallel.png")
        return {}
    multiprocessing.set_forkserver_preload(["torch", "torch._dynamo", "curvlib"])
    configs = []
    for approx in args.approx:
        for world_size in args.ranks:
            splits: tuple[str | None, ...] = (None,)
            if world_size > 1:
                splits += SPLITS.get(approx, ("directions", "inverses"))
            configs += [(approx, world_size, split) for split in splits]
    rows = []
    for approx, world_size, split in progress(configs, len(configs), "configurations"):
        config = {
            "approx": approx,
            "split": split,
            "steps": args.steps,
            "batch": args.batch,
            "widths": args.widths,
            "threads": args.threads,
        }
        runs = [run(config, world_size) for _ in range(args.repeats)]
        times = sorted(r["ms_per_step"] for r in runs)
        row = {
            **runs[0],
            "ms_per_step": statistics.median(times),
            "ms_runs": times,
            "ms_per_stats_step": statistics.median(r["ms_per_stats_step"] for r in runs),
        }
        rows.append(row)
    meta = {
        "machine": machine(),
        "commit": commit(),
        "command": command(argv),
        "widths": args.widths,
        "batch": args.batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
    }
    payload = {**meta, "rows": rows}
    if not args.quick:
        write_json(args.out / "data_parallel.json", payload)
        (args.out / "data_parallel.md").write_text(table(rows, meta))
        plot(payload, args.out / "data_parallel.png")
        if args.out.resolve() == DEFAULT_OUT.resolve():  # the docs show the benchmark's own PNG
            shutil.copy(args.out / "data_parallel.png", DOCS_RESULTS / "data_parallel.png")
    return payload


if __name__ == "__main__":
    main()
