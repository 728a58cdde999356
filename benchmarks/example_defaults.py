"""Every example at the library defaults, on every data set it reads offline: does any fail?

The examples take the library defaults of the optimizer they are given unless a
flag overrides them, so a default that diverges on one of their data sets is a
default that fails a user. This sweep runs each example with KFAC, EKFAC and
KPSVD at those defaults (and Adam at the example's learning rate, for scale) on
every data set that needs no download, for several seeds, and says of each run:

* ``diverged``: a metric became NaN/Inf, or the training loss ended above where
  it started (a GAN's losses are a game's, not a descent's: there only NaN/Inf);
* ``stalled``: a classifier ended at a test accuracy below ``STALLED_ACCURACY``
  (chance is 0.1), the dead network a too long step leaves behind;
* ``trained`` otherwise;
* ``refused``: the example refused the combination before training, with a
  message (EKFAC and KPSVD need per-sample statistics, which the DCGAN
  generator's BatchNorm does not have);
* ``failed``: the example raised.

The data sets: the generated ones (CURVES, the synthetic images, the synthetic
FACES stand-in) and scikit-learn's 1,797 real digits written as MNIST's files
(``examples/digits_as_mnist.py``) for every ``--data mnist``. Each run is an
example's own command line (``Case.command``), shortened to a few dozen steps
(divergence shows early), on one thread, two runs at a time.

Run from the repository root (about an hour on 2 CPU cores)::

    python benchmarks/example_defaults.py      # writes benchmarks/results/example_defaults.*
    python benchmarks/example_defaults.py --only cnn --seeds 0,1 --optims kfac
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import command, commit, cpu_line, machine, progress, write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DIGITS = "{digits}"
"""Stands for the folder the digits are written to, in ``Case.args``."""
DIGITS_SHOWN = "DIGITS"
"""That folder in the recorded commands (a temporary folder while the sweep runs)."""

STALLED_ACCURACY = 0.2
"""A classifier below this test accuracy (chance: 0.1) counts as stalled."""


@dataclass(frozen=True)
class Case:
    """One example on one data set.

    Attributes:
        script: The example (``examples/<script>.py``).
        data: The ``--data`` value.
        args: The rest of its command line (sizes; ``DIGITS`` for the digits' folder).
        metric: What the verdict and the table read: ``train_loss``,
            ``test_accuracy`` (a classifier; its ``train_loss`` is checked too) or
            ``fd`` (a GAN's Fréchet distance).
        network: Flags that choose another network than the example's default
            (part of the case's name).
    """

    script: str
    data: str
    args: tuple[str, ...]
    metric: str = "train_loss"
    network: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The example, its data set and network flags, as the table names them."""
        return " ".join((self.script, "--data", self.data, *self.network))

    def command(self, optim: str, seed: int, out: Path, digits: Path) -> list[str]:
        """The example's command line for one run."""
        args = [str(digits) if a == DIGITS else a for a in self.args]
        return [
            "python", f"examples/{self.script}.py", "--data", self.data, *self.network, *args,
            "--optim", optim,
            "--seed", str(seed), "--threads", "1", "--no-progress", "--out", str(out),
        ]  # fmt: skip


MNIST = ("--data-root", DIGITS)
RELU = ("--activation", "relu")
"""The deep autoencoder of real images as the convergence benchmark trains it: ReLU units
(the code layer stays linear)."""
CASES = (
    Case("autoencoder", "curves", ("--num-train", "5000", "--num-epochs", "5")),
    Case("autoencoder", "mnist", (*MNIST, "--num-epochs", "20")),
    Case("autoencoder", "mnist", (*MNIST, "--num-epochs", "20"), network=RELU),
    Case("autoencoder", "faces-synthetic", ("--num-train", "2000", "--num-epochs", "6")),
    Case("cnn", "synthetic", ("--num-train", "3000", "--num-epochs", "3"), "test_accuracy"),
    Case("cnn", "mnist", (*MNIST, "--num-epochs", "5"), "test_accuracy"),
    Case("conv_autoencoder", "synthetic", ("--num-train", "2500", "--num-epochs", "4")),
    Case("conv_autoencoder", "curves", ("--num-train", "2500", "--num-epochs", "4")),
    Case("conv_autoencoder", "mnist", (*MNIST, "--num-epochs", "7")),
    Case("dcgan_kfac", "synthetic", ("--num-train", "1000", "--num-epochs", "3"), "fd"),
    Case("dcgan_kfac", "curves", ("--num-train", "1000", "--num-epochs", "3"), "fd"),
    Case("dcgan_kfac", "mnist", (*MNIST, "--num-epochs", "2"), "fd"),
)
OPTIMS = ("kfac", "ekfac", "kpsvd", "adam")
BASELINES = frozenset({"adam", "sgd"})
"""torch's optimizers in the examples, at their fixed learning rates: for scale, not judged."""


def verdict(case: Case, first: dict[str, Any], last: dict[str, Any]) -> str:
    """``diverged``, ``stalled`` or ``trained`` from a run's first and last epoch's metrics."""
    loss = "fd" if case.metric == "fd" else "train_loss"
    values = [first.get(loss), last.get(loss), last.get(case.metric)]
    if any(v is None or not math.isfinite(v) for v in values):
        return "diverged"  # metrics.json writes NaN and Inf as null
    if case.metric != "fd" and last[loss] > first[loss]:
        return "diverged"
    if case.metric == "test_accuracy" and last[case.metric] < STALLED_ACCURACY:
        return "stalled"
    return "trained"


def run_one(case: Case, optim: str, seed: int, work: Path, digits: Path) -> dict[str, Any]:
    """One example run; its verdict and first and last metrics."""
    out = work / f"{case.script}-{case.data}-{'-'.join(case.network)}-{optim}-{seed}"
    cmd = case.command(optim, seed, out, digits)
    start = time.monotonic()
    done = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, capture_output=True, text=True)
    seconds = time.monotonic() - start
    shown = case.command(optim, seed, out, Path(DIGITS_SHOWN))[:-2]  # without the temporary --out
    record: dict[str, Any] = {
        "case": case.name, "optim": optim, "seed": seed, "seconds": round(seconds, 1),
        "command": " ".join(shown),
    }  # fmt: skip
    metrics_file = out / "metrics.json"
    if done.returncode == 2:  # the example refused the options before training, saying why
        return {**record, "verdict": "refused", "error": done.stderr.strip().splitlines()[-1]}
    if done.returncode != 0 or not metrics_file.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {**record, "verdict": "failed", "error": " | ".join(tail)}
    metrics = json.loads(metrics_file.read_text())
    first, last = metrics[0], metrics[-1]
    keys = ("train_loss", "test_accuracy", "fd")
    return {
        **record,
        "verdict": verdict(case, first, last),
        "steps": last.get("steps"),
        "first": {k: first.get(k) for k in keys if k in first},
        "last": {k: last.get(k) for k in keys if k in last},
    }


def write_digits(folder: Path) -> None:
    subprocess.run(
        [sys.executable, "examples/digits_as_mnist.py", str(folder)],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def sweep(
    cases: Sequence[Case], optims: Sequence[str], seeds: Sequence[int], jobs: int, bar: bool
) -> list[dict[str, Any]]:
    """Every (case, optimizer, seed), ``jobs`` at a time; records in that order."""
    grid = [(c, o, s) for c in cases for o in optims for s in seeds]
    with tempfile.TemporaryDirectory(prefix="curvlib-example-defaults-") as tmp:
        work = Path(tmp)
        digits = work / "digits"
        write_digits(digits)
        with ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(run_one, c, o, s, work, digits) for c, o, s in grid]
            results = [f.result() for f in progress(futures, len(futures), "runs", bar)]
    return results


def _value(record: dict[str, Any], metric: str) -> float | None:
    value = record.get("last", {}).get(metric)
    return value if isinstance(value, float | int) and math.isfinite(value) else None


def table(records: Iterable[dict[str, Any]], cases: Sequence[Case], optims: Sequence[str]) -> str:
    """One row per case: per optimizer the median final metric and any run that did not train."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault((r["case"], r["optim"]), []).append(r)
    head = "| example and data | metric | " + " | ".join(optims) + " |"
    lines = [head, "|" + "---|" * (len(optims) + 2)]
    for case in cases:
        cells = []
        for optim in optims:
            runs = by.get((case.name, optim), [])
            if not runs:
                cells.append("—")
                continue
            if all(r["verdict"] == "refused" for r in runs):
                cells.append("refused")
                continue
            values = [v for v in (_value(r, case.metric) for r in runs) if v is not None]
            median = f"{statistics.median(values):.4g}" if values else "—"
            bad = [f"seed {r['seed']} {r['verdict']}" for r in runs if r["verdict"] != "trained"]
            cells.append(median + (f" ({', '.join(bad)})" if bad else ""))
        lines.append(
            f"| `{case.name}` | {case.metric.replace('_', ' ')} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def report(records: list[dict[str, Any]], info: dict[str, Any], cases: Sequence[Case],
           optims: Sequence[str], seeds: Sequence[int], cmd: str) -> str:  # fmt: skip
    judged = [r for r in records if r["optim"] not in BASELINES]
    refused = [r for r in judged if r["verdict"] == "refused"]
    failed = [r for r in judged if r["verdict"] not in ("trained", "refused")]
    counts = (
        f"{len(judged) - len(failed) - len(refused)} of {len(judged)} runs of curvlib's "
        f"optimizers trained, {len(refused)} were refused before training with a message"
    )
    lines = [
        f"Written by `{cmd}` on {info['date'][:10]}, commit `{info['commit']}`, "
        f"{cpu_line(info)}, torch {info['torch']}; seeds {', '.join(map(str, seeds))}, "
        f"one thread per run. {counts}.",
        "",
        "Median over the seeds of the last epoch's metric (train loss, test accuracy, or the "
        "GAN's Fréchet distance, lower is better but for accuracy), and the runs that did not "
        "train (`diverged`: NaN/Inf or a loss above its start; `stalled`: test accuracy below "
        f"{STALLED_ACCURACY}). torch's optimizers run at the examples' fixed learning rates "
        "(Adam 1e-3), untuned: they give the scale, and the count leaves them out.",
        "",
        table(records, cases, optims),
    ]
    messages = sorted({f"`{r['case']} --optim {r['optim']}`: {r['error']}" for r in refused})
    if messages:
        lines += ["", "Refused before training:", "", *(f"- {m}" for m in messages)]
    if failed:
        lines += ["", "Runs of curvlib's optimizers that did not train:", ""]
        lines += [f"- `{r['command']}`: {r['verdict']}" + (f" ({r['error']})" if "error" in r
                  else f", {r['first']} → {r['last']}") for r in failed]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", nargs="*", default=None, help="examples (script names) or cases (as named) to run"
    )
    parser.add_argument("--optims", default=",".join(OPTIMS), help="comma-separated --optim values")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the json and md")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--render", action="store_true",
        help="rewrite the markdown from the JSON in --out without running anything",
    )  # fmt: skip
    args = parser.parse_args(argv)
    cases = [c for c in CASES if args.only is None or {c.script, c.name} & set(args.only)]
    if not cases:
        parser.error(f"--only names no example of {sorted({c.script for c in CASES})}")
    optims = args.optims.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.render:
        stored = json.loads((args.out / "example_defaults.json").read_text())
        runs = stored["runs"]
        cases = [c for c in CASES if any(r["case"] == c.name for r in runs)]
        optims = list(dict.fromkeys(r["optim"] for r in runs))
        text = report(runs, stored["machine"], cases, optims, stored["seeds"], stored["command"])
        (args.out / "example_defaults.md").write_text(text)
        print(text)
        return 0
    records = sweep(cases, optims, seeds, args.jobs, not args.no_progress)
    info = {**machine(), "commit": commit()}
    cmd = command(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "example_defaults.json",
               {"command": cmd, "machine": info, "seeds": seeds, "runs": records})  # fmt: skip
    text = report(records, info, cases, optims, seeds, cmd)
    (args.out / "example_defaults.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
