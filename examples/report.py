"""What the examples write and print: metrics files, plots and the comparison summary.

Per run: ``metrics.csv`` and ``metrics.json`` (one row per epoch),
``iterations.csv`` and ``iterations.json`` (one row per step), ``loss.png``
(loss against epoch and against wall time) and, for curvlib optimizers,
``telemetry.png`` (the KL-clip factor ν and the damping λ of every step).
A comparison adds ``compare.png`` and ``summary.json``; a grid adds ``grid.png``
(every run, the best marked), ``grid.csv``/``grid.json`` and ``summary.json``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

Row = dict[str, float | None]
"""One epoch's metrics (``None`` where a value does not apply or is not finite)."""


@dataclass
class RunResult:
    """The outcome of one optimizer's run.

    Attributes:
        label: The run's name (its subdirectory under ``--out`` in a comparison).
        lr: Its learning rate.
        out: Its output directory.
        metrics: One dict per epoch (epoch 0: before training).
        steps: Per-step telemetry of curvlib optimizers: dicts with ``step``,
            ``kl_clip_factor`` and ``damping`` (empty for torch optimizers).
        iterations: The per-iteration log of every optimizer (``ITERATION_FIELDS``).
    """

    label: str
    lr: float
    out: Path
    metrics: list[Row] = field(default_factory=list)
    steps: list[Row] = field(default_factory=list)
    iterations: list[Row] = field(default_factory=list)

    @property
    def final(self) -> Row:
        """The last epoch's metrics."""
        return self.metrics[-1]


def finite(value: float | None) -> float | None:
    """``None`` for NaN and Inf, so that ``metrics.json`` stays valid JSON."""
    return value if value is not None and math.isfinite(value) else None


def fmt(value: float | None, spec: str) -> str:
    """``format(value, spec)``, or ``n/a`` for ``None``."""
    return "n/a" if value is None else format(value, spec)


ITERATION_FIELDS: tuple[str, ...] = ("step", "loss", "wall_time")
"""Columns of ``iterations.csv``: the global step, the batch loss before that step
and the cumulative training seconds after it (evaluations excluded, the clock of
``metrics.csv``'s ``wall_time``), as the papers plot loss against time."""


