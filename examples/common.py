"""Shared command line, optimizer registry and training loop of curvlib's example scripts.

Every example builds its parser with ``build_parser``
(the flags below are defined here and only here), turns the ``--optim`` string
into an optimizer through ``OPTIMIZERS`` (one dict
from name to factory) and trains with ``run_experiment``,
which writes per-epoch metrics (``metrics.csv``, ``metrics.json``), a loss plot
(``loss.png``) and a checkpoint (``checkpoint.pt``) to ``--out`` after every
epoch; ``--resume`` continues from that checkpoint and ``--compare`` runs
several optimizers on the same data and seed (one subdirectory each, a combined
``compare.png`` and a printed summary table).

Common flags: ``--optim --lr --damping --adaptive-damping --clipping --momentum
--weight-decay --fisher --stats-fraction --t-cov --t-inv --compare --batch-size
--num-epochs --num-train --num-test --data-root --device --threads --seed --out
--resume --no-progress``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn
from tqdm import tqdm

from curvlib.core.protocols import CurvatureApprox
from curvlib.optim.hyper import LevenbergMarquardt


class UsageError(ValueError):
    """A bad combination of flags or files, reported as a one-line error (no traceback)."""


# -- argument types ---------------------------------------------------------------


def positive_float(text: str) -> float:
    """``argparse`` type: a finite float > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """``argparse`` type: a finite float >= 0."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def momentum_float(text: str) -> float:
    """``argparse`` type: a float in [0, 1)."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text!r}")
    return value


def fraction(text: str) -> float:
    """``argparse`` type: a float in (0, 1]."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text!r}")
    return value


def positive_int(text: str) -> int:
    """``argparse`` type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


# -- the optimizer registry -------------------------------------------------------


@dataclass(frozen=True)
class OptimConfig:
    r"""Hyper-parameters of one run, as parsed from the command line.

    Attributes:
        lr: Learning rate.
        damping: Tikhonov damping $\lambda$ of $(C + \lambda I)^{-1}$.
        adaptive_damping: Adapt $\lambda$ by the Levenberg-Marquardt rule.
        clipping: KL-clipping bound; 0 disables clipping.
        momentum: Momentum (curvature optimizers and SGD; Adam keeps its betas).
        weight_decay: L2 weight decay.
        fisher: ``mc``, ``empirical`` or ``exact``.
        stats_fraction: Fraction of each batch used by the statistics.
        t_cov: Steps between statistics updates.
        t_inv: Steps between inverse rebuilds.
        seed: Seed of MC sampling.
    """

    lr: float
    damping: float = 1e-3
    adaptive_damping: bool = False
    clipping: float = 1e-2
    momentum: float = 0.5
    weight_decay: float = 0.0
    fisher: str = "mc"
    stats_fraction: float = 1.0
    t_cov: int = 10
    t_inv: int = 10
    seed: int = 0


Factory = Callable[[nn.Module, nn.Module, OptimConfig], torch.optim.Optimizer]


@dataclass(frozen=True)
class OptimizerSpec:
    """One entry of the registry.

    Attributes:
        build: ``build(model, loss_fn, config)`` returns the optimizer.
        default_lr: Learning rate when ``--lr`` is not given.
        curvature: Whether it is a curvlib ``PreconditionedOptimizer``.
        help: One line for ``--help``.
    """

    build: Factory
    default_lr: float
    curvature: bool
    help: str


