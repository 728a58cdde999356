r"""The library defaults of the optimizer, in one place.

``PreconditionedOptimizer(model, approx, loss_fn=loss_fn)`` trains with these
values; every one of them can be overridden by keyword. They were chosen on the
time-to-loss benchmark (`benchmarks/convergence.py`, results in the docs under
"Convergence"): several tasks at once (tanh and ReLU autoencoders, an MLP and a
CNN classifier, a convolutional autoencoder), judged by the wall time to reach
tuned Adam's final loss, never by one tuned run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from curvlib.optim.hyper import DampingWarmup

KLClip: TypeAlias = float | Literal["default"] | None
"""A KL-clipping bound $c$, ``"default"`` (``default_kl_clip``) or ``None`` (no clip)."""

MaxMove: TypeAlias = float | Literal["default"] | None
r"""A bound $\rho$ on each layer's step, ``"default"`` (``default_max_move``) or ``None`` (none)."""


@dataclass(frozen=True)
class OptimizerDefaults:
    r"""Default hyper-parameters of [`CurvatureOptimizer`][curvlib.optim.CurvatureOptimizer].

    Attributes:
        lr: Learning rate $\eta$.
        damping: Tikhonov damping $\lambda$ of $(C + \lambda I)^{-1}$: $3\cdot10^{-4}$,
            multiplied by $400/n$ while the statistics have seen $n < 400$
            samples ([`DampingWarmup`][curvlib.optim.DampingWarmup]); an
            approximation may name its own $\lambda$ or warm-up
            ([`default_damping`][curvlib.optim.defaults.default_damping]).
        kl_clip: KL-clipping bound $c$; an approximation may name its own
            ([`default_kl_clip`][curvlib.optim.defaults.default_kl_clip]).
        momentum: Momentum $\mu$ on the clipped preconditioned direction.
        max_move: Largest step of a curvature layer's weights, as a fraction of
            their norm (the optimizer's ``max_move``); an approximation may name
            its own ([`default_max_move`][curvlib.optim.defaults.default_max_move]).
            The KL clip measures steps in the approximation's metric, which
            along the step was up to 15,811 times flatter than the exact GGN on
            the examples' CNN, whose steps then moved some layers by 10–30% of
            their weights and left seeds 1 and 3 of five at chance level; with
            0.2 every seed trains, and KFAC needs as many epochs to tuned Adam's
            loss on the convergence benchmark as without it, at 2–5% more per step.
        t_cov: Steps between statistics updates.
        t_inv: Steps between inverse rebuilds; an approximation may name its
            own ([`default_t_inv`][curvlib.optim.defaults.default_t_inv]).
        stats_fraction: Fraction of each batch the statistics use (half: fewer
            epochs to tuned Adam's loss than a quarter on all five tasks of the
            convergence benchmark, at the cost of a larger extra backward pass).
        refresh_on_move: Statistics and inverses also on any step where some
            layer's weights have moved by this fraction of their norm since the
            last statistics: off by default. With 0.3 and ``warmup=3`` KFAC
            needed fewer epochs to tuned Adam's loss on CURVES and the
            autoencoders of the convergence benchmark, but the classifiers,
            once their training loss nears zero, refresh every few steps and
            some end above tuned Adam's loss (the gallery's MLP on two seeds of
            four, the benchmark's CNN on one of three).
        warmup: Statistics and inverses also at the steps before it that are
            powers of two (0, 1, 2, 4, 8): the curvature of the initial weights
            goes stale fastest. Without the refresh at step 8 (``warmup=5``)
            CURVES needs fewer epochs, but the examples' CNN stalls near chance
            level (test accuracy 0.31 against 0.85 after three epochs).
    """

    lr: float = 0.1
    damping: DampingWarmup = DampingWarmup(3e-4, samples=400)  # noqa: RUF009 (frozen)
    kl_clip: float = 3e-3
    momentum: float = 0.5
    max_move: float | None = 0.2
    t_cov: int = 10
    t_inv: int = 10
    stats_fraction: float = 0.5
    refresh_on_move: float = 0.0
    warmup: int = 10


DEFAULTS = OptimizerDefaults()
"""The values ``PreconditionedOptimizer`` uses for every argument not given."""


