"""The examples page's figures: each example's KFAC-against-Adam run, and two telemetries.

Run from the repository root (about 10 minutes on 2 CPU cores; keep the machine
otherwise idle, the figures show wall time)::

    python benchmarks/example_figures.py              # writes docs/figures/examples/
    python benchmarks/example_figures.py --only cnn   # one run

Every figure is an example script's own output, run through its command line
exactly as written in ``benchmarks/results/example_runs.md`` (which this script
writes, with the date, commit, machine and final metrics):

* ``<example>.png``: the example's ``compare.png`` of ``--compare kfac,adam``,
  loss against epochs and against wall time;
* ``telemetry.png``: the KL-clip factor ν and the damping λ of every step of the
  autoencoder at the library defaults, next to the same run with a clip 100
  times tighter, where ν sits far below 1 and the clip, not the learning rate,
  sets the step length.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import commit, machine

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "figures" / "examples"
DEFAULT_TABLE = ROOT / "benchmarks" / "results" / "example_runs.md"
COMMON = ["--threads", "2", "--no-progress", "--seed", "0"]


@dataclass(frozen=True)
class Run:
    """One example invocation whose output becomes a figure."""

    name: str
    script: str
    args: tuple[str, ...]
    figure: str = "compare.png"

    def command(self) -> list[str]:
        """The command line, as written in the run table."""
        return ["python", f"examples/{self.script}.py", *self.args, *COMMON]


RUNS = (
    Run("autoencoder", "autoencoder", ("--compare", "kfac,adam", "--num-epochs", "10")),
    Run("cnn", "cnn", ("--compare", "kfac,adam", "--num-train", "3000", "--num-epochs", "3")),
    Run("conv_autoencoder", "conv_autoencoder", ("--compare", "kfac,adam", "--num-epochs", "5")),
    Run("dcgan", "dcgan_kfac", ("--compare", "kfac,adam")),
)
TELEMETRY = (
    Run("telemetry_default", "autoencoder", ("--optim", "kfac", "--num-epochs", "5"), ""),
    Run(
        "telemetry_clipped",
        "autoencoder",
        ("--optim", "kfac", "--num-epochs", "5", "--clipping", "3e-5"),
        "",
    ),
)


def run(spec: Run, workdir: Path) -> tuple[Path, float]:
    """Run one example into ``workdir/<name>``; its output folder and wall time."""
    out = workdir / spec.name
    start = time.monotonic()
    subprocess.run(
        [sys.executable, *spec.command()[1:], "--out", str(out)],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return out, time.monotonic() - start


def final_metrics(out: Path) -> list[dict[str, Any]]:
    """The comparison's ``summary.json``, or the single run's last epoch."""
    summary = out / "summary.json"
    if summary.is_file():
        rows: list[dict[str, Any]] = json.loads(summary.read_text())
        return rows
    metrics = json.loads((out / "metrics.json").read_text())
    return [{"label": "kfac", **metrics[-1]}]


def draw_telemetry(default: Path, clipped: Path, path: Path) -> None:
    """ν and λ per step of both runs, side by side, with a shared ν axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True, constrained_layout=True)
    titles = ("library defaults (KL clip 3e-3): ν = 1 on most steps",
              "KL clip 3e-5: the clip sets every step's length")  # fmt: skip
    for ax, out, title in zip(axes, (default, clipped), titles, strict=True):
        steps = json.loads((out / "telemetry.json").read_text())
        nu = [s.get("kl_clip_factor") for s in steps]
        ax.plot(range(len(nu)), [float("nan") if v is None else v for v in nu], ".", ms=3,
                label="ν (KL-clip factor)")  # fmt: skip
        damping = [s.get("damping") for s in steps]
        ax.plot(range(len(damping)), damping, "-", label="λ (damping)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle("Autoencoder example, KFAC: telemetry.json of two runs")
    fig.savefig(path, dpi=110)
    plt.close(fig)


METRICS = (
    ("train_loss", "train loss", ".4g"),
    ("test_loss", "test loss", ".4g"),
    ("test_accuracy", "test accuracy", ".3f"),
    ("fd", "fd", ".1f"),
    ("fd_real", "fd of real images", ".2f"),
)
"""The final metrics the run table reports, where a run has them."""


def finals(rows: list[dict[str, Any]]) -> str:
    """``label: metric value, ...`` of every run of one command."""
    parts = []
    for row in rows:
        values = [f"{title} {row[key]:{spec}}" for key, title, spec in METRICS
                  if isinstance(row.get(key), int | float)]  # fmt: skip
        parts.append(f"{row['label']}: {', '.join(values)}")
    return "; ".join(parts)


def table(records: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [
        "| figure | command | wall time | final metrics |",
        "|---|---|---:|---|",
    ]
    for rec in records:
        lines.append(
            f"| `{rec['figure']}` | `{' '.join(rec['command'])}` | {rec['seconds']:.0f} s "
            f"| {finals(rec['metrics'])} |"
        )
    return "\n".join(
        [
            f"Written by `python benchmarks/example_figures.py` on {info['date'][:10]}, "
            f"commit `{info['commit']}`, {info['cpu']} ({info['cpu_count']} logical CPUs, "
            f"load {info['load_average']} at the end), torch {info['torch']}, "
            f"Python {info['python']}.",
            "",
            *lines,
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE, help="the run table")
    names = [r.name for r in RUNS] + ["telemetry"]
    parser.add_argument("--only", default="", help=f"comma-separated of: {', '.join(names)}")
    args = parser.parse_args(argv)
    only = set(filter(None, args.only.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for spec in RUNS:
            if only and spec.name not in only:
                continue
            out, seconds = run(spec, work)
            shutil.copyfile(out / spec.figure, args.out / f"{spec.name}.png")
            records.append({"figure": f"{spec.name}.png", "command": spec.command(),
                            "seconds": seconds, "metrics": final_metrics(out)})  # fmt: skip
            print(f"{spec.name}: {seconds:.0f} s", flush=True)
        if not only or "telemetry" in only:
            outs = []
            for spec in TELEMETRY:
                out, seconds = run(spec, work)
                outs.append(out)
                records.append({"figure": "telemetry.png", "command": spec.command(),
                                "seconds": seconds, "metrics": final_metrics(out)})  # fmt: skip
            draw_telemetry(outs[0], outs[1], args.out / "telemetry.png")
            print("telemetry: done", flush=True)
    info = {**machine(), "commit": commit()}
    args.table.write_text(table(records, info))
    print(f"wrote {args.out} and {args.table}")


if __name__ == "__main__":
    main()
