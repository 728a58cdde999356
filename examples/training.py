"""The training loop shared by curvlib's example scripts, with checkpoints and telemetry.

``run_experiment`` trains ``--optim`` (or every ``--compare`` entry) on a
``Task`` and writes, after every epoch, ``metrics.csv``/``metrics.json``,
the per-iteration log ``iterations.csv``/``iterations.json`` (batch loss and
cumulative training time at every step), ``loss.png``, ``checkpoint.pt`` and,
for curvlib optimizers, ``telemetry.png`` and ``telemetry.json`` (ν and λ of
every step). ``--resume`` continues from the checkpoint with the whole history.
``--compare`` and ``--grid`` put each run in a subdirectory of ``--out``; a grid
adds ``grid.csv``/``grid.json`` and ``grid.png`` with the best run marked.
``Telemetry`` and the checkpoint helpers are reused by scripts with their own
loop (the DCGAN). Under ``torchrun`` the runs train data-parallel and rank 0
alone writes the outputs (``examples/torchrun.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from cli import RunSpec, UsageError, optim_config, resolve_device, runs_of, several_runs
from optimizers import OPTIMIZERS, build_optimizer
from report import (
    ITERATION_FIELDS,
    Row,
    RunResult,
    best_run,
    finite,
    fmt,
    grid_rows,
    grid_table,
    plot_runs,
    plot_telemetry,
    summarize,
    write_grid,
    write_metrics,
    write_summary,
)
from torch import Tensor, nn
from torchrun import SINGLE, World, process_group
from tqdm import tqdm

CHECKPOINT = "checkpoint.pt"
TIMINGS = ("time_statistics", "time_update", "time_inverse", "time_precondition", "time_step")
TELEMETRY_FIELDS: tuple[str, ...] = (
    "kl_clip_factor",
    "kl_clip_factor_last",
    "damping",
    "damping_last",
    "lm_ratio",
    *TIMINGS,
    "inverse_failures",
    "skipped_steps",
)
"""Per-epoch summary of ``optimizer.last_stats`` (``None`` for torch optimizers):
the mean and the last value of the clip factor ν and of the damping λ over the
epoch's steps, the last Levenberg–Marquardt ratio, the seconds spent in each phase
of ``step()`` (``time_step`` is all of it; the statistics are computed in
``record()``), and the cumulative counts of failed inverses and skipped steps."""

METRIC_FIELDS: tuple[str, ...] = (
    "epoch",
    "steps",
    "train_loss",
    "test_loss",
    "train_accuracy",
    "test_accuracy",
    "train_loss_running",
    "wall_time",
    "epoch_time",
    *TELEMETRY_FIELDS,
)
"""Columns of ``metrics.csv``: losses at the end of each epoch (``train_loss`` on the
training set, or its first ``Task.train_eval`` examples; ``train_loss_running`` the
mean over the epoch's batches), accuracies for classifiers, cumulative training
seconds without evaluations (``wall_time``) and ``TELEMETRY_FIELDS``."""


class Telemetry:
    """Collects ``optimizer.last_stats`` after every step of a curvlib optimizer.

    ``observe`` after each ``step()``; ``epoch_summary`` at the end of an epoch
    gives the ``TELEMETRY_FIELDS`` row and starts the next epoch. ``steps`` keeps
    ν and λ of every step (saved in checkpoints, plotted by ``plot_telemetry``).
    torch optimizers have no ``last_stats``: every field is then ``None``.

    Args:
        steps: The per-step history of a resumed run.
    """

    def __init__(self, steps: list[Row] | None = None) -> None:
        self.steps: list[Row] = [] if steps is None else steps
        self._epoch: list[dict[str, Any]] = []

    def observe(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Record the stats of the step just taken (global step number ``step``)."""
        stats = getattr(optimizer, "last_stats", None)
        if not stats:
            return
        self._epoch.append(dict(stats))
        if not stats.get("skipped", False):
            self.steps.append(
                {
                    "step": step,
                    "kl_clip_factor": _float(stats.get("kl_clip_factor")),
                    "damping": _float(stats.get("damping")),
                }
            )

    def epoch_summary(self, optimizer: torch.optim.Optimizer) -> Row:
        """The epoch's ``TELEMETRY_FIELDS`` row; resets the epoch."""
        taken = [s for s in self._epoch if not s.get("skipped", False)]
        self._epoch = []
        row: Row = dict.fromkeys(TELEMETRY_FIELDS)
        if not hasattr(optimizer, "last_stats"):
            return row
        for key in ("kl_clip_factor", "damping"):
            values = [v for v in (_float(s.get(key)) for s in taken) if v is not None]
            row[key] = sum(values) / len(values) if values else None
            row[f"{key}_last"] = values[-1] if values else None
        ratios = [v for v in (_float(s.get("lm_ratio")) for s in taken) if v is not None]
        row["lm_ratio"] = ratios[-1] if ratios else None
        for key in TIMINGS:
            row[key] = sum(float(s.get(key) or 0.0) for s in taken)
        failures = [s.get("inverse_failures") for s in taken]
        row["inverse_failures"] = _float(failures[-1]) if failures else None
        row["skipped_steps"] = _float(getattr(optimizer, "skipped_steps", None))
        return row


def _float(value: Any) -> float | None:
    return None if value is None else finite(float(value))


@dataclass
class EarlyStopping:
    """``--patience``: stop after ``patience`` epochs without a new best ``metric``.

    An epoch improves when its ``metric`` is finite and strictly below the best so
    far (the first finite value always does); any other epoch, NaN included,
    counts towards ``patience``. The K-FAC code of the KPSVD papers stops the same
    way with patience 10 on the training loss.

    Attributes:
        patience: Epochs without improvement that stop the run.
        metric: The ``metrics.csv`` column watched (``test_loss`` or ``train_loss``).
        best: The best value so far.
        waited: Epochs since the last improvement.
    """

    patience: int
    metric: str = "test_loss"
    best: float = math.inf
    waited: int = 0

    def observe(self, row: Row) -> None:
        """Take the end-of-epoch ``row`` of ``metrics.csv`` into account."""
        value = row.get(self.metric)
        if value is not None and math.isfinite(value) and value < self.best:
            self.best, self.waited = float(value), 0
        else:
            self.waited += 1

    @property
    def stop(self) -> bool:
        """Whether ``patience`` epochs in a row brought no improvement."""
        return self.waited >= self.patience

    @classmethod
    def replay(cls, patience: int, metric: str, rows: Sequence[Row]) -> EarlyStopping:
        """The state after the epochs of ``rows`` (a resumed run's history; epoch 0 skipped)."""
        stopper = cls(patience, metric)
        for row in rows:
            if row.get("epoch"):
                stopper.observe(row)
        return stopper


@dataclass
class Task:
    """What to train: a model factory, a loss and tensors on the target device.

    Attributes:
        make_model: Returns a freshly initialised model (called after seeding).
        loss_fn: The loss module (``mean`` reduction).
        train_x: Training inputs.
        train_y: Training targets (the inputs themselves for an autoencoder).
        test_x: Test inputs.
        test_y: Test targets.
        eval_batch: Batch size of the loss evaluations.
        accuracy: Also report the accuracy (argmax of the logits against integer labels).
        train_eval: Evaluate the training metrics on the first ``train_eval``
            examples only (``None``: all of them).
    """

    make_model: Callable[[], nn.Module]
    loss_fn: nn.Module
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    eval_batch: int = 5_000
    accuracy: bool = False
    train_eval: int | None = None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    batch: int,
    accuracy: bool = False,
    world: World = SINGLE,
) -> tuple[float, float | None]:
    """Mean loss over ``(x, y)`` (``mean`` reduction weighted by batch size), and accuracy.

    With several ranks each evaluates its part of ``(x, y)`` and the sums are
    all-reduced: every rank returns the same values.

    Returns:
        ``(loss, accuracy)``; the accuracy is ``None`` unless asked for.
    """
    if len(x) == 0:
        return math.nan, None
    n = len(x)
    x, y = world.shard(x), world.shard(y)
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    for i in range(0, len(x), batch):
        out = model(x[i : i + batch])
        total += float(loss_fn(out, y[i : i + batch])) * len(out)
        if accuracy:
            correct += int((out.argmax(1) == y[i : i + batch]).sum())
    model.train(was_training)
    total, summed = world.sum([total, correct])
    return total / n, (summed / n if accuracy else None)


