"""Time to a target loss: curvlib's approximations at their defaults against tuned Adam and SGD.

What a user asks of a natural-gradient library is fewer wall-clock seconds than
a tuned Adam to reach the same loss. Per task and seed this benchmark trains

* Adam at each learning rate of ``ADAM_LRS`` and SGD with Nesterov momentum 0.9
  at each of ``SGD_LRS``; the best of each grid (by median final training loss
  over the seeds, at the full budget) is the tuned baseline;
* every curvlib approximation with nothing but the model, the approximation and
  the loss: ``PreconditionedOptimizer(model, Approx(), loss_fn=loss_fn)``;
* KFAC on a 3x3 grid of learning rate and damping around its defaults, and
  KFAC with one default changed at a time (``kfac-ablations``: no momentum,
  statistics every step, no warm-up, refreshes where the weights moved
  (``refresh_on_move=0.3, warmup=3``), statistics on the whole batch, the
  looser clip 1e-2, the running average of 0.95 per update, adaptive learning
  rate and momentum),

on the same initial weights and the same batch order, and reports per run the
final training loss at equal epochs, the loss at tuned Adam's total wall time,
the wall time to reach tuned Adam's final loss as a ratio to Adam's (``null``
when never reached), the per-step time ratio and whether the run diverged.

Wall time counts the training steps only (the training-set loss is evaluated
off the clock, ``EVALS_PER_EPOCH`` times per epoch). The defaults of the methods
with a bar (``PAIRED``) and the configs given with ``--kfac``, ``--ekfac`` and
``--kpsvd`` are timed against tuned Adam trained alongside them, one
Adam step after each of theirs on its own clock: on a shared machine the load
drifts over seconds (tuned Adam's own run on the ReLU autoencoder took 1.3 s
and 2.0 s within a minute), and the two clocks of one paired run see the same
drift. The other runs are timed against tuned Adam's own run. A run stops
early when it diverges (non-finite loss, or above ``DIVERGED`` times the
initial loss) or passes ``TIME_CAP`` times tuned Adam's wall time; its final
loss is then ``null``.

Tasks (all offline; ``--data-root`` adds MNIST and Fashion-MNIST autoencoders
when their files are there):

=================  =============================================================
``curves``         CURVES deep autoencoder, tanh units (Hinton & Salakhutdinov)
``digits-ae``      ReLU deep autoencoder, linear code, real 8x8 digits
``digits-mlp``     MLP classifier, cross-entropy, real 8x8 digits
``digits-cnn``     the examples' CNN classifier on real 8x8 digits
``digits-convae``  the examples' convolutional autoencoder on real 8x8 digits
=================  =============================================================

Usage (from the repository root; ``--quick`` takes a few minutes, the full run
under an hour on 2 cores)::

    python benchmarks/convergence.py
    python benchmarks/convergence.py --quick --out /tmp/convergence
    python benchmarks/convergence.py --tasks digits-ae --methods adam,kfac --seeds 0
    python benchmarks/convergence.py --methods adam,kfac,kfac+nicolaides,kfac+tselepidis

Writes ``convergence.json`` (a list ``runs``, each with ``task``, ``method``,
``config``, ``seed``, ``final_loss``, ``adam_final_loss``,
``time_to_adam_ratio``, ``diverged`` and more), ``convergence.md`` and one
``convergence_<task>.png`` per task (loss against wall time and against epochs)
to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from _harness import REPO, command, commit, cpu_line, machine, progress, write_json

DEFAULT_OUT = REPO / "benchmarks" / "results"
DOCS_RESULTS = REPO / "docs" / "results"
ADAM_LRS = (1e-4, 3e-4, 1e-3, 3e-3)
SGD_LRS = (0.01, 0.03, 0.1, 0.3)
GRID_LR_FACTORS = (1 / 3, 1.0, 3.0)
GRID_DAMPING_FACTORS = (0.1, 1.0, 10.0)
SEEDS = (0, 1, 2)
EVALS_PER_EPOCH = 4
DIVERGED = 10.0
TIME_CAP = 3.0
APPROXIMATIONS = (
    "kfac", "ekfac", "kpsvd", "deflation", "kfac-corrected", "lanczos", "block-ng", "exact-ng",
    "diag",
)  # fmt: skip
TWO_LEVEL = (
    "kfac+nicolaides", "kfac+nicolaides-additive", "kfac+nicolaides-krylov", "kfac+residual",
    "kfac+spectral", "kfac+tselepidis",
)  # fmt: skip
"""Two-level corrections over KFAC (``examples/optimizers.py`` ``TWO_LEVEL``): selectable
with ``--methods``, not run by default."""


# -- tasks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One training problem.

    Attributes:
        name: Short name.
        description: One line for the report.
        make_model: Builds the network (call under ``torch.manual_seed``).
        loss_fn: The training loss (``mean`` reduction).
        inputs: Training inputs.
        targets: Training targets (the inputs for autoencoders).
        batch_size: Mini-batch size.
        epochs: Passes over the training set.
        report_scale: Factor from the mean loss to the reported loss (pixels per
            image for the autoencoders: BCE summed over pixels, mean over images).
    """

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    loss_fn: nn.Module
    inputs: Tensor
    targets: Tensor
    batch_size: int
    epochs: int
    report_scale: float = 1.0

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per epoch (a last partial batch is dropped)."""
        return len(self.inputs) // self.batch_size


def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    return images, torch.tensor(data.target, dtype=torch.int64)


def _mlp(
    widths: Sequence[int], activation: type[nn.Module], linear_at: Sequence[int] = ()
) -> nn.Sequential:
    """Linear layers of ``widths`` with ``activation`` after each but the last and ``linear_at``."""
    layers: list[nn.Module] = []
    last = len(widths) - 2
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i != last and i not in linear_at:
            layers.append(activation())
    return nn.Sequential(*layers)


def _autoencoder_widths(encoder: Sequence[int]) -> tuple[list[int], int]:
    widths = [*encoder, *reversed(encoder[:-1])]
    return widths, len(encoder) - 2


def curves_task(quick: bool) -> Task:
    from autoencoder import autoencoder
    from data import load_curves

    split = load_curves(2000 if quick else 5000, 0, seed=0)
    return Task(
        "curves", "CURVES autoencoder 784-400-200-100-50-25-6 (mirrored), tanh, BCE, batch 250",
        lambda: autoencoder((784, 400, 200, 100, 50, 25, 6), "tanh"), nn.BCEWithLogitsLoss(),
        split.train, split.train, 250, 6 if quick else 15, report_scale=784.0,
    )  # fmt: skip


def digits_ae_task(quick: bool) -> Task:
    images, _ = _digits()
    x = images.flatten(1)
    widths, code = _autoencoder_widths((64, 512, 256, 128, 16))
    return Task(
        "digits-ae", "ReLU autoencoder 64-512-256-128-16 (mirrored), linear code, BCE, batch 200",
        lambda: _mlp(widths, nn.ReLU, linear_at=(code,)), nn.BCEWithLogitsLoss(), x, x, 200,
        10 if quick else 30, report_scale=64.0,
    )  # fmt: skip


def digits_mlp_task(quick: bool) -> Task:
    images, labels = _digits()
    return Task(
        "digits-mlp", "MLP classifier 64-256-256-10, ReLU, cross-entropy, batch 200",
        lambda: _mlp((64, 256, 256, 10), nn.ReLU), nn.CrossEntropyLoss(), images.flatten(1),
        labels, 200, 5 if quick else 15,
    )  # fmt: skip


def digits_cnn_task(quick: bool) -> Task:
    from cnn import kpsvd_cnn

    images, labels = _digits()
    return Task(
        "digits-cnn", "the examples' CNN (conv5x5 32-32-64, max-pool, 2 linears), batch 200",
        lambda: kpsvd_cnn(1, 8, 10), nn.CrossEntropyLoss(), images[:, None], labels, 200,
        4 if quick else 10,
    )  # fmt: skip


def digits_convae_task(quick: bool) -> Task:
    from conv_autoencoder import conv_autoencoder

    images, _ = _digits()
    x = images[:, None]
    return Task(
        "digits-convae", "the examples' convolutional autoencoder (code 16), BCE, batch 200",
        lambda: conv_autoencoder(1, 8, code=16), nn.BCEWithLogitsLoss(), x, x, 200,
        10 if quick else 30, report_scale=64.0,
    )  # fmt: skip


def mnist_ae_task(root: Path, name: str, quick: bool) -> Task:
    from data import load_images

    split = load_images(name, num_train=10_000, num_test=0, seed=0, data_root=root)
    x = split.train_x.flatten(1)
    widths, code = _autoencoder_widths((784, 1000, 500, 250, 30))
    return Task(
        f"{name}-ae", f"{name} ReLU autoencoder 784-1000-500-250-30 (mirrored), BCE, batch 1000",
        lambda: _mlp(widths, nn.ReLU, linear_at=(code,)), nn.BCEWithLogitsLoss(), x, x, 1000,
        10 if quick else 60, report_scale=784.0,
    )  # fmt: skip


TASKS: dict[str, Callable[[bool], Task]] = {
    "curves": curves_task,
    "digits-ae": digits_ae_task,
    "digits-mlp": digits_mlp_task,
    "digits-cnn": digits_cnn_task,
    "digits-convae": digits_convae_task,
}


# -- methods ----------------------------------------------------------------------------


Builder = Callable[[nn.Module, nn.Module], torch.optim.Optimizer]


@dataclass(frozen=True)
class Method:
    """One optimizer configuration: ``build(model, loss_fn)``."""

    name: str
    config: str
    build: Builder
    curvature: bool
    paired: bool = False
    """Timed against tuned Adam alongside (``paired_run``), whatever ``PAIRED`` lists."""


def adam(lr: float) -> Method:
    return Method("adam", f"lr={lr:g}", lambda m, _: torch.optim.Adam(m.parameters(), lr=lr), False)


def sgd(lr: float) -> Method:
    return Method(
        "sgd", f"lr={lr:g}",
        lambda m, _: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True), False,
    )  # fmt: skip


def approximation(name: str) -> Callable[[], Any]:
    """Builds the approximation of the examples' ``--optim name`` with its defaults."""
    from optimizers import APPROXIMATIONS

    return APPROXIMATIONS[name]


