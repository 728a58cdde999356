"""The command line shared by curvlib's example scripts: flags, their types and checks.

Every example builds its parser with ``build_parser`` (the common flags are defined
here and only here) and adds its own data and model flags. Bad values are rejected
by the parser with the allowed range or choices.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from optimizers import COARSE_SPACES, DEFAULT_CURVATURE_LR, OPTIMIZERS, OptimConfig, OptimizerSpec
from torchrun import launched, local_device

from curvlib import EKFAC, Diagonal, TwoLevel
from curvlib.optim.defaults import DEFAULTS


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


def _unit_float(text: str) -> float:
    """``argparse`` type: a float in [0, 1]."""
    value = _float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text!r}")
    return value


def coarse_samples(text: str) -> int | str | None:
    """``argparse`` type of ``--coarse-samples``: ``auto``, ``all`` or a positive int."""
    value = text.strip().lower()
    if value == "auto":
        return "auto"
    if value == "all":
        return None
    try:
        return positive_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected auto, all or a positive int, got {text!r}"
        ) from None


def positive_int(text: str) -> int:
    """``argparse`` type: an integer >= 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """``argparse`` type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


@dataclass(frozen=True)
class RunSpec:
    """One optimizer of a run, comparison or grid: ``NAME`` or ``NAME:LR`` on the command line.

    Attributes:
        name: A key of ``OPTIMIZERS`` (or of the script's registry, see ``build_parser``).
        lr: Its learning rate, or ``None`` for ``--lr`` / the optimizer's default.
        settings: Other hyper-parameters of this run (``--grid``): pairs of an
            ``OptimConfig`` field and its value, overriding the flags.
    """

    name: str
    lr: float | None = None
    settings: tuple[tuple[str, float], ...] = ()

    @property
    def label(self) -> str:
        """Directory and legend name: ``kfac``, ``adam-lr0.003`` or ``kfac-lr0.1-damping0.001``."""
        parts = [self.name] if self.lr is None else [f"{self.name}-lr{self.lr:g}"]
        parts += [f"{key}{value:g}" for key, value in self.settings]
        return "-".join(parts)


def _choices(registry: Mapping[str, OptimizerSpec] = OPTIMIZERS) -> str:
    return ", ".join(registry)


def run_spec(text: str, registry: Mapping[str, OptimizerSpec] = OPTIMIZERS) -> RunSpec:
    """``argparse`` type of one optimizer: ``NAME`` or ``NAME:LR``, ``NAME`` in ``registry``."""
    name, _, lr = text.strip().partition(":")
    if name not in registry:
        raise argparse.ArgumentTypeError(
            f"invalid optimizer {name!r} (choose from {_choices(registry)})"
        )
    if not lr:
        return RunSpec(name)
    try:
        return RunSpec(name, positive_float(lr))
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"learning rate of {text.strip()!r} {err}") from None


def run_spec_list(text: str, registry: Mapping[str, OptimizerSpec] = OPTIMIZERS) -> list[RunSpec]:
    """``argparse`` type of ``--compare``: comma-separated ``NAME`` or ``NAME:LR``."""
    specs = [run_spec(part, registry) for part in text.split(",") if part.strip()]
    if not specs:
        raise argparse.ArgumentTypeError(
            f"needs at least one optimizer (choose from {_choices(registry)})"
        )
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise argparse.ArgumentTypeError(f"lists an optimizer twice: {text!r}")
    return specs


GRID_PARAMETERS: dict[str, Callable[[str], float]] = {
    "lr": positive_float,
    "damping": positive_float,
    "clipping": nonnegative_float,
    "momentum": momentum_float,
    "weight_decay": nonnegative_float,
}
"""``--grid NAME=V1,V2,...``: the hyper-parameters a grid may vary, with their checks
(``weight-decay`` and ``weight_decay`` are the same name)."""


@dataclass(frozen=True)
class GridAxis:
    """One ``--grid`` entry: a hyper-parameter and the values it takes.

    Attributes:
        name: A key of ``GRID_PARAMETERS`` (an ``OptimConfig`` field).
        values: Its values, in the order given.
    """

    name: str
    values: tuple[float, ...]


def grid_axis(text: str) -> GridAxis:
    """``argparse`` type of one ``--grid`` entry: ``NAME=V1,V2,...``."""
    names = ", ".join(n.replace("_", "-") for n in GRID_PARAMETERS)
    key, sep, values = text.strip().partition("=")
    name = key.strip().replace("-", "_")
    if not sep or not name:
        raise argparse.ArgumentTypeError(
            f"expects NAME=V1,V2,... such as lr=0.03,0.1 (NAME one of {names}), got {text!r}"
        )
    if name not in GRID_PARAMETERS:
        raise argparse.ArgumentTypeError(f"unknown parameter {key.strip()!r} (choose from {names})")
    parts = [v.strip() for v in values.split(",")]
    if not any(parts):
        raise argparse.ArgumentTypeError(f"{key.strip()}= lists no values, in {text!r}")
    if not all(parts):
        raise argparse.ArgumentTypeError(f"{key.strip()}= has an empty value, in {text!r}")
    parsed: list[float] = []
    for part in parts:
        try:
            parsed.append(GRID_PARAMETERS[name](part))
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"{key.strip()}= value {err}") from None
    if len(set(parsed)) != len(parsed):
        raise argparse.ArgumentTypeError(f"{key.strip()}= lists a value twice: {text!r}")
    return GridAxis(name, tuple(parsed))


class _GridAction(argparse.Action):
    """Stores the ``--grid`` axes, refusing a parameter named twice."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        axes = list(values or [])
        names = [a.name for a in axes]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise argparse.ArgumentError(
                self, f"names {', '.join(twice)} twice; give all its values in one NAME=V1,V2"
            )
        setattr(namespace, self.dest, axes)


def grid_specs(spec: RunSpec, axes: Sequence[GridAxis]) -> list[RunSpec]:
    """The cartesian product of ``axes`` for the optimizer of ``spec``, first axis slowest.

    ``lr`` becomes the runs' learning rate; the other axes their ``settings``.
    """
    runs = []
    for values in itertools.product(*(axis.values for axis in axes)):
        chosen = dict(zip((axis.name for axis in axes), values, strict=True))
        lr = chosen.pop("lr", spec.lr)
        runs.append(RunSpec(spec.name, lr, tuple(chosen.items())))
    return runs


# -- the command line -------------------------------------------------------------

FISHER_CHOICES = ("mc", "empirical", "exact")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
DAMPING_MODE_CHOICES = ("pi", "eigen", "sqrt")
CONV_DAMPING_CHOICES = ("uniform", "per_position")
PATIENCE_METRICS = ("test_loss", "train_loss")

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "t_cov": 100,
        "t_inv": 100,
        "warmup": 0,
        "refresh_on_move": 0.0,
        "max_move": 0.0,
        "damping_warmup_samples": 0,
        "stats_fraction": 0.25,
        "momentum": 0.9,
        "weight_decay": 1e-3,
        "decoupled_weight_decay": True,
        "kl_clip_lr_squared": False,
        "damping_mode": "sqrt",
        "conv_damping": "per_position",
        "decay": 0.95,
        "patience": 10,
        "patience_metric": "train_loss",
    },
}
"""``--preset NAME``: the defaults it gives the flags (by ``argparse`` destination).

``paper`` is the configuration of the K-FAC code the KPSVD, Deflation, Lanczos
and two-level K-FAC papers train with (the table in ``docs/examples.md`` maps each
entry to that code and to curvlib's API). Flags given explicitly win over a preset,
wherever they stand on the command line."""