def default_damping(approx: object) -> DampingWarmup:
    r"""The damping of a group whose approximation is ``approx`` when no ``damping`` is given.

    An approximation whose damping acts unlike KFAC's may name its own
    $\lambda$ in the class attribute ``default_damping`` (a positive number);
    the default is then ``DampingWarmup(approx.default_damping,
    samples=DEFAULTS.damping.samples)``: its own $\lambda$ with the library's
    warm-up, which depends on the samples the statistics have seen, not on the
    approximation. [`Diagonal`][curvlib.approx.Diagonal] does (its
    $\lambda$ is the whole shift of every coordinate). An approximation may
    also lengthen the warm-up with the class attribute
    ``default_damping_samples`` (a non-negative int):
    [`TwoLevel`][curvlib.approx.TwoLevel] does (its coarse matrix needs more
    samples than the fine level before the damping reaches its floor). Every other
    approximation gets ``DEFAULTS.damping``. A ``damping`` given to the optimizer
    or to a group always wins.

    Args:
        approx: A curvature approximation.

    Returns:
        The damping rule described above.

    Raises:
        ValueError: If ``default_damping`` is set but not a positive number, or
            ``default_damping_samples`` is set but not a non-negative int.
    """
    value = _own(approx, "default_damping", DEFAULTS.damping.damping, _POSITIVE_NUMBER,
                 "its damping when none is given")  # fmt: skip
    samples = _own(approx, "default_damping_samples", DEFAULTS.damping.samples,
                   _NON_NEGATIVE_INT, "the samples its damping's warm-up lasts")  # fmt: skip
    return DampingWarmup(float(value), samples=samples)


def default_kl_clip(approx: object) -> float:
    r"""The KL clip of an optimizer whose approximation is ``approx`` when no ``kl_clip`` is given.

    An approximation whose steps need another bound than KFAC's may name its own
    $c$ in the class attribute ``default_kl_clip`` (a positive number);
    [`EKFAC`][curvlib.approx.EKFAC] does. Every other approximation gets
    ``DEFAULTS.kl_clip``. The clip bounds the whole step, so the optimizer takes
    the default of its ``approx``, not of the approximations of its ``groups``.
    A ``kl_clip`` given to the optimizer (``None`` included) always wins.

    Args:
        approx: A curvature approximation.

    Returns:
        The bound described above.

    Raises:
        ValueError: If ``default_kl_clip`` is set but not a positive number.
    """
    value = _own(approx, "default_kl_clip", DEFAULTS.kl_clip, _POSITIVE_NUMBER,
                 "its KL clip when none is given")  # fmt: skip
    return float(value)


def default_max_move(approx: object) -> float | None:
    r"""The ``max_move`` of an optimizer whose approximation is ``approx`` when none is given.

    An approximation whose steps the bound would shorten where they should not
    may name its own $\rho$, or ``None`` for no bound, in the class attribute
    ``default_max_move``; [`KPSVD`][curvlib.approx.KPSVD] names ``None``. Every
    other approximation gets ``DEFAULTS.max_move``. Like the clip, the bound
    acts on the whole step, so the optimizer takes the default of its
    ``approx``. A ``max_move`` given to the optimizer (``None`` included) always wins.

    Args:
        approx: A curvature approximation.

    Returns:
        The bound described above.

    Raises:
        ValueError: If ``default_max_move`` is set but neither ``None`` nor a
            positive number.
    """
    if getattr(approx, "default_max_move", DEFAULTS.max_move) is None:
        return None
    value = _own(approx, "default_max_move", DEFAULTS.max_move, _POSITIVE_NUMBER,
                 "its bound on a layer's step when none is given")  # fmt: skip
    return float(value)


def default_t_inv(approx: object) -> int:
    r"""The steps between inverse rebuilds of a group whose approximation is ``approx``.

    Used when no ``t_inv`` is given. An approximation whose inverse costs far
    more than its statistics may name its own interval in the class attribute
    ``default_t_inv`` (a positive int); [`EKFAC`][curvlib.approx.EKFAC] does:
    its scalings are updated with every statistics step, every ``t_cov`` steps,
    and only its eigenbasis waits for ``t_inv``. Every other approximation gets
    ``DEFAULTS.t_inv``. A ``t_inv`` given to the optimizer or to a group always
    wins.

    Args:
        approx: A curvature approximation.

    Returns:
        The interval described above.

    Raises:
        ValueError: If ``default_t_inv`` is set but not a positive int.
    """
    value: int = _own(approx, "default_t_inv", DEFAULTS.t_inv, _POSITIVE_INT,
                      "its steps between inverse rebuilds when none is given")  # fmt: skip
    return value


_POSITIVE_NUMBER = ("a positive number", lambda v: isinstance(v, int | float) and v > 0.0)
_POSITIVE_INT = ("a positive int", lambda v: isinstance(v, int) and v >= 1)
_NON_NEGATIVE_INT = ("a non-negative int", lambda v: isinstance(v, int) and v >= 0)


def _own(
    approx: object,
    attribute: str,
    fallback: object,
    kind: tuple[str, Callable[[Any], bool]],
    meaning: str,
) -> Any:
    """``approx``'s class attribute ``attribute`` (``fallback`` without it), checked.

    Raises:
        ValueError: If the value is a bool or not of ``kind``, naming the attribute.
    """
    value = getattr(approx, attribute, fallback)
    name, valid = kind
    if isinstance(value, bool) or not valid(value):
        raise ValueError(
            f"{type(approx).__name__}.{attribute} must be {name} ({meaning}), got {value!r}."
        )
    return value