def curvature(
    name: str, config: str = "default", approx_kwargs: dict[str, Any] | None = None, **kwargs: Any
) -> Method:
    """``PreconditionedOptimizer(model, approx(**approx_kwargs), loss_fn=loss_fn, **kwargs)``."""
    from curvlib import PreconditionedOptimizer

    make = approximation(name)
    options = dict(approx_kwargs or {})

    def build(model: nn.Module, loss_fn: nn.Module) -> torch.optim.Optimizer:
        return PreconditionedOptimizer(model, make(**options), loss_fn=loss_fn, **kwargs)

    return Method(name, config, build, True)


def kfac_grid() -> list[Method]:
    """KFAC around its default learning rate and damping (the damping's warm-up kept)."""
    from curvlib.optim import DampingWarmup
    from curvlib.optim.defaults import DEFAULTS

    damping = DEFAULTS.damping
    return [
        curvature(
            "kfac", f"lr={DEFAULTS.lr * a:.3g},damping={damping.damping * b:.3g}",
            lr=DEFAULTS.lr * a, damping=DampingWarmup(damping.damping * b, damping.samples),
        )
        for a, b in itertools.product(GRID_LR_FACTORS, GRID_DAMPING_FACTORS)
        if (a, b) != (1.0, 1.0)
    ]  # fmt: skip


