r"""What the optimizer tells its user: the per-step telemetry and the layer table.

After every step ``opt.last_stats`` is a ``dict`` built from values the step
computed anyway (no extra passes; a [`StepStats`][curvlib.optim.report.StepStats],
which reads the values a step left on the device when first used);
``on_step`` receives the same object.
Times are wall-clock seconds (``time.perf_counter``) and split one step,
defined as **the ``record()`` blocks since the previous step plus the call to
``step()``** (forward and backward pass included; anything the training loop
does outside these two, such as data loading or ``zero_grad``, is not):

* ``time_step``: the whole step as defined above;
* ``time_statistics``: ``record()`` blocks of a step where statistics are
  recorded: forward, backward and the extraction (it runs inside the
  backward, so it cannot be timed apart);
* ``time_forward_backward``: ``record()`` blocks of a step without statistics;
* ``time_update``: folding the statistics into the approximations;
* ``time_inverse``: rebuilding damped inverses (and refreshing two-time-scale
  estimates);
* ``time_precondition``: reading and checking the gradients, L2 weight decay,
  applying the inverses, the KL clip;
* ``time_adaptive``: with ``lr``/``momentum`` ``"auto"``, the Jacobian-vector
  products of the exact quadratic model and the choice of $\alpha$, $\mu$;
* ``time_parameters``: momentum and the parameter update (fallback included);
* ``time_closure``: Levenberg–Marquardt's two closure calls and quadratic model.

A time key is present only when its part ran on that step (``time_step``,
``time_precondition`` always are); the parts add up to ``time_step`` up to the
bookkeeping between them (microseconds).
"""

from __future__ import annotations

import time
from collections.abc import Callable, ItemsView, Iterator, Mapping, Sequence, ValuesView
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from curvlib.optim.engine import RECORD_TIMES
from curvlib.optim.hyper import DampingWarmup, LevenbergMarquardt

if TYPE_CHECKING:
    from curvlib.optim.deferred import DeferredStep
    from curvlib.optim.optimizer import CurvatureOptimizer

TIME_PARTS = (
    "statistics",
    "forward_backward",
    "update",
    "inverse",
    "precondition",
    "adaptive",
    "parameters",
    "closure",
)
"""The parts of ``time_step``, in the order they run."""


def read_numbers(groups: Mapping[str, Mapping[str, float | Tensor]]) -> dict[str, dict[str, float]]:
    """Per group, its numbers as floats, the device's read in one transfer per device."""
    tensors = [v for numbers in groups.values() for v in numbers.values() if isinstance(v, Tensor)]
    read: dict[int, float] = {}
    for device in dict.fromkeys(t.device for t in tensors):
        mine = [t for t in tensors if t.device == device]
        values = torch.stack([t.reshape(()).double() for t in mine]).tolist()
        read.update({id(t): v for t, v in zip(mine, values, strict=True)})
    return {
        name: {k: read[id(v)] if isinstance(v, Tensor) else float(v) for k, v in numbers.items()}
        for name, numbers in groups.items()
    }


class Unread:
    """A value of a [`StepStats`][curvlib.optim.report.StepStats] still on the device.

    Attributes:
        read: Fetches it (a host read).
    """

    __slots__ = ("read",)

    def __init__(self, read: Callable[[], Any]) -> None:
        self.read = read