def _curvature(make_approx: Callable[[], CurvatureApprox]) -> Factory:
    def build(model: nn.Module, loss_fn: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
        from curvlib.wiring import PreconditionedOptimizer

        damping: float | LevenbergMarquardt = cfg.damping
        if cfg.adaptive_damping:
            damping = LevenbergMarquardt(initial=cfg.damping, interval=cfg.t_inv)
        return PreconditionedOptimizer(
            model,
            make_approx(),
            loss_fn=loss_fn,
            fisher_type=cfg.fisher,
            stats_fraction=cfg.stats_fraction,
            seed=cfg.seed,
            lr=cfg.lr,
            damping=damping,
            kl_clip=cfg.clipping if cfg.clipping > 0 else None,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            t_cov=cfg.t_cov,
            t_inv=cfg.t_inv,
        )

    return build


# The approximations are imported when chosen, so that one unfinished module
# cannot break the others.
def _kfac() -> CurvatureApprox:
    from curvlib.approx.kfac import KFAC

    return KFAC()


def _kfac_eigen() -> CurvatureApprox:
    from curvlib.approx.kfac import KFAC, KFACDamping

    return KFAC(damping_mode=KFACDamping.EIGEN)


def _kpsvd() -> CurvatureApprox:
    from curvlib.approx.kpsvd import KPSVD

    return KPSVD()


def _deflation() -> CurvatureApprox:
    from curvlib.approx.deflation import Deflation

    return Deflation()


def _kfac_corrected() -> CurvatureApprox:
    from curvlib.approx.kfac_corrected import KFACCorrected

    return KFACCorrected()


def _lanczos() -> CurvatureApprox:
    from curvlib.approx.lanczos import Lanczos

    return Lanczos()


def _block_ng() -> CurvatureApprox:
    from curvlib.approx.natural_gradient import BlockNaturalGradient

    return BlockNaturalGradient()


def _exact_ng() -> CurvatureApprox:
    from curvlib.approx.natural_gradient import ExactNaturalGradient

    return ExactNaturalGradient()


def _adam(model: nn.Module, loss_fn: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _sgd(model: nn.Module, loss_fn: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


DEFAULT_CURVATURE_LR = 0.2
"""Learning rate of every curvature optimizer when ``--lr`` is not given."""

OPTIMIZERS: dict[str, OptimizerSpec] = {
    "kfac": OptimizerSpec(
        _curvature(_kfac), DEFAULT_CURVATURE_LR, True, "KFAC, pi-split damping (Cholesky)"
    ),
    "kfac-eigen": OptimizerSpec(
        _curvature(_kfac_eigen), DEFAULT_CURVATURE_LR, True, "KFAC, exact eigenbasis damping"
    ),
    "kpsvd": OptimizerSpec(
        _curvature(_kpsvd), DEFAULT_CURVATURE_LR, True, "best single Kronecker product"
    ),
    "deflation": OptimizerSpec(
        _curvature(_deflation), DEFAULT_CURVATURE_LR, True, "best sum of two Kronecker products"
    ),
    "kfac-corrected": OptimizerSpec(
        _curvature(_kfac_corrected), DEFAULT_CURVATURE_LR, True, "KFAC plus its best correction"
    ),
    "lanczos": OptimizerSpec(
        _curvature(_lanczos), DEFAULT_CURVATURE_LR, True, "rank-2 Kronecker sum by Lanczos"
    ),
    "block-ng": OptimizerSpec(
        _curvature(_block_ng), DEFAULT_CURVATURE_LR, True, "exact block-diagonal natural gradient"
    ),
    "exact-ng": OptimizerSpec(
        _curvature(_exact_ng), DEFAULT_CURVATURE_LR, True, "exact natural gradient (Woodbury)"
    ),
    "adam": OptimizerSpec(_adam, 1e-3, False, "torch.optim.Adam"),
    "sgd": OptimizerSpec(_sgd, 1.0, False, "torch.optim.SGD with momentum"),
}
"""Every ``--optim`` name and how to build it: the only place strings become optimizers."""


@dataclass(frozen=True)
class RunSpec:
    """One optimizer of a run or comparison: ``NAME`` or ``NAME:LR`` on the command line.

    Attributes:
        name: A key of ``OPTIMIZERS``.
        lr: Its learning rate, or ``None`` for ``--lr`` / the optimizer's default.
    """

    name: str
    lr: float | None = None

    @property
    def label(self) -> str:
        """Directory and legend name: ``kfac`` or ``adam-lr0.003``."""
        return self.name if self.lr is None else f"{self.name}-lr{self.lr:g}"


def _choices() -> str:
    return ", ".join(OPTIMIZERS)


def run_spec(text: str) -> RunSpec:
    """``argparse`` type of one optimizer: ``NAME`` or ``NAME:LR``."""
    name, _, lr = text.strip().partition(":")
    if name not in OPTIMIZERS:
        raise argparse.ArgumentTypeError(f"invalid optimizer {name!r} (choose from {_choices()})")
    if not lr:
        return RunSpec(name)
    try:
        return RunSpec(name, positive_float(lr))
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"learning rate of {text.strip()!r} {err}") from None


def run_spec_list(text: str) -> list[RunSpec]:
    """``argparse`` type of ``--compare``: comma-separated ``NAME`` or ``NAME:LR``."""
    specs = [run_spec(part) for part in text.split(",") if part.strip()]
    if not specs:
        raise argparse.ArgumentTypeError(f"needs at least one optimizer (choose from {_choices()})")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise argparse.ArgumentTypeError(f"lists an optimizer twice: {text!r}")
    return specs


# -- the command line -------------------------------------------------------------

FISHER_CHOICES = ("mc", "empirical", "exact")
DEVICE_CHOICES = ("auto", "cpu", "cuda")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and shows every meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            action.option_strings
            and "default" not in text
            and action.default is not None
            and action.default is not False
            and action.default != argparse.SUPPRESS
        ):
            text += " (default: %(default)s)"
        return text


def build_parser(
    description: str, *, epilog: str | None = None, **defaults: Any
) -> argparse.ArgumentParser:
    """The parser with every common flag; scripts add their own flags to it.

    Args:
        description: First line of ``--help``.
        epilog: Text after the flags in ``--help``.
        **defaults: Script-specific defaults of common flags (e.g. ``batch_size=1000``).
    """
    table = "\n".join(f"  {name:<16}{spec.help}" for name, spec in OPTIMIZERS.items())
    parser = argparse.ArgumentParser(
        description=description,
        epilog=f"optimizers (--optim, --compare):\n{table}" + (f"\n\n{epilog}" if epilog else ""),
        formatter_class=_HelpFormatter,
    )
    opt = parser.add_argument_group("optimizer")
    opt.add_argument(
        "--optim",
        type=run_spec,
        default=RunSpec("kfac"),
        metavar="NAME",
        help=f"optimizer, one of: {_choices()} (default: kfac)",
    )
    opt.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help=f"learning rate (default: {DEFAULT_CURVATURE_LR:g} for curvature optimizers, "
        f"{OPTIMIZERS['adam'].default_lr:g} for adam, {OPTIMIZERS['sgd'].default_lr:g} for sgd)",
    )
    opt.add_argument(
        "--damping", type=positive_float, default=1e-3, help="Tikhonov damping λ of C + λI"
    )
    opt.add_argument(
        "--adaptive-damping",
        action="store_true",
        help="adapt λ by the Levenberg-Marquardt rule every --t-inv steps, starting at --damping",
    )
    opt.add_argument(
        "--clipping",
        type=nonnegative_float,
        default=1e-2,
        help="KL-clipping bound (0 disables clipping)",
    )
    opt.add_argument(
        "--momentum",
        type=momentum_float,
        default=0.5,
        help="momentum of curvature optimizers and sgd (adam keeps its betas)",
    )
    opt.add_argument("--weight-decay", type=nonnegative_float, default=0.0, help="L2 weight decay")
    opt.add_argument(
        "--fisher",
        choices=FISHER_CHOICES,
        default="mc",
        help="curvature statistics: MC-sampled targets, empirical Fisher or exact GGN",
    )
    opt.add_argument(
        "--stats-fraction",
        type=fraction,
        default=1.0,
        help="fraction of each batch used for the curvature statistics",
    )
    opt.add_argument(
        "--t-cov", type=positive_int, default=10, help="steps between statistics updates"
    )
    opt.add_argument("--t-inv", type=positive_int, default=10, help="steps between inversions")
    opt.add_argument(
        "--compare",
        type=run_spec_list,
        default=None,
        metavar="NAME[:LR],...",
        help="run several optimizers on the same data and seed, e.g. kfac,kpsvd,adam or "
        "kfac,adam:3e-4,adam:1e-3 (LR overrides --lr for that entry); plots them together",
    )

    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=positive_int, default=500, help="mini-batch size")
    run.add_argument("--num-epochs", type=positive_int, default=10, help="epochs (in total)")
    run.add_argument(
        "--num-train",
        type=positive_int,
        default=None,
        help="training examples (default: 20000 generated for curves, all for files)",
    )
    run.add_argument(
        "--num-test",
        type=positive_int,
        default=None,
        help="test examples (default: 5000 for curves, the test set of mnist, last fifth of faces)",
    )
    run.add_argument(
        "--data-root", type=Path, default=Path("data"), help="directory of downloaded data sets"
    )
    run.add_argument(
        "--device",
        choices=DEVICE_CHOICES,
        default="auto",
        help="auto picks CUDA when available",
    )
    run.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads of torch (default: torch's choice; 1 is much faster on a busy machine)",
    )
    run.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and MC")
    run.add_argument("--out", type=Path, default=Path("runs/example"), help="output directory")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --out (--num-epochs counts all epochs)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(**defaults)
    return parser


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU.

    Raises:
        UsageError: If ``cuda`` is asked for but not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine (try --device cpu).")
    return torch.device(name)