def kfac_ablations() -> list[Method]:
    """KFAC with one default changed at a time: what each default is worth."""
    from curvlib import KFAC, PreconditionedOptimizer

    def with_decay(decay: float) -> Method:
        def build(model: nn.Module, loss_fn: nn.Module) -> torch.optim.Optimizer:
            return PreconditionedOptimizer(model, KFAC(decay=decay), loss_fn=loss_fn)

        return Method("kfac", f"decay={decay:g}", build, True)

    return [
        curvature("kfac", "momentum=0", momentum=0.0),
        curvature("kfac", "t_cov=t_inv=1", t_cov=1, t_inv=1),
        curvature("kfac", "warmup=0", warmup=0),
        curvature("kfac", "refresh_on_move=0.3,warmup=3", refresh_on_move=0.3, warmup=3),
        curvature("kfac", "stats_fraction=1", stats_fraction=1.0),
        curvature("kfac", "kl_clip=1e-2", kl_clip=1e-2),
        with_decay(0.95),
        curvature("kfac", "lr=momentum=auto", lr="auto", momentum="auto"),
    ]


def parse_value(text: str) -> Any:
    """A number, ``None``, ``True``, ``False`` or a word (``"auto"``) from the command line."""
    if text == "None":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


APPROX_PREFIX = "approx."
"""Keys of ``--kfac``, ``--ekfac`` and ``--kpsvd`` that go to the approximation's constructor."""


def method_config(name: str, text: str) -> Method:
    """``--kfac "kl_clip=1e-2,momentum=0.9"``: the method with these arguments changed.

    Also ``--ekfac`` and ``--kpsvd``. Keys are the optimizer's arguments, or the
    approximation's with the prefix ``approx.`` (``--kpsvd approx.tol=1e-3``);
    an argument the approximation does not take is refused.
    """
    from optimizers import approx_parameters

    kwargs: dict[str, Any] = {}
    approx_kwargs: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or key == APPROX_PREFIX:
            raise SystemExit(f"--{name} takes key=value pairs separated by commas, got {text!r}.")
        if key.startswith(APPROX_PREFIX):
            approx_kwargs[key.removeprefix(APPROX_PREFIX)] = parse_value(value.strip())
        else:
            kwargs[key] = parse_value(value.strip())
    accepted = approx_parameters(name)
    unknown = sorted(set(approx_kwargs) - set(accepted))
    if unknown:
        raise SystemExit(
            f"--{name}: the approximation takes no argument {unknown[0]!r}; it takes "
            f"{', '.join(accepted)}."
        )
    return dataclasses.replace(curvature(name, text, approx_kwargs, **kwargs), paired=True)