class StepStats(dict[str, Any]):
    """``last_stats``: a ``dict`` whose values a step left on the device are read when used.

    A step with deferred checks ([`curvlib.optim.deferred`][curvlib.optim.deferred])
    does not know yet whether it was skipped, its KL-clip factor or the count of
    skipped steps: those three values are read (one host synchronisation, for
    every pending step at once) the first time one of them is looked at, by
    indexing, ``get``, ``items``, ``values``, ``dict(...)``, ``{**...}``,
    ``json.dumps``, ``copy`` or ``pickle``. So are the ``diagnostics`` a
    preconditioner left on the device (a two-level correction's per-step
    numbers), in a transfer of their own. The other keys never wait. Once read,
    a value is a plain number.
    """

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        if isinstance(value, Unread):
            value = value.read()
            super().__setitem__(key, value)
        return value

    def _read(self) -> None:
        for key, value in list(super().items()):
            if isinstance(value, Unread):
                super().__setitem__(key, value.read())

    def get(self, key: str, default: Any = None) -> Any:
        """``self[key]``, read if it is still on the device, or ``default``."""
        try:
            return self[key]
        except KeyError:
            return default

    def items(self) -> ItemsView[str, Any]:  # type: ignore[override]
        """The items, every value read."""
        self._read()
        return super().items()

    def values(self) -> ValuesView[Any]:  # type: ignore[override]
        """The values, every one read."""
        self._read()
        return super().values()

    def __iter__(self) -> Iterator[str]:
        # Defined here so that dict(...) and {**...} copy through __getitem__.
        return super().__iter__()

    def copy(self) -> dict[str, Any]:
        """A plain ``dict`` of the read values."""
        return dict(self.items())

    def __or__(self, other: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        return self.copy() | other

    def __ror__(self, other: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        return other | self.copy()

    def __eq__(self, other: object) -> bool:
        self._read()
        return super().__eq__(other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None

    def __repr__(self) -> str:
        self._read()
        return super().__repr__()

    def pop(self, key: str, *default: Any) -> Any:
        """As ``dict.pop``, with every value read first."""
        self._read()
        return super().pop(key, *default)

    def popitem(self) -> tuple[str, Any]:
        """As ``dict.popitem``, with every value read first."""
        self._read()
        return super().popitem()

    def setdefault(self, key: str, default: Any = None) -> Any:
        """As ``dict.setdefault``, with every value read first."""
        self._read()
        return super().setdefault(key, default)

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (self.copy(),))


def step_stats(
    opt: CurvatureOptimizer,
    start: float,
    parts: Mapping[str, float],
    nu: float | None,
    ratio: float | None,
    skipped: bool,
    adaptive: Mapping[str, float | None] | None = None,
    deferred: Callable[[], DeferredStep] | None = None,
    move_bound: float | Unread | None = None,
) -> dict[str, Any]:
    r"""The telemetry of the step that just finished.

    Args:
        opt: The optimizer (its engines have finished the step).
        start: ``time.perf_counter()`` when ``step()`` began.
        parts: Times measured by the optimizer (``record()`` blocks included).
        nu: The KL-clipping factor applied (``None`` on a skipped step).
        ratio: The Levenberg–Marquardt reduction ratio, when it was computed.
        skipped: Whether the step was skipped.
        adaptive: ``adaptive_lr``, ``adaptive_momentum`` (the chosen $\alpha$,
            $\mu$, ``None`` when fixed) and ``predicted_change`` (the quadratic
            model's $M$) under ``"auto"``; all three keys are ``None`` otherwise.
        deferred: For a step with deferred checks, the step's record once read
            (``nu`` and ``skipped`` are then ignored): ``skipped``,
            ``kl_clip_factor`` and ``skipped_steps`` are read from it when used
            ([`StepStats`][curvlib.optim.report.StepStats]).
        move_bound: The smallest layer factor of ``max_move`` on this step (1
            where no layer's step was shortened), ``None`` without ``max_move``
            or on a skipped step; an ``Unread`` one is read when used.

    Returns:
        The keys of the telemetry table in ``docs/optimizer.md``: ``step``,
        ``skipped``, ``kl_clip_factor``, ``move_bound``, ``damping`` (first group, after this
        step's LM adaptation), ``group_damping`` (every group), ``lm_ratio``,
        ``inverse_rebuilt``, ``weights_moved`` (the largest relative change of a
        layer's weights since its group's last statistics, measured at this step
        under ``refresh_on_move``), ``condition_numbers`` (layers whose inverse was
        rebuilt on this step), ``diagnostics`` (per group, the numbers its
        preconditioner reports for this step), ``adaptive_lr``, ``adaptive_momentum``,
        ``predicted_change``, the counters and the ``time_*`` split.
    """
    engines = opt.engines
    # A step with deferred checks ran every part; whether its update was refused is read later.
    skipped = skipped and deferred is None
    times = dict(parts)
    conditions: dict[str, float] = {}
    rebuilt = False
    if not skipped:
        for key in ("update", "inverse"):
            values = [engine.timings[key] for engine in engines if key in engine.timings]
            if values:
                times[key] = sum(values)
        for engine in engines:
            if engine.inverse_rebuilt:
                rebuilt = True
                conditions.update(engine.condition_numbers)
    diagnostics: Any = {}
    if not skipped:
        diagnostics = {
            g["name"]: dict(e.diagnostics) for g, e in opt.curvature_groups() if e.diagnostics
        }
        if any(isinstance(v, Tensor) for d in diagnostics.values() for v in d.values()):
            diagnostics = Unread(partial(read_numbers, diagnostics))
    for engine in engines:
        engine.timings = {}
        engine.diagnostics = {}
    total = time.perf_counter() - start + sum(times.get(k, 0.0) for k in RECORD_TIMES)
    moved = [e.last_moved for e in engines if e.last_moved is not None]
    answers: dict[str, Any] = {
        "skipped": skipped,
        "kl_clip_factor": nu,
        "skipped_steps": None if deferred is not None else opt.skipped_steps,
        "move_bound": None if skipped else move_bound,
    }
    if deferred is not None:
        answers = {
            "skipped": Unread(lambda: deferred().skipped),
            "kl_clip_factor": Unread(lambda: deferred().clip),
            "skipped_steps": Unread(lambda: deferred().skipped_steps),
            "move_bound": Unread(lambda: _move_bound(deferred())),
        }
    return StepStats({
        "step": opt.engine.step_count,
        "skipped": answers["skipped"],
        "kl_clip_factor": answers["kl_clip_factor"],
        "move_bound": answers["move_bound"],
        "damping": opt.engine.damping,
        "group_damping": {g["name"]: e.damping for g, e in opt.curvature_groups()},
        "lm_ratio": ratio,
        "inverse_rebuilt": rebuilt,
        "weights_moved": max(moved) if moved else None,
        "condition_numbers": conditions,
        "diagnostics": diagnostics,
        "adaptive_lr": None,
        "adaptive_momentum": None,
        "predicted_change": None,
        **(adaptive or {}),
        "skipped_steps": answers["skipped_steps"],
        "skipped_updates": sum(engine.skipped_updates for engine in engines),
        "inverse_failures": sum(engine.inverse_failures for engine in engines),
        "time_step": total,
        **{f"time_{k}": times[k] for k in TIME_PARTS if k in times},
    })  # fmt: skip


def _move_bound(step: DeferredStep) -> float | None:
    """A deferred step's smallest ``max_move`` factor, ``None`` where it was skipped."""
    return None if step.skipped else step.move_bound


def format_damping(rule: Any, current: float) -> str:
    """A damping rule and its current value, e.g. ``1e-03`` or ``LM 2.1e-03``."""
    if isinstance(rule, LevenbergMarquardt):
        return f"LM {current:.2g}"
    if isinstance(rule, DampingWarmup) and current > rule.damping:
        return f"warm-up {current:.2g}"
    if callable(rule):
        return f"sched. {current:.2g}"
    return f"{current:.2g}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in (header, *rows)]  # fmt: skip
    return "\n".join(lines)


def describe_optimizer(
    opt: CurvatureOptimizer,
    names: Mapping[int, str],
    unstepped: Sequence[str],
    unsupported: Sequence[str],
    other_kind: str,
) -> str:
    """The table of ``CurvatureOptimizer.describe`` (see there)."""
    flavour = opt.extractor.fisher_type.value
    header = ("layer", "kind", "parameters", "group", "approximation", "fisher", "damping",
              "t_cov/t_inv")  # fmt: skip
    rows = []
    for (group, engine), layers in zip(opt.curvature_groups(), opt.group_layers, strict=True):
        damping = format_damping(group["damping"], engine.damping)
        for layer in layers:
            shapes = ", ".join("x".join(map(str, p.shape)) for p in layer.parameters)
            rows.append((layer.name or "<root>", layer.kind.value, shapes, group["name"],
                         type(engine.approx).__name__, flavour, damping,
                         f"{group['t_cov']}/{group['t_inv']}"))  # fmt: skip
    lines = [format_table(header, rows)]
    for group in opt.param_groups:
        if group["kind"] != other_kind:
            continue
        lines.append(
            f"fallback step (SGD, lr {group['lr']:.2g}, momentum {group['momentum']:.2g}): "
            + ", ".join(f"{names[id(p)]} {'x'.join(map(str, p.shape))}" for p in group["params"])
        )
    if unstepped:
        lines.append("not stepped (outside params=): " + ", ".join(unstepped))
    lines.extend(f"without curvature block: {item}" for item in unsupported)
    return "\n".join(lines)