def runs_of(args: argparse.Namespace) -> list[RunSpec]:
    """The optimizers to run: those of ``--compare``, or ``--optim``."""
    return list(args.compare) if args.compare else [args.optim]


def optim_config(args: argparse.Namespace, spec: RunSpec) -> OptimConfig:
    """The hyper-parameters of ``spec``: its own LR, else ``--lr``, else the default."""
    lr = spec.lr if spec.lr is not None else args.lr
    return OptimConfig(
        lr=OPTIMIZERS[spec.name].default_lr if lr is None else lr,
        damping=args.damping,
        adaptive_damping=args.adaptive_damping,
        clipping=args.clipping,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        fisher=args.fisher,
        stats_fraction=args.stats_fraction,
        t_cov=args.t_cov,
        t_inv=args.t_inv,
        seed=args.seed,
    )


def build_optimizer(
    name: str, model: nn.Module, loss_fn: nn.Module, config: OptimConfig
) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name``."""
    return OPTIMIZERS[name].build(model, loss_fn, config)


# -- training ---------------------------------------------------------------------


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
    """

    make_model: Callable[[], nn.Module]
    loss_fn: nn.Module
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    eval_batch: int = 5_000


METRIC_FIELDS: tuple[str, ...] = (
    "epoch",
    "steps",
    "train_loss",
    "test_loss",
    "train_loss_running",
    "wall_time",
    "epoch_time",
    "kl_clip_factor",
    "damping",
    "time_statistics",
    "time_update",
    "time_inverse",
    "time_precondition",
    "time_step",
    "skipped_steps",
)
"""Columns of ``metrics.csv``: losses at the end of each epoch (``train_loss`` on the whole
training set, ``train_loss_running`` the mean over the epoch's batches), cumulative
training seconds without evaluations (``wall_time``), the means of the clip factor ν and
the damping λ over the epoch's steps, and the seconds the epoch spent in the curvature
optimizer's phases (``time_step`` is all of ``step()``: update, inverse, precondition
and the parameter update; the statistics are computed in ``record()``)."""