def mean(values: Sequence[float]) -> float | None:
    """Mean of the finite values, ``None`` without any."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


def rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Torch's global RNG, the data-order generator and (on CUDA) the device RNG."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    """Restore what ``rng_state`` saved."""
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically, so that a process killed while saving keeps the previous checkpoint.

    The payload goes to ``<name>.tmp`` in the same directory, is flushed to the
    disk (``fsync``) and only then renamed over ``path`` (``os.replace``, atomic
    on POSIX and Windows); the directory entry is flushed too. A save that fails
    removes its temporary file; one killed outright leaves it, and the next save
    overwrites it.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Flush a rename to the disk (POSIX; other systems cannot open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: Path, optimizer_name: str) -> dict[str, Any]:
    """Load ``path`` (tensors and plain values only).

    Raises:
        UsageError: If it holds a run of another optimizer.
    """
    ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt["optimizer_name"] != optimizer_name:
        raise UsageError(
            f"--resume: {path} holds a run of {ckpt['optimizer_name']!r}, not "
            f"{optimizer_name!r}; use another --out."
        )
    return ckpt


def write_telemetry(out: Path, steps: Sequence[Row], title: str) -> None:
    """``telemetry.json`` (ν and λ per step) and ``telemetry.png``; nothing without steps."""
    if not steps:
        return
    (out / "telemetry.json").write_text(json.dumps(list(steps)) + "\n")
    plot_telemetry(steps, out / "telemetry.png", title)


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """A shuffled epoch; the last partial batch is dropped when a full one exists."""
    perm = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if n >= batch_size else n
    return [perm[i : i + batch_size] for i in range(0, stop, batch_size)]


def progress_bar(
    args: argparse.Namespace, label: str, total: int, initial: int, show: bool = True
) -> tqdm:
    """The progress bar of a run (on stderr; ``--no-progress`` or ``show=False`` disable it)."""
    return tqdm(
        total=total,
        initial=min(initial, total),
        desc=label,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5,
        disable=args.no_progress or not show,
        file=sys.stderr,
    )


@contextlib.contextmanager
def nothing() -> Iterator[None]:
    """The ``record()`` of torch optimizers: no curvature pass."""
    yield


def step_optimizer(
    optimizer: torch.optim.Optimizer,
    loss_of_batch: Callable[[], Tensor],
    closure: Callable[[], Tensor] | None = None,
) -> float:
    """One step: forward and backward inside ``record()``, then ``step()``.

    The Levenberg–Marquardt closure (the batch loss, no backward) is passed on the
    steps where the damping adapts.

    Args:
        optimizer: Any torch optimizer; curvlib's record the curvature.
        loss_of_batch: The batch loss, to backpropagate.
        closure: The batch loss for the closure, without a backward (default:
            ``loss_of_batch``; the unwrapped model under DDP, whose forward
            would otherwise wait for a backward).

    Returns:
        The batch loss before the step.
    """
    optimizer.zero_grad()
    with getattr(optimizer, "record", nothing)():
        loss = loss_of_batch()
        loss.backward()
    if getattr(optimizer, "lm_due", False):
        again = loss_of_batch if closure is None else closure
        optimizer.step(lambda: float(again()))
    else:
        optimizer.step()
    return float(loss.detach())


def train_one(
    task: Task,
    spec: RunSpec,
    args: argparse.Namespace,
    out: Path,
    device: torch.device,
    title: str,
    world: World = SINGLE,
) -> RunResult:
    """Train one optimizer, writing metrics, plots and checkpoint to ``out`` every epoch.

    With several ranks (``world``), each trains on its part of every batch of a
    ``DistributedDataParallel`` model, the losses are averaged over the ranks,
    and rank 0 alone writes the outputs and shows the progress bar.

    Raises:
        UsageError: If ``--resume`` finds a checkpoint of another optimizer, or
            the optimizer refuses the options (e.g. ``--overlap-inverse`` with
            EKFAC, ``--split-inverses inverses`` with the diagonal).
    """
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
    config = optim_config(args, spec)
    torch.manual_seed(args.seed)
    model = task.make_model().to(device)
    trained = world.wrap(model)  # the model itself on one rank
    try:
        optimizer = build_optimizer(spec.name, trained, task.loss_fn, config)
    except ValueError as err:  # curvlib refuses this combination of options, saying why
        raise UsageError(f"--optim {spec.name}: {err}") from err
    generator = torch.Generator().manual_seed(args.seed)
    result = RunResult(spec.label, config.lr, out)
    ckpt_path = out / CHECKPOINT
    if args.resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path, spec.name)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"], generator, device)
        result.metrics = list(ckpt["metrics"])
        result.steps = list(ckpt.get("steps", []))
        result.iterations = list(ckpt.get("iterations", []))
        world.log(f"[{spec.label}] resuming after epoch {ckpt['epoch']} from {ckpt_path}")
    elif args.resume:
        world.log(f"[{spec.label}] --resume: no checkpoint in {out}, starting from scratch")
    loss_fn = task.loss_fn
    n_eval = len(task.train_x) if task.train_eval is None else task.train_eval

    def evaluate_both() -> Row:
        world.share_buffers(model)
        train = evaluate(
            model, loss_fn, task.train_x[:n_eval], task.train_y[:n_eval], task.eval_batch,
            task.accuracy, world,
        )  # fmt: skip
        test = evaluate(
            model, loss_fn, task.test_x, task.test_y, task.eval_batch, task.accuracy, world
        )
        return {
            "train_loss": finite(train[0]),
            "test_loss": finite(test[0]),
            "train_accuracy": train[1],
            "test_accuracy": test[1],
        }

    if not result.metrics:
        result.metrics.append(
            {**dict.fromkeys(METRIC_FIELDS), "epoch": 0, "steps": 0, "wall_time": 0.0}
            | evaluate_both()
        )
    start_epoch = int(result.final["epoch"] or 0)
    steps = int(result.final["steps"] or 0)
    wall = float(result.final["wall_time"] or 0.0)
    n = len(task.train_x)
    per_epoch = len(batches(n, args.batch_size, torch.Generator()))
    telemetry = Telemetry(result.steps)
    patience = getattr(args, "patience", None)
    stopper = None
    if patience is not None:
        stopper = EarlyStopping.replay(patience, args.patience_metric, result.metrics)
    bar = progress_bar(args, spec.label, per_epoch * args.num_epochs, steps, show=world.main)
    model.train()
    for epoch in range(start_epoch + 1, args.num_epochs + 1):
        if stopper is not None and stopper.stop:
            world.log(
                f"[{spec.label}] early stop after epoch {epoch - 1}: no new best "
                f"{stopper.metric} in {stopper.patience} epochs (best {stopper.best:.5g})"
            )
            break
        epoch_start = time.perf_counter()
        losses: list[float] = []
        for idx in batches(n, args.batch_size, generator):
            mine = world.shard(idx)  # every rank draws the same batch, and takes its part
            x, y = task.train_x[mine], task.train_y[mine]
            loss = step_optimizer(
                optimizer,
                lambda x=x, y=y: loss_fn(trained(x), y),
                lambda x=x, y=y: loss_fn(model(x), y),
            )
            losses.append(world.mean(loss))
            result.iterations.append(
                {
                    "step": steps + len(losses),
                    "loss": finite(losses[-1]),
                    "wall_time": wall + time.perf_counter() - epoch_start,
                }
            )
            telemetry.observe(optimizer, steps + len(losses))
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}", refresh=False)
        elapsed = time.perf_counter() - epoch_start
        wall += elapsed
        steps += len(losses)
        row: Row = {
            "epoch": epoch,
            "steps": steps,
            **evaluate_both(),
            "train_loss_running": mean(losses),
            "wall_time": wall,
            "epoch_time": elapsed,
            **telemetry.epoch_summary(optimizer),
        }
        row = {k: finite(v) for k, v in row.items()}
        result.metrics.append(row)
        if stopper is not None:
            stopper.observe(row)
        world.log(f"[{spec.label}] epoch {epoch:3d}  {_epoch_line(row, wall)}")
        if world.main:
            save_checkpoint(
                ckpt_path,
                {
                    "epoch": epoch,
                    "optimizer_name": spec.name,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "metrics": result.metrics,
                    "steps": result.steps,
                    "iterations": result.iterations,
                    "rng": rng_state(generator, device),
                    "config": asdict(config),
                },
            )
            _write_run(result, title)
    bar.close()
    if world.main:
        _write_run(result, title)
    return result


def _epoch_line(row: Row, wall: float) -> str:
    text = f"train {fmt(row['train_loss'], '.5f')}  test {fmt(row['test_loss'], '.5f')}"
    if row.get("test_accuracy") is not None:
        text += f"  test acc {fmt(row['test_accuracy'], '.4f')}"
    text += f"  time {wall:7.1f}s"
    if row["kl_clip_factor"] is not None and row["damping"] is not None:
        text += f"  ν {row['kl_clip_factor']:.3f}  λ {row['damping']:.2e}"
    return text


def _write_run(result: RunResult, title: str) -> None:
    write_metrics(result.out, result.metrics, METRIC_FIELDS)
    write_metrics(result.out, result.iterations, ITERATION_FIELDS, name="iterations")
    plot_runs([result], result.out / "loss.png", f"{title}: {result.label}")
    write_telemetry(result.out, result.steps, f"{title}: {result.label}")


def run_experiment(task: Task, args: argparse.Namespace, title: str) -> list[RunResult]:
    """Run ``--optim`` (or every ``--compare`` entry or ``--grid`` point), write outputs, print.

    ``--grid``: also ``grid.csv``/``grid.json`` (the table of all runs),
    ``grid.png`` (every run's loss against epochs and against time, the best
    run, that of the lowest final training loss, marked) and the table printed.
    Under ``torchrun`` the runs train data-parallel in a process group that
    lives for this call, and rank 0 alone writes and prints
    (``examples/torchrun.py``); every rank returns the same results.

    Raises:
        UsageError: If a batch does not split into equal parts over the ranks.
    """
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with process_group(device) as world:
        check_shards(min(args.batch_size, len(task.train_x)), world)
        out: Path = args.out
        if world.main:
            out.mkdir(parents=True, exist_ok=True)
        specs = runs_of(args)
        apart = several_runs(args)
        results = [
            train_one(task, spec, args, out / spec.label if apart else out, device, title, world)
            for spec in specs
        ]
    if world.main:
        report_experiment(results, specs, task, args, title, device, world)
    return results


def check_shards(batch: int, world: World) -> None:
    """Refuse a batch whose parts over the ranks would differ in size.

    DDP averages the ranks' gradients with equal weights: that is the gradient
    of the whole batch only if every rank's part has as many samples.

    Raises:
        UsageError: Naming batch sizes that would split evenly.
    """
    if batch % world.size:
        low = batch - batch % world.size
        raise UsageError(
            f"--batch-size {batch} does not split into {world.size} equal parts, one per rank "
            f"(DDP averages the ranks' gradients with equal weights): use a multiple of "
            f"{world.size}, e.g. {low or world.size} or {low + world.size}."
        )


def report_experiment(
    results: Sequence[RunResult],
    specs: Sequence[RunSpec],
    task: Task,
    args: argparse.Namespace,
    title: str,
    device: torch.device,
    world: World = SINGLE,
) -> None:
    """The outputs of all runs together (grid, comparison plots, ``summary.json``), printed."""
    out: Path = args.out
    grid = getattr(args, "grid", None)
    names = [axis.name for axis in grid or ()]
    rows = write_grid_outputs(results, specs, names, out, title) if grid else []
    if args.compare is not None:
        plot_runs(results, out / "compare.png", title)
        if task.accuracy:
            plot_runs(
                results, out / "compare_accuracy.png", title,
                (("train_accuracy", "-"), ("test_accuracy", "--")),
                "accuracy (solid: train, dashed: test)", log=False,
            )  # fmt: skip
    write_summary(results, out / "summary.json")
    epochs = f"{args.num_epochs} epoch{'s' if args.num_epochs != 1 else ''}"
    ranks = f", {world.size} ranks" if world.size > 1 else ""
    split = getattr(args, "split_inverses", None)
    if ranks and split is not None:
        ranks += f", curvature work split (owners send {split})"
    print(f"\n{title} on {device.type}{ranks}: {epochs}, batch {args.batch_size}")
    if grid:
        print(f"grid of {specs[0].name}: {len(results)} runs")
        print(grid_table(rows, names))
    else:
        print(summarize(results))
    print(f"outputs in {out}/")


def write_grid_outputs(
    results: Sequence[RunResult],
    specs: Sequence[RunSpec],
    names: Sequence[str],
    out: Path,
    title: str,
) -> list[dict[str, object]]:
    """``grid.csv``, ``grid.json`` and ``grid.png`` of a ``--grid`` search in ``out``.

    Args:
        results: The runs, in the order of ``specs``.
        specs: Their grid points.
        names: The grid's parameters (``GRID_PARAMETERS`` keys), in command-line order.
        out: The search's ``--out``.
        title: The plot's title.

    Returns:
        The rows of ``grid.csv``.
    """
    settings = [{"lr": r.lr, **dict(s.settings)} for r, s in zip(results, specs, strict=True)]
    rows = grid_rows(results, settings)
    write_grid(rows, names, out)
    best = best_run(results)
    mark = (
        "best (★): none finished"
        if best is None
        else f"best (★, lowest final train loss): {best.label}"
    )
    plot_runs(results, out / "grid.png", f"{title}: grid of {specs[0].name}; {mark}", best=best)
    return rows


__all__ = [
    "CHECKPOINT",
    "METRIC_FIELDS",
    "OPTIMIZERS",
    "TELEMETRY_FIELDS",
    "TIMINGS",
    "EarlyStopping",
    "Task",
    "Telemetry",
    "batches",
    "check_shards",
    "evaluate",
    "load_checkpoint",
    "mean",
    "progress_bar",
    "report_experiment",
    "rng_state",
    "run_experiment",
    "save_checkpoint",
    "set_rng_state",
    "step_optimizer",
    "train_one",
    "write_grid_outputs",
    "write_telemetry",
]