def write_metrics(
    out: Path, metrics: Sequence[Row], fields: Sequence[str], name: str = "metrics"
) -> None:
    """``{name}.csv`` (columns ``fields``, empty cells for ``None``) and ``{name}.json``."""
    with (out / f"{name}.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in metrics:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})
    (out / f"{name}.json").write_text(json.dumps(list(metrics), indent=1) + "\n")


def plot_runs(
    results: Sequence[RunResult],
    path: Path,
    title: str,
    curves: Sequence[tuple[str, str]] = (("train_loss", "-"), ("test_loss", "--")),
    ylabel: str = "loss (solid: train, dashed: test)",
    log: bool = True,
    best: RunResult | None = None,
) -> None:
    """The metrics ``curves`` (key, line style) against epoch and against wall time.

    The first curve of each run carries its label in the legend. ``best`` (one of
    ``results``) is drawn in black and thicker, with a star on its last point of
    the first curve, and its legend entry says ``(best)``.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for i, result in enumerate(results):
        marked = result is best
        color = "black" if marked else f"C{i % 10}"
        epochs = [m["epoch"] for m in result.metrics]
        times = [m["wall_time"] for m in result.metrics]
        width = 2.5 if marked else 1.5
        for j, (key, style) in enumerate(curves):
            values = [math.nan if m.get(key) is None else m[key] for m in result.metrics]
            label = (f"{result.label} (best)" if marked else result.label) if j == 0 else None
            for ax, x in ((axes[0], epochs), (axes[1], times)):
                ax.plot(
                    x, values, style, color=color, marker=".", lw=width, zorder=3 if marked else 2,
                    label=label if ax is axes[0] else None,
                )  # fmt: skip
                if marked and j == 0:
                    ax.plot(x[-1:], values[-1:], "*", color="black", ms=14, zorder=4)
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("wall time (s, without evaluations)")
    axes[0].set_ylabel(ylabel)
    for ax in axes:
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_telemetry(steps: Sequence[Row], path: Path, title: str) -> None:
    """``telemetry.png``: the KL-clip factor ν and the damping λ against the step.

    ν = 1 means the KL clip did not shorten the step; small ν means the clip
    (not the learning rate) set the step length.
    """
    fig, (ax_nu, ax_lam) = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    x = [s["step"] for s in steps]
    for ax, key, label in (
        (ax_nu, "kl_clip_factor", "KL-clip factor ν"),
        (ax_lam, "damping", "damping λ"),
    ):
        values = [math.nan if s.get(key) is None else s[key] for s in steps]
        ax.plot(x, values, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    ax_nu.set_ylim(0, 1.05)
    ax_lam.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- comparison and summary ---------------------------------------------------------


def time_to_reach(result: RunResult, target: float) -> float | None:
    """Wall time at which the train loss first reaches ``target`` (linear interpolation)."""
    prev: Row | None = None
    for row in result.metrics:
        loss, wall = row["train_loss"], row["wall_time"]
        if loss is not None and wall is not None and loss <= target:
            if prev is None or prev["train_loss"] is None or prev["wall_time"] is None:
                return float(wall)
            p_loss, p_wall = float(prev["train_loss"]), float(prev["wall_time"])
            share = (p_loss - target) / (p_loss - loss) if p_loss > loss else 1.0
            return p_wall + share * (float(wall) - p_wall)
        prev = row
    return None


def best_adam(results: Sequence[RunResult]) -> RunResult | None:
    """The Adam run with the lowest final train loss, if any."""
    adams = [r for r in results if r.label.split("-lr")[0] == "adam"]
    done = [r for r in adams if r.final["train_loss"] is not None]
    return min(done, key=lambda r: float(r.final["train_loss"] or math.inf), default=None)


def summarize(results: Sequence[RunResult]) -> str:
    """A table of final losses (and accuracies, where measured) and times.

    With Adam in the comparison, a last column gives the wall time each run needs
    to reach the final train loss of the best Adam run.
    """
    reference = best_adam(results) if len(results) > 1 else None
    target = None if reference is None else reference.final["train_loss"]
    accuracy = any(r.final.get("test_accuracy") is not None for r in results)
    head = f"{'optimizer':<18} {'lr':>8} {'train loss':>11} {'test loss':>10}"
    if accuracy:
        head += f" {'test acc':>9}"
    head += f" {'time (s)':>9}"
    if target is not None:
        head += f"  {'time to Adam final (s)':>22}"
    lines = [head, "-" * len(head)]
    for r in results:
        final = r.final
        line = (
            f"{r.label:<18} {r.lr:>8.2g} {fmt(final['train_loss'], '.5f'):>11} "
            f"{fmt(final['test_loss'], '.5f'):>10}"
        )
        if accuracy:
            line += f" {fmt(final.get('test_accuracy'), '.4f'):>9}"
        line += f" {fmt(final['wall_time'], '.1f'):>9}"
        if target is not None:
            reach = time_to_reach(r, float(target))
            line += f"  {'never' if reach is None else f'{reach:.1f}':>22}"
        lines.append(line)
    if reference is not None:
        lines.append(f"(Adam reference: {reference.label}, final train loss {target:.5f})")
    return "\n".join(lines)


def write_summary(results: Sequence[RunResult], path: Path) -> None:
    """``summary.json``: per run its label, lr, final metrics and time to Adam's loss."""
    reference = best_adam(results)
    target = None if reference is None else reference.final["train_loss"]
    rows = [
        {
            "label": r.label,
            "lr": r.lr,
            **r.final,
            "time_to_adam_final": None if target is None else time_to_reach(r, float(target)),
        }
        for r in results
    ]
    path.write_text(json.dumps(rows, indent=1) + "\n")


# -- grid search --------------------------------------------------------------------


GRID_FIELDS: tuple[str, ...] = ("label", "best", "lr", "train_loss", "test_loss", "wall_time")
"""Columns of ``grid.csv`` besides the grid's own parameters: each run's label,
whether it is the best (``1``/``0``), its learning rate, its final training and test
losses and its training seconds."""


def best_run(results: Sequence[RunResult]) -> RunResult | None:
    """The run with the lowest final training loss; ``None`` if every run ended non-finite.

    Ties go to the earlier run. A diverged run (final loss NaN or Inf, stored as
    ``None``) is never the best.
    """
    done = [r for r in results if r.final["train_loss"] is not None]
    return min(done, key=lambda r: float(r.final["train_loss"] or math.inf), default=None)


def grid_rows(
    results: Sequence[RunResult], settings: Sequence[Mapping[str, float]]
) -> list[dict[str, object]]:
    """One row per run: its grid ``settings``, then ``GRID_FIELDS``."""
    best = best_run(results)
    return [
        {
            **dict(values),
            "label": r.label,
            "best": int(r is best),
            "lr": r.lr,
            "train_loss": r.final["train_loss"],
            "test_loss": r.final["test_loss"],
            "wall_time": r.final["wall_time"],
        }
        for r, values in zip(results, settings, strict=True)
    ]


def write_grid(rows: Sequence[Mapping[str, object]], params: Sequence[str], out: Path) -> None:
    """``grid.csv`` (columns ``params`` then ``GRID_FIELDS``) and ``grid.json`` in ``out``."""
    fields = [*params, *(f for f in GRID_FIELDS if f not in params)]
    with (out / "grid.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})
    (out / "grid.json").write_text(json.dumps(list(rows), indent=1) + "\n")


def grid_table(rows: Sequence[Mapping[str, object]], params: Sequence[str]) -> str:
    """The printed grid: one line per run, the best marked with ``*``."""
    shown = [p for p in params if p != "lr"]
    head = f"  {'optimizer':<30} {'lr':>8}" + "".join(f" {p:>12}" for p in shown)
    head += f" {'train loss':>11} {'test loss':>10} {'time (s)':>9}"
    lines = [head, "-" * len(head)]
    for row in rows:
        line = f"{'*' if row['best'] else ' '} {row['label']!s:<30} {_num(row['lr'], '8.2g')}"
        line += "".join(f" {_num(row.get(p), '12.3g')}" for p in shown)
        line += f" {_num(row['train_loss'], '11.5f')} {_num(row['test_loss'], '10.5f')}"
        line += f" {_num(row['wall_time'], '9.1f')}"
        lines.append(line)
    if any(row["best"] for row in rows):
        lines.append("(* best: the lowest final training loss)")
    else:
        lines.append("(no best: every run ended with a non-finite training loss)")
    return "\n".join(lines)


def _num(value: object, spec: str) -> str:
    width = spec.split(".")[0]
    return format(value, spec) if isinstance(value, int | float) else format("n/a", f">{width}")