@dataclass
class RunResult:
    """The outcome of one optimizer's run.

    Attributes:
        label: The run's name (its subdirectory under ``--out`` in a comparison).
        lr: Its learning rate.
        out: Its output directory.
        metrics: One dict per epoch (epoch 0: before training), keys ``METRIC_FIELDS``.
    """

    label: str
    lr: float
    out: Path
    metrics: list[dict[str, float | None]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, float | None]:
        """The last epoch's metrics."""
        return self.metrics[-1]


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, batch: int) -> float:
    """Mean loss over ``(x, y)`` (``mean`` reduction weighted by batch size)."""
    if len(x) == 0:
        return math.nan
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(x), batch):
        total += float(loss_fn(model(x[i : i + batch]), y[i : i + batch])) * len(x[i : i + batch])
    model.train(was_training)
    return total / len(x)


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


CHECKPOINT = "checkpoint.pt"
TIMINGS = ("time_statistics", "time_update", "time_inverse", "time_precondition", "time_step")
TELEMETRY = ("kl_clip_factor", "damping", *TIMINGS)
"""Keys of ``optimizer.last_stats`` summarised per epoch."""


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically, so that an interrupted save keeps the previous checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def write_metrics(out: Path, metrics: Sequence[dict[str, float | None]]) -> None:
    """``metrics.csv`` (empty cells for missing values) and ``metrics.json`` (``null``)."""
    with (out / "metrics.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        for row in metrics:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in METRIC_FIELDS})
    (out / "metrics.json").write_text(json.dumps(list(metrics), indent=1) + "\n")


def plot_runs(results: Sequence[RunResult], path: Path, title: str) -> None:
    """Train (solid) and test (dashed) loss against epoch and against wall time."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for i, result in enumerate(results):
        color = f"C{i}"
        epochs = [m["epoch"] for m in result.metrics]
        times = [m["wall_time"] for m in result.metrics]
        for key, style in (("train_loss", "-"), ("test_loss", "--")):
            values = [math.nan if m[key] is None else m[key] for m in result.metrics]
            label = result.label if key == "train_loss" else None
            axes[0].plot(epochs, values, style, color=color, marker=".", label=label)
            axes[1].plot(times, values, style, color=color, marker=".")
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("wall time (s, without evaluations)")
    axes[0].set_ylabel("loss (solid: train, dashed: test)")
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """A shuffled epoch; the last partial batch is dropped when a full one exists."""
    perm = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if n >= batch_size else n
    return [perm[i : i + batch_size] for i in range(0, stop, batch_size)]


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


def train_one(
    task: Task,
    spec: RunSpec,
    args: argparse.Namespace,
    out: Path,
    device: torch.device,
    title: str,
) -> RunResult:
    """Train one optimizer, writing metrics, plot and checkpoint to ``out`` every epoch.

    Raises:
        UsageError: If ``--resume`` finds a checkpoint of another optimizer.
    """
    out.mkdir(parents=True, exist_ok=True)
    config = optim_config(args, spec)
    torch.manual_seed(args.seed)
    model = task.make_model().to(device)
    optimizer = build_optimizer(spec.name, model, task.loss_fn, config)
    generator = torch.Generator().manual_seed(args.seed)
    result = RunResult(spec.label, config.lr, out)
    ckpt_path = out / CHECKPOINT
    if args.resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt["optimizer_name"] != spec.name:
            raise UsageError(
                f"--resume: {ckpt_path} holds a run of {ckpt['optimizer_name']!r}, not "
                f"{spec.name!r}; use another --out."
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"], generator, device)
        result.metrics = list(ckpt["metrics"])
        tqdm.write(f"[{spec.label}] resuming after epoch {ckpt['epoch']} from {ckpt_path}")
    elif args.resume:
        tqdm.write(f"[{spec.label}] --resume: no checkpoint in {out}, starting from scratch")
    loss_fn = task.loss_fn

    def evaluate_both() -> tuple[float, float]:
        return (
            evaluate(model, loss_fn, task.train_x, task.train_y, task.eval_batch),
            evaluate(model, loss_fn, task.test_x, task.test_y, task.eval_batch),
        )

    if not result.metrics:
        train_loss, test_loss = evaluate_both()
        result.metrics.append(
            {**dict.fromkeys(METRIC_FIELDS), "epoch": 0, "steps": 0, "wall_time": 0.0}
            | {"train_loss": _finite(train_loss), "test_loss": _finite(test_loss)}
        )
    start_epoch = int(result.final["epoch"] or 0)
    steps = int(result.final["steps"] or 0)
    wall = float(result.final["wall_time"] or 0.0)
    n = len(task.train_x)
    per_epoch = len(_batches(n, args.batch_size, torch.Generator()))
    is_curvature = OPTIMIZERS[spec.name].curvature
    record = getattr(optimizer, "record", _nothing)
    bar = tqdm(
        total=per_epoch * args.num_epochs,
        initial=min(steps, per_epoch * args.num_epochs),
        desc=spec.label,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5,
        disable=args.no_progress,
        file=sys.stderr,
    )
    model.train()
    for epoch in range(start_epoch + 1, args.num_epochs + 1):
        epoch_start = time.perf_counter()
        losses: list[float] = []
        telemetry: dict[str, list[float]] = {k: [] for k in TELEMETRY}
        for idx in _batches(n, args.batch_size, generator):
            x, y = task.train_x[idx], task.train_y[idx]
            optimizer.zero_grad()
            with record():
                loss = loss_fn(model(x), y)
                loss.backward()
            if getattr(optimizer, "lm_due", False):
                # Levenberg-Marquardt compares the batch loss before and after the step.
                def closure(x: Tensor = x, y: Tensor = y) -> float:
                    return float(loss_fn(model(x), y))

                optimizer.step(closure)
            else:
                optimizer.step()
            losses.append(float(loss.detach()))
            stats: dict[str, Any] = getattr(optimizer, "last_stats", {})
            for key, values in telemetry.items():
                if stats.get(key) is not None:
                    values.append(float(stats[key]))
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}", refresh=False)
        elapsed = time.perf_counter() - epoch_start
        wall += elapsed
        steps += len(losses)
        train_loss, test_loss = evaluate_both()
        row: dict[str, float | None] = {
            "epoch": epoch,
            "steps": steps,
            "train_loss": train_loss,
            "test_loss": test_loss,
            "train_loss_running": _mean(losses),
            "wall_time": wall,
            "epoch_time": elapsed,
            "kl_clip_factor": _mean(telemetry["kl_clip_factor"]),
            "damping": _mean(telemetry["damping"]),
            **{key: sum(telemetry[key]) if is_curvature else None for key in TIMINGS},
            "skipped_steps": getattr(optimizer, "skipped_steps", None),
        }
        row = {k: None if v is not None and not math.isfinite(v) else v for k, v in row.items()}
        result.metrics.append(row)
        extra = ""
        if row["kl_clip_factor"] is not None and row["damping"] is not None:
            extra = f"  ν {row['kl_clip_factor']:.3f}  λ {row['damping']:.2e}"
        tqdm.write(
            f"[{spec.label}] epoch {epoch:3d}  train {_fmt(row['train_loss'], '.5f')}  "
            f"test {_fmt(row['test_loss'], '.5f')}  time {wall:7.1f}s{extra}"
        )
        save_checkpoint(
            ckpt_path,
            {
                "epoch": epoch,
                "optimizer_name": spec.name,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "metrics": result.metrics,
                "rng": _rng_state(generator, device),
                "config": asdict(config),
            },
        )
        write_metrics(out, result.metrics)
        plot_runs([result], out / "loss.png", f"{title}: {spec.label}")
    bar.close()
    write_metrics(out, result.metrics)
    plot_runs([result], out / "loss.png", f"{title}: {spec.label}")
    return result


# -- comparison and summary ---------------------------------------------------------


def time_to_reach(result: RunResult, target: float) -> float | None:
    """Wall time at which the train loss first reaches ``target`` (linear interpolation)."""
    prev: dict[str, float | None] | None = None
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
    finite = [r for r in adams if r.final["train_loss"] is not None]
    return min(finite, key=lambda r: float(r.final["train_loss"] or math.inf), default=None)


def summarize(results: Sequence[RunResult]) -> str:
    """A table of final losses and times.

    With Adam in the comparison, a last column gives the wall time each run needs
    to reach the final train loss of the best Adam run.
    """
    reference = best_adam(results) if len(results) > 1 else None
    target = None if reference is None else reference.final["train_loss"]
    head = f"{'optimizer':<18} {'lr':>8} {'train loss':>11} {'test loss':>10} {'time (s)':>9}"
    if target is not None:
        head += f"  {'time to Adam final (s)':>22}"
    lines = [head, "-" * len(head)]
    for r in results:
        final = r.final
        line = (
            f"{r.label:<18} {r.lr:>8.2g} {_fmt(final['train_loss'], '.5f'):>11} "
            f"{_fmt(final['test_loss'], '.5f'):>10} {_fmt(final['wall_time'], '.1f'):>9}"
        )
        if target is not None:
            reach = time_to_reach(r, float(target))
            line += f"  {'never' if reach is None else f'{reach:.1f}':>22}"
        lines.append(line)
    if reference is not None:
        lines.append(f"(Adam reference: {reference.label}, final train loss {target:.5f})")
    return "\n".join(lines)


def _finite(value: float) -> float | None:
    """``None`` for NaN and Inf, so that ``metrics.json`` stays valid JSON."""
    return value if math.isfinite(value) else None


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


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


def run_experiment(task: Task, args: argparse.Namespace, title: str) -> list[RunResult]:
    """Run ``--optim`` (or every ``--compare`` entry), write outputs, print the summary."""
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    specs = runs_of(args)
    compare = args.compare is not None
    results = [
        train_one(task, spec, args, out / spec.label if compare else out, device, title)
        for spec in specs
    ]
    if compare:
        plot_runs(results, out / "compare.png", title)
    write_summary(results, out / "summary.json")
    epochs = f"{args.num_epochs} epoch{'s' if args.num_epochs != 1 else ''}"
    print(f"\n{title} on {device.type}: {epochs}, batch {args.batch_size}")
    print(summarize(results))
    print(f"outputs in {out}/")
    return results