# -- one run ----------------------------------------------------------------------------


def first_reach(losses: Sequence[float], axis: Sequence[float], target: float) -> float | None:
    """Where on ``axis`` the loss first is at or below ``target`` (linear between points)."""
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return 0.0
            l0, x0 = losses[i - 1], axis[i - 1]
            frac = (l0 - target) / (l0 - loss) if l0 > loss else 1.0
            return x0 + frac * (axis[i] - x0)
    return None


@dataclass
class Curve:
    """The training-set loss against wall time and epochs."""

    times: list[float] = field(default_factory=list)
    epochs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def add(self, t: float, epoch: float, loss: float) -> None:
        """Append one evaluation."""
        self.times.append(t)
        self.epochs.append(epoch)
        self.losses.append(loss)

    def time_to(self, target: float) -> float | None:
        """First time the loss is at or below ``target`` (linear between evaluations)."""
        return first_reach(self.losses, self.times, target)

    def epochs_to(self, target: float) -> float | None:
        """First epoch the loss is at or below ``target`` (linear between evaluations)."""
        return first_reach(self.losses, self.epochs, target)

    def loss_at(self, t: float) -> float:
        """The last loss evaluated at or before wall time ``t``."""
        best = self.losses[0]
        for time_, loss in zip(self.times, self.losses, strict=True):
            if time_ > t:
                break
            best = loss
        return best


@dataclass
class Run:
    """One method on one task and seed."""

    task: str
    method: str
    config: str
    seed: int
    curve: Curve
    train_time: float
    steps: int
    diverged: bool
    stopped: bool
    skipped_steps: int
    clipped_steps: int
    adam_time: float | None = None
    """Tuned Adam's wall time over the whole run, timed alongside (``train(alongside=)``)."""

    @property
    def final_loss(self) -> float | None:
        """The loss after the last epoch; ``None`` if the run diverged or hit the time cap."""
        return None if self.diverged or self.stopped else self.curve.losses[-1]

    @property
    def step_time(self) -> float:
        """Mean wall time per step."""
        return self.train_time / max(self.steps, 1)


@torch.no_grad()
def training_loss(model: nn.Module, task: Task, chunk: int = 2000) -> float:
    total = 0.0
    for x, y in zip(task.inputs.split(chunk), task.targets.split(chunk), strict=True):
        total += float(task.loss_fn(model(x), y)) * len(x)
    return total / len(task.inputs) * task.report_scale