def _as_flag(dest: str, value: Any) -> str:
    """``--t-cov 100``, or ``--flag`` / ``--no-flag`` for a boolean."""
    flag = dest.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value:g}" if isinstance(value, float) else f"--{flag} {value}"


class _PresetParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose ``--preset`` sets defaults before the real parse.

    The preset is read first with a parser of its own; its values become the
    defaults of this parse only, so that explicit flags override them.
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        peek = argparse.ArgumentParser(add_help=False, exit_on_error=False)
        peek.add_argument("--preset")
        try:
            name = peek.parse_known_args(args)[0].preset
        except argparse.ArgumentError:  # "--preset" without a value: the real parse says so
            name = None
        values = PRESETS.get(name, {}) if name is not None else {}
        saved = {dest: self.get_default(dest) for dest in values}
        self.set_defaults(**values)
        try:
            return super().parse_known_args(args, namespace)
        finally:
            self.set_defaults(**saved)


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
    description: str,
    *,
    epilog: str | None = None,
    registry: Mapping[str, OptimizerSpec] = OPTIMIZERS,
    **defaults: Any,
) -> argparse.ArgumentParser:
    """The parser with every common flag; scripts add their own flags to it.

    Args:
        description: First line of ``--help``.
        epilog: Text after the flags in ``--help``.
        registry: The ``--optim``/``--compare`` names and their specs: ``OPTIMIZERS``,
            or a script's superset of it with optimizers only it can run (the GAN's
            simultaneous SGD). It is stored as ``args.registry`` for ``optim_config``.
        **defaults: Script-specific defaults of common flags (e.g. ``batch_size=1000``).
    """
    table = "\n".join(f"  {name:<16}{spec.help}" for name, spec in registry.items())
    parser = _PresetParser(
        description=description,
        epilog=f"optimizers (--optim, --compare):\n{table}" + (f"\n\n{epilog}" if epilog else ""),
        formatter_class=_HelpFormatter,
    )
    opt = parser.add_argument_group("optimizer")
    opt.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help="defaults of a published configuration; explicit flags override it (paper: "
        + ", ".join(_as_flag(dest, value) for dest, value in PRESETS["paper"].items())
        + ")",
    )
    opt.add_argument(
        "--optim",
        type=functools.partial(run_spec, registry=registry),
        default=RunSpec("kfac"),
        metavar="NAME",
        help=f"optimizer, one of: {_choices(registry)} (default: kfac)",
    )
    opt.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help=f"learning rate (default: {DEFAULT_CURVATURE_LR:g} for curvature optimizers, "
        f"{OPTIMIZERS['adam'].default_lr:g} for adam, {OPTIMIZERS['sgd'].default_lr:g} for sgd)",
    )
    opt.add_argument(
        "--damping",
        type=positive_float,
        default=None,
        help="Tikhonov damping λ of C + λI (default: the approximation's, "
        f"{DEFAULTS.damping.damping:g}; {Diagonal.default_damping:g} for diag)",
    )
    opt.add_argument(
        "--adaptive-damping",
        action="store_true",
        help="adapt λ by the Levenberg-Marquardt rule every --t-inv steps, starting at --damping",
    )
    opt.add_argument(
        "--clipping",
        type=nonnegative_float,
        default=None,
        help="KL-clipping bound on each step, momentum included, 0 disables clipping "
        f"(default: the approximation's, {DEFAULTS.kl_clip:g}; {EKFAC.default_kl_clip:g} for "
        "ekfac)",
    )
    opt.add_argument(
        "--kl-clip-lr-squared",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include lr**2 in the KL clip (Ba et al.); --no-kl-clip-lr-squared: the KPSVD "
        "papers' clip without it",
    )
    opt.add_argument(
        "--momentum",
        type=momentum_float,
        default=None,
        help=f"momentum (default: {DEFAULTS.momentum:g} for curvature optimizers, "
        f"{OPTIMIZERS['sgd'].default_momentum:g} for sgd; adam keeps its betas)",
    )
    opt.add_argument("--weight-decay", type=nonnegative_float, default=0.0, help="L2 weight decay")
    opt.add_argument(
        "--decoupled-weight-decay",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="curvature optimizers: add weight-decay * w to the preconditioned, clipped step "
        "after momentum (theta -= lr * (step + wd * theta)) instead of to the gradient",
    )
    opt.add_argument(
        "--damping-mode",
        choices=DAMPING_MODE_CHOICES,
        default=None,
        help="how kfac and kpsvd damp their factors: pi split, exact eigenbasis, or sqrt "
        "(sqrt(damping) on both factors; kfac-eigen keeps eigen) (default: pi)",
    )
    opt.add_argument(
        "--conv-damping",
        choices=CONV_DAMPING_CHOICES,
        default=None,
        help="kfac: per_position divides a convolution's damping by its output positions "
        "as the KPSVD papers' code does (changes --damping-mode sqrt only) (default: uniform)",
    )
    opt.add_argument(
        "--decay",
        type=_unit_float,
        default=None,
        help="running-average weight on the old curvature estimate (default: the approximation's)",
    )
    opt.add_argument(
        "--fisher",
        choices=FISHER_CHOICES,
        default="mc",
        help="curvature statistics: MC-sampled targets, empirical Fisher or exact GGN",
    )
    opt.add_argument(
        "--stats-fraction",
        type=fraction,
        default=DEFAULTS.stats_fraction,
        help="fraction of each batch used for the curvature statistics",
    )
    opt.add_argument(
        "--t-cov",
        type=positive_int,
        default=DEFAULTS.t_cov,
        help="steps between statistics updates",
    )
    opt.add_argument(
        "--t-inv",
        type=positive_int,
        default=None,
        help=f"steps between inversions (default: the approximation's, {DEFAULTS.t_inv}; "
        f"{EKFAC.default_t_inv} for ekfac, whose scalings follow every --t-cov)",
    )
    opt.add_argument(
        "--warmup",
        type=int,
        default=DEFAULTS.warmup,
        help="first steps with curvature refreshes at steps 0, 1, 2, 4, 8, ... (0: none)",
    )
    opt.add_argument(
        "--refresh-on-move",
        type=nonnegative_float,
        default=DEFAULTS.refresh_on_move,
        help="also refresh the curvature when some layer's weights moved by this fraction of "
        "their norm since the last statistics (0: only every --t-cov steps)",
    )
    opt.add_argument(
        "--max-move",
        type=nonnegative_float,
        default=None,
        help="largest step of a layer's weights as a fraction of their norm, momentum included "
        f"(default: the approximation's, {DEFAULTS.max_move}; none for kpsvd; 0: no bound)",
    )
    opt.add_argument(
        "--overlap-inverse",
        type=nonnegative_int,
        default=0,
        metavar="STEPS",
        help="build each rebuilt inverse in the background (on a GPU on a second CUDA stream) "
        "and use it STEPS steps later or at the next rebuild (0: build it at once; KFAC, "
        "KPSVD, the two-term methods and the diagonal)",
    )
    opt.add_argument(
        "--split-inverses",
        choices=("directions", "inverses"),
        default=None,
        help="under torchrun: each layer's curvature work (inverse, eigenbasis, fit, kernel "
        "block) on one rank, which sends each step's preconditioned gradient (directions) or "
        "each rebuild's inverse (inverses); default: every rank does all of it",
    )
    opt.add_argument(
        "--damping-warmup-samples",
        type=int,
        default=None,
        help="damping times n0/n while the statistics have seen n < n0 samples (0: none; "
        f"default: the approximation's, {DEFAULTS.damping.samples}; "
        f"{TwoLevel.default_damping_samples} with --coarse-space)",
    )
    opt.add_argument(
        "--coarse-space",
        choices=sorted(COARSE_SPACES),
        default=None,
        help="add a two-level coarse correction with this coarse space to the curvature "
        "optimizer (any --optim but adam and sgd)",
    )
    opt.add_argument(
        "--krylov",
        action="store_true",
        help="Krylov enrichment of the coarse space (a second vector per layer)",
    )
    opt.add_argument(
        "--coarse-form",
        choices=("residual", "additive"),
        default="residual",
        help="how the coarse correction combines with the fine step",
    )
    opt.add_argument(
        "--coarse-samples",
        type=coarse_samples,
        default="auto",
        metavar="N|all|auto",
        help="samples of each statistics batch the coarse level's Fisher uses (TwoLevel's "
        "max_samples; auto: all for spectral, 128 for the other spaces; tselepidis builds its "
        "own model and uses none)",
    )
    several = opt.add_mutually_exclusive_group()
    several.add_argument(
        "--compare",
        type=functools.partial(run_spec_list, registry=registry),
        default=None,
        metavar="NAME[:LR],...",
        help="run several optimizers on the same data and seed, e.g. kfac,kpsvd,adam or "
        "kfac,adam:3e-4,adam:1e-3 (LR overrides --lr for that entry); plots them together",
    )
    several.add_argument(
        "--grid",
        type=grid_axis,
        nargs="+",
        action=_GridAction,
        default=None,
        metavar="NAME=V1,V2,...",
        help="run --optim at every combination of these values (the cartesian product), "
        "e.g. --grid lr=0.03,0.1,0.3 damping=1e-4,1e-3; NAME one of "
        + ", ".join(n.replace("_", "-") for n in GRID_PARAMETERS)
        + "; one subdirectory per run, grid.csv and grid.png with the run of the lowest "
        "final training loss marked",
    )

    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=positive_int, default=500, help="mini-batch size")
    run.add_argument("--num-epochs", type=positive_int, default=10, help="epochs (in total)")
    run.add_argument(
        "--num-train",
        type=positive_int,
        default=None,
        help="training examples (default: the data set's own size; generated sets: see --data)",
    )
    run.add_argument(
        "--num-test",
        type=positive_int,
        default=None,
        help="test examples (default: the data set's test split)",
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
    run.add_argument(
        "--patience",
        type=positive_int,
        default=None,
        help="stop after this many epochs without a new best --patience-metric (default: "
        "train every epoch)",
    )
    run.add_argument(
        "--patience-metric",
        choices=PATIENCE_METRICS,
        default="test_loss",
        help="the loss --patience watches, evaluated after every epoch",
    )
    parser.set_defaults(registry=registry, **defaults)
    return parser


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU; under ``torchrun``, CUDA is ``cuda:LOCAL_RANK``.

    Raises:
        UsageError: If ``cuda`` is asked for but not available.
        LaunchError: If ``torchrun`` started more ranks on this machine than it has GPUs.
    """
    if name == "auto":
        return local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine (try --device cpu).")
    return local_device(torch.device(name))


def runs_of(args: argparse.Namespace) -> list[RunSpec]:
    """The runs: every ``--grid`` combination, the ``--compare`` entries, or ``--optim``."""
    if getattr(args, "grid", None):
        return grid_specs(args.optim, args.grid)
    return list(args.compare) if args.compare else [args.optim]


def several_runs(args: argparse.Namespace) -> bool:
    """Whether the runs go to subdirectories of ``--out`` (``--compare`` or ``--grid``)."""
    return args.compare is not None or getattr(args, "grid", None) is not None


def optim_config(args: argparse.Namespace, spec: RunSpec) -> OptimConfig:
    """The hyper-parameters of ``spec``: its own LR, else ``--lr``, else the default.

    A ``--grid`` run's ``settings`` override the flags of the same names.

    Raises:
        UsageError: For ``--krylov`` without ``--coarse-space`` (or with
            ``tselepidis``), or ``--coarse-space`` with a torch optimizer alone.
    """
    lr = spec.lr if spec.lr is not None else args.lr
    registry: Mapping[str, OptimizerSpec] = getattr(args, "registry", OPTIMIZERS)
    entry = registry[spec.name]
    coarse = getattr(args, "coarse_space", None)
    if getattr(args, "krylov", False) and coarse is None:
        raise UsageError("--krylov enriches a coarse space: add --coarse-space NAME.")
    if coarse == "tselepidis" and getattr(args, "krylov", False):
        raise UsageError(
            "--coarse-space tselepidis has no Krylov enrichment; use nicolaides with --krylov."
        )
    split = getattr(args, "split_inverses", None)
    if split is not None and not launched():
        raise UsageError(
            "--split-inverses splits the curvature work over torchrun's ranks: start the "
            "script with torchrun --nproc_per_node=N, or leave the flag out."
        )
    if coarse is not None and not entry.curvature:
        if not getattr(args, "compare", None):
            raise UsageError(
                f"--coarse-space needs a curvature optimizer as its fine level, not {spec.name!r}."
            )
        coarse = None  # --compare: the baselines run as they are
    config = OptimConfig(
        lr=entry.default_lr if lr is None else lr,
        damping=args.damping,
        adaptive_damping=args.adaptive_damping,
        clipping=args.clipping,
        momentum=entry.default_momentum if args.momentum is None else args.momentum,
        weight_decay=args.weight_decay,
        decoupled_weight_decay=getattr(args, "decoupled_weight_decay", False),
        kl_clip_lr_squared=getattr(args, "kl_clip_lr_squared", True),
        damping_mode=getattr(args, "damping_mode", None),
        conv_damping=getattr(args, "conv_damping", None),
        decay=getattr(args, "decay", None),
        fisher=args.fisher,
        stats_fraction=args.stats_fraction,
        t_cov=args.t_cov,
        t_inv=args.t_inv,
        warmup=args.warmup,
        refresh_on_move=args.refresh_on_move,
        max_move=args.max_move,
        overlap_inverse=getattr(args, "overlap_inverse", 0),
        split_inverses=split,
        damping_warmup_samples=args.damping_warmup_samples,
        seed=args.seed,
        coarse_space=coarse,
        krylov=getattr(args, "krylov", False),
        coarse_form=getattr(args, "coarse_form", "residual"),
        coarse_samples=getattr(args, "coarse_samples", "auto"),
    )
    return replace(config, **dict(spec.settings))