def train(
    task: Task,
    method: Method,
    seed: int,
    time_cap: float | None,
    alongside: Method | None = None,
) -> Run:
    """Train ``method`` on ``task`` from the seed's initial weights and batch order.

    With ``alongside`` (tuned Adam), that method trains a second model from the
    same weights on the same batches, one step after each of ``method``'s, on
    its own clock: the two clocks see the same load of the machine, whose drift
    over seconds moves Adam's own time by a half on a shared 2-core machine.
    Where ``method`` stops early, its clock is scaled to the whole run. Neither
    its steps nor its model draw random numbers, so ``method``'s run is the
    same to the bit with or without it.
    """
    paced: tuple[nn.Module, Any] | None = None
    if alongside is not None:
        torch.manual_seed(seed)
        pace_model = task.make_model()
        paced = pace_model, alongside.build(pace_model, task.loss_fn)
    torch.manual_seed(seed)
    model = task.make_model()
    loss_fn = task.loss_fn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = method.build(model, loss_fn)
    order = torch.Generator().manual_seed(seed)
    curve = Curve()
    initial = training_loss(model, task)
    curve.add(0.0, 0.0, initial)
    n, bs = len(task.inputs), task.batch_size
    per_epoch = task.steps_per_epoch
    eval_every = max(per_epoch // EVALS_PER_EPOCH, 1)
    clock, pace_clock, steps, clipped = 0.0, 0.0, 0, 0
    diverged = stopped = False
    record = getattr(opt, "record", None)
    for epoch in range(task.epochs):
        perm = torch.randperm(n, generator=order)
        for b in range(per_epoch):
            idx = perm[b * bs : (b + 1) * bs]
            x, y = task.inputs[idx], task.targets[idx]
            start = time.perf_counter()
            opt.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if record is not None:
                    with record():
                        loss_fn(model(x), y).backward()
                else:
                    loss_fn(model(x), y).backward()
                opt.step()
            clock += time.perf_counter() - start
            if paced is not None:
                start = time.perf_counter()
                paced[1].zero_grad()
                loss_fn(paced[0](x), y).backward()
                paced[1].step()
                pace_clock += time.perf_counter() - start
            steps += 1
            stats = getattr(opt, "last_stats", {})
            if (stats.get("kl_clip_factor") or 1.0) < 1.0:  # None on a skipped step
                clipped += 1
            if steps % eval_every == 0 or b == per_epoch - 1:
                loss = training_loss(model, task)
                curve.add(clock, epoch + (b + 1) / per_epoch, loss)
                if not math.isfinite(loss) or loss > DIVERGED * initial:
                    diverged = True
                elif time_cap is not None and clock > time_cap:
                    stopped = epoch < task.epochs - 1 or b < per_epoch - 1
            if diverged or stopped:
                break
        if diverged or stopped:
            break
    adam_time = None if paced is None else pace_clock * task.epochs * per_epoch / steps
    return Run(
        task.name, method.name, method.config, seed, curve, clock, steps, diverged, stopped,
        int(getattr(opt, "skipped_steps", 0)), clipped, adam_time,
    )  # fmt: skip


# -- a task's comparison ----------------------------------------------------------------


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def best_of(runs: Sequence[Run]) -> str:
    """The config whose runs have the lowest median final loss (a diverged run counts as inf)."""
    by_config: dict[str, list[float]] = {}
    for run in runs:
        loss = run.final_loss
        by_config.setdefault(run.config, []).append(math.inf if loss is None else loss)
    return min(by_config, key=lambda c: (statistics.median(by_config[c]), c))


def record(run: Run, adam: Run, tuned: bool) -> dict[str, Any]:
    """The JSON entry of ``run`` measured against tuned Adam's run of the same seed.

    The target is that run's final loss; the times are measured against Adam's
    clock timed alongside ``run`` where there is one (``paired``), else against
    that run's own.
    """
    target = adam.curve.losses[-1]
    adam_time = adam.train_time if run.adam_time is None else run.adam_time
    reach = run.curve.time_to(target)
    reach_epochs = run.curve.epochs_to(target)
    return {
        "task": run.task,
        "method": run.method,
        "config": run.config,
        "seed": run.seed,
        "tuned_choice": tuned,
        "final_loss": run.final_loss,
        "adam_final_loss": target,
        "loss_at_adam_time": run.curve.loss_at(adam_time),
        "time_to_adam_ratio": None if reach is None else reach / adam_time,
        "epochs_to_adam_ratio": (
            None if reach_epochs is None else reach_epochs / adam.curve.epochs[-1]
        ),
        "step_time_ratio": run.step_time / (adam_time / max(adam.steps, 1)),
        "step_time_ms": 1000.0 * run.step_time,
        "train_time_s": run.train_time,
        "adam_time_s": adam_time,
        "paired": run.adam_time is not None,
        "steps": run.steps,
        "diverged": run.diverged,
        "stopped_at_time_cap": run.stopped,
        "skipped_steps": run.skipped_steps,
        "kl_clipped_steps": run.clipped_steps,
        "curve": {
            "time_s": [round(t, 4) for t in run.curve.times],
            "epoch": [round(e, 4) for e in run.curve.epochs],
            "loss": [float(f"{v:.6g}") if math.isfinite(v) else None for v in run.curve.losses],
        },
    }


def compare(
    task: Task,
    methods: Sequence[Method],
    seeds: Sequence[int],
    baselines: Sequence[Method],
    show_progress: bool,
) -> list[dict[str, Any]]:
    """All runs of one task: the baseline grids first, then ``methods`` against tuned Adam."""
    total = len(seeds) * (len(baselines) + len(methods))
    bar = iter(progress(range(total), total, task.name, show_progress))
    base: list[Run] = []
    for seed, method in itertools.product(seeds, baselines):
        base.append(train(task, method, seed, None))
        next(bar, None)
    adam_runs = [r for r in base if r.method == "adam"]
    adam_config = best_of(adam_runs)
    tuned = {r.seed: r for r in adam_runs if r.config == adam_config}
    names = {r.method for r in base}
    choices = {name: best_of([r for r in base if r.method == name]) for name in names}
    records = [record(r, tuned[r.seed], choices.get(r.method) == r.config) for r in base]
    tuned_adam = next(m for m in baselines if m.name == "adam" and m.config == adam_config)
    for seed, method in itertools.product(seeds, methods):
        cap = TIME_CAP * tuned[seed].train_time
        paired = tuned_adam if paired_run(method) else None
        records.append(record(train(task, method, seed, cap, paired), tuned[seed], False))
        next(bar, None)
    return records


# -- report -----------------------------------------------------------------------------

BARS = {"kfac": 0.6, "ekfac": 0.8, "kpsvd": 0.8}
"""Default methods and the median time-to-Adam ratio each must meet on 4 of 5 tasks."""

CONFIGURABLE = ("kfac", "ekfac", "kpsvd")
"""The methods whose optimizer arguments the command line changes (``--kfac``, ...)."""

PAIRED = frozenset((method, "default") for method in BARS)
"""The (method, config) runs of the defaults timed against tuned Adam stepped alongside them."""


def paired_run(method: Method) -> bool:
    """Whether ``method`` trains with tuned Adam alongside: ``PAIRED``, or a command-line config.

    The configs of ``--kfac``, ``--ekfac`` and ``--kpsvd`` are what a run
    compares with the defaults, so they are timed the same way.
    """
    return method.paired or (method.name, method.config) in PAIRED


def _spread(values: Sequence[float | None], digits: str = ".3g") -> str:
    got = sorted(v for v in values if v is not None)
    if not got:
        return "—"
    mid = statistics.median(got)
    text = f"{mid:{digits}}"
    if len(got) > 1:
        text += f" [{got[0]:{digits}}–{got[-1]:{digits}}]"
    missing = len(values) - len(got)
    return text + (f" ({missing} none)" if missing else "")


def rows_of(records: Sequence[dict[str, Any]]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """Runs grouped by (method, config) in the order they ran, baselines as tuned choices only."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r["method"] in ("adam", "sgd") and not r["tuned_choice"]:
            continue
        groups.setdefault((r["method"], r["config"]), []).append(r)
    return [(m, c, rs) for (m, c), rs in groups.items()]


def ratio_median(runs: Sequence[dict[str, Any]]) -> float:
    """Median time-to-Adam ratio over seeds; a seed that never got there counts as inf."""
    values = [
        math.inf if r["time_to_adam_ratio"] is None else r["time_to_adam_ratio"] for r in runs
    ]
    return statistics.median(values)


def bar_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per default method: median time-to-Adam ratio per task, tasks within its bar, divergences."""
    out: dict[str, Any] = {}
    tasks = list(dict.fromkeys(r["task"] for r in records))
    for method, bar in BARS.items():
        per_task: dict[str, float | None] = {}
        epochs: dict[str, float | None] = {}
        diverged = 0
        for task in tasks:
            runs = [r for r in records if r["task"] == task and r["method"] == method
                    and r["config"] == "default"]  # fmt: skip
            if runs:
                ratio = ratio_median(runs)
                per_task[task] = None if math.isinf(ratio) else ratio
                reached = [r.get("epochs_to_adam_ratio") for r in runs]
                median_epochs = statistics.median(math.inf if e is None else e for e in reached)
                epochs[task] = None if math.isinf(median_epochs) else median_epochs
                diverged += sum(r["diverged"] for r in runs)
        if per_task:
            met = sum(v is not None and v <= bar for v in per_task.values())
            out[method] = {
                "bar": bar, "median_time_to_adam_ratio": per_task,
                "median_epochs_to_adam_ratio": epochs, "tasks_within_bar": met,
                "tasks": len(per_task), "diverged_runs": diverged,
            }  # fmt: skip
    return out


def _same(run: dict[str, Any], other: dict[str, Any]) -> bool:
    return run["method"] == other["method"] and run["config"] == other["config"]


def _paired_note(runs: Sequence[dict[str, Any]]) -> str:
    """The sentence on which rows were timed against Adam stepped alongside them, if any."""
    paired = sorted({r["method"] for r in runs if r.get("paired")})
    if not paired:
        return ""
    return (
        f" For the defaults of {', '.join(paired)}, Adam's wall time is that of tuned Adam "
        "trained alongside the run (the same weights and batches, one Adam step after each of "
        "the run's, on its own clock), so that both clocks see the same load of the machine; "
        "the other rows divide by tuned Adam's own run."
    )


def render(payload: dict[str, Any], descriptions: dict[str, str]) -> str:
    m = payload["machine"]
    lines = [
        f"Measured on {m['date'][:10]} at commit `{payload['commit']}` on {cpu_line(m)} "
        f"({m['torch_threads']} torch threads), torch {m['torch']}, with "
        f"`{payload['command']}`; seeds {', '.join(map(str, payload['seeds']))}. "
        "Figures are medians over seeds, with [min–max]; *time to Adam* is the wall time to "
        "reach tuned Adam's final loss divided by Adam's wall time (— or *none*: not reached "
        f"within {TIME_CAP:g}x Adam's time or the epochs); *epochs to Adam* the same in "
        "epochs, which does not depend on the machine's load; *step* is the time per step "
        "divided by Adam's." + _paired_note(payload["runs"]),
        "",
        "| method | bar (tuned Adam's loss in at most) | tasks within | median time to Adam "
        "per task | median epochs to Adam | diverged runs |",
        "|---|---|---|---|---|---|",
    ]
    for method, s in payload["bar"].items():
        per = ", ".join(
            f"{t}: {'—' if v is None else f'{v:.2f}'}"
            for t, v in s["median_time_to_adam_ratio"].items()
        )
        epochs = ", ".join(
            "—" if v is None else f"{v:.2f}"
            for v in s.get("median_epochs_to_adam_ratio", {}).values()
        )
        lines.append(
            f"| {method} (defaults) | {s['bar']}x Adam's time | {s['tasks_within_bar']} of "
            f"{s['tasks']} | {per} | {epochs or '—'} | {s['diverged_runs']} |"
        )
    for task in payload["tasks"]:
        recs = [r for r in payload["runs"] if r["task"] == task]
        adam = next(r for r in recs if r["method"] == "adam" and r["tuned_choice"])
        lines += [
            "",
            f"### {task}",
            "",
            f"{descriptions.get(task, '')}. Tuned Adam: {adam['config']}, "
            f"{_spread([r['train_time_s'] for r in recs if r is adam or _same(r, adam)])} s.",
            "",
            "| method | config | final loss | loss at Adam's time | time to Adam | "
            "epochs to Adam | step | diverged |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method, config, runs in rows_of(recs):
            label = f"{method} (tuned)" if method in ("adam", "sgd") else method
            lines.append(
                f"| {label} | {config} | {_spread([r['final_loss'] for r in runs], '.4g')} | "
                f"{_spread([r['loss_at_adam_time'] for r in runs], '.4g')} | "
                f"{_spread([r['time_to_adam_ratio'] for r in runs], '.2f')} | "
                f"{_spread([r.get('epochs_to_adam_ratio') for r in runs], '.2f')} | "
                f"{_spread([r['step_time_ratio'] for r in runs], '.2f')} | "
                f"{sum(r['diverged'] for r in runs)} of {len(runs)} |"
            )
        lines += ["", f"![{task}](convergence_{task}.png)"]
    return "\n".join(lines) + "\n"


def plot(task: str, records: Sequence[dict[str, Any]], path: Path) -> None:
    """Loss against wall time and against epochs: the first seed of every default and tuned run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    seed = min(r["seed"] for r in records)
    for r in records:
        shown = r["tuned_choice"] or r["config"] == "default"
        if r["seed"] != seed or not shown:
            continue
        curve = r["curve"]
        label = f"{r['method']} {r['config']}" if r["method"] in ("adam", "sgd") else r["method"]
        style = "--" if r["method"] in ("adam", "sgd") else "-"
        loss = [math.nan if v is None else v for v in curve["loss"]]
        left.plot(curve["time_s"], loss, style, label=label)
        right.plot(curve["epoch"], loss, style, label=label)
    adam = next(
        r for r in records if r["method"] == "adam" and r["tuned_choice"] and r["seed"] == seed
    )
    for ax in (left, right):
        ax.axhline(adam["adam_final_loss"], color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    left.set_xlim(0, TIME_CAP * adam["train_time_s"])
    left.set_xlabel("training wall time (s)")
    right.set_xlabel("epoch")
    left.set_ylabel("training loss")
    right.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{task} (seed {seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- command line -----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="short budgets, one seed, fewer methods"
    )
    parser.add_argument("--tasks", default=None, help=f"comma-separated subset of {list(TASKS)}")
    choices = ["adam", "sgd", *APPROXIMATIONS, *TWO_LEVEL, "kfac-grid", "kfac-ablations"]
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {choices}")
    parser.add_argument(
        "--kfac", action="append", default=[], metavar="KEY=VALUE,...",
        help="also KFAC with these optimizer arguments changed, e.g. --kfac kl_clip=1e-2 "
        "--kfac momentum=0.9,t_cov=5, or the approximation's with the prefix approx. "
        "(--kfac approx.decay=0.9) (repeatable; each is one config, timed like the "
        "defaults against tuned Adam alongside)",
    )  # fmt: skip
    for name in CONFIGURABLE[1:]:
        parser.add_argument(
            f"--{name}", action="append", default=[], metavar="KEY=VALUE,...",
            help=f"also {name.upper()} with these arguments changed, as --kfac",
        )  # fmt: skip
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    parser.add_argument(
        "--data-root", type=Path, default=None,
        help="adds MNIST and Fashion-MNIST autoencoders when their files are there",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"output folder (default {DEFAULT_OUT})"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--render", action="store_true",
        help="rewrite the markdown from the JSON in --out without training (ratios that the "
        "stored curves determine and the JSON lacks are filled in)",
    )  # fmt: skip
    return parser.parse_args(argv)


def rerender(out: Path) -> dict[str, Any]:
    """``--render``: the report of a stored run, with the ratios its curves determine filled in."""
    payload = json.loads((out / "convergence.json").read_text())
    tuned = {
        (a["task"], a["seed"]): a
        for a in payload["runs"]
        if a["method"] == "adam" and a["tuned_choice"]
    }
    for r in payload["runs"]:
        if "epochs_to_adam_ratio" not in r:
            losses = [math.inf if v is None else v for v in r["curve"]["loss"]]
            adam = tuned[r["task"], r["seed"]]
            reach = first_reach(losses, r["curve"]["epoch"], r["adam_final_loss"])
            r["epochs_to_adam_ratio"] = (
                None if reach is None else reach / adam["curve"]["epoch"][-1]
            )
    payload["bar"] = bar_summary(payload["runs"])
    descriptions = {
        name: TASKS[name](False).description for name in payload["tasks"] if name in TASKS
    }
    write_json(out / "convergence.json", payload)
    (out / "convergence.md").write_text(render(payload, descriptions))
    return payload


def plan(args: argparse.Namespace) -> tuple[list[Task], list[Method], list[Method], list[int]]:
    quick = args.quick
    names = args.tasks.split(",") if args.tasks else list(TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise SystemExit(f"Unknown tasks {unknown}; choose from {list(TASKS)}.")
    tasks = [TASKS[n](quick) for n in names]
    if args.data_root is not None and not args.tasks:
        from data import DataNotFoundError

        for name in ("mnist", "fashion-mnist"):
            try:
                tasks.append(mnist_ae_task(args.data_root, name, quick))
            except DataNotFoundError as err:
                print(f"skipping {name}: {err}", file=sys.stderr)
    default_methods = ["adam", "sgd", *APPROXIMATIONS, "kfac-grid", "kfac-ablations"]
    if quick:
        default_methods = ["adam", "sgd", "kfac", "ekfac", "kpsvd", "diag"]
    chosen = args.methods.split(",") if args.methods else default_methods
    known = {"adam", "sgd", *APPROXIMATIONS, *TWO_LEVEL, "kfac-grid", "kfac-ablations"}
    if set(chosen) - known or "adam" not in chosen:
        raise SystemExit(f"--methods must include adam and be a subset of {sorted(known)}.")
    baselines = [adam(lr) for lr in ADAM_LRS]
    if "sgd" in chosen:
        baselines += [sgd(lr) for lr in SGD_LRS]
    methods = [curvature(name) for name in (*APPROXIMATIONS, *TWO_LEVEL) if name in chosen]
    if "kfac-grid" in chosen:
        methods += kfac_grid()
    if "kfac-ablations" in chosen:
        methods += kfac_ablations()
    methods += [method_config(name, text) for name in CONFIGURABLE for text in getattr(args, name)]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [0] if quick else list(SEEDS)
    return tasks, baselines, methods, seeds


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        return rerender(args.out or DEFAULT_OUT)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        tasks, baselines, methods, seeds = plan(args)
        measured_commit = commit()
        started = time.perf_counter()
        records: list[dict[str, Any]] = []
        for task in tasks:
            records += compare(task, methods, seeds, baselines, not args.no_progress)
        payload: dict[str, Any] = {
            "command": command(argv), "commit": measured_commit, "machine": machine(),
            "seeds": seeds, "tasks": [t.name for t in tasks],
            "adam_lrs": list(ADAM_LRS), "sgd_lrs": list(SGD_LRS), "time_cap": TIME_CAP,
            "wall_time_s": time.perf_counter() - started,
            "bar": bar_summary(records), "runs": records,
        }  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    out = args.out or DEFAULT_OUT
    write_json(out / "convergence.json", payload)
    (out / "convergence.md").write_text(render(payload, {t.name: t.description for t in tasks}))
    for task in tasks:
        png = out / f"convergence_{task.name}.png"
        plot(task.name, [r for r in records if r["task"] == task.name], png)
        if args.out is None:
            shutil.copy(png, DOCS_RESULTS / png.name)
    print((out / "convergence.md").read_text())
    return payload


if __name__ == "__main__":
    main()
