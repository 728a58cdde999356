r"""Hyper-parameters that may be constants or functions of the step, and adaptive damping."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Schedule = float | Callable[[int], float]
"""A constant, or a function of the (0-based) optimizer step."""


def resolve(value: Schedule, step: int) -> float:
    """The value of a constant or scheduled hyper-parameter at ``step``."""
    return float(value(step)) if callable(value) else float(value)


def check_positive(name: str, value: Schedule, allow_zero: bool = False) -> None:
    """Raise a ``ValueError`` naming the fix when a constant hyper-parameter is out of range."""
    if callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise TypeError(f"{name} must be a number or a callable of the step, got {value!r}.")
    if math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    if value < 0.0 or (value == 0.0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be {bound}, got {value!r}.")


@dataclass(frozen=True)
class DampingWarmup:
    r"""A damping $\lambda$ that starts high while the statistics have seen few samples.

    The damping is $\lambda \max(1, n_0 / n)$, where $n$ counts the samples of
    every statistics update accepted so far and $n_0$ is ``samples``. The
    first estimates average over a few dozen samples: along the directions no
    sample has reached yet their eigenvalues are near zero, and the small
    $\lambda$ that trains fastest once the estimate has filled in would step
    $1/\lambda$ far along them. The library default is
    ``DampingWarmup(3e-4, samples=400)``; a plain number is used as it is.

    Attributes:
        damping: $\lambda$, the damping once $n \ge n_0$.
        samples: $n_0$ (0: no warm-up).
    """

    damping: float = 3e-4
    samples: int = 400

    def __post_init__(self) -> None:
        check_positive("DampingWarmup damping", self.damping)
        if callable(self.damping):
            raise TypeError(f"DampingWarmup damping must be a number, got {self.damping!r}.")
        samples = self.samples
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise ValueError(f"DampingWarmup samples must be a non-negative int, got {samples!r}.")

    def at(self, samples_seen: int) -> float:
        r"""The damping after statistics of ``samples_seen`` samples in all."""
        return self.damping * max(1.0, self.samples / max(samples_seen, 1))


@dataclass
class LevenbergMarquardt:
    r"""Levenberg–Marquardt adaptive damping (Martens & Grosse 2015, section 6.5).

    Every ``interval`` steps the optimizer compares the actual change of the
    loss on the current batch, $h(\theta + \delta) - h(\theta)$, with the change
    its quadratic model predicts, $M(\delta) = \nabla h^\top\delta +
    \frac12\delta^\top (C + \lambda I)\delta$, and adapts $\lambda$ with
    $\rho = (h(\theta+\delta) - h(\theta)) / M(\delta)$:
    $\lambda \leftarrow \omega\lambda$ if $\rho > 3/4$ (the model is good: trust it
    more), $\lambda \leftarrow \lambda/\omega$ if $\rho < 1/4$ (or the loss rose),
    with $\omega = \text{decay}^{\text{interval}}$, kept within
    ``[min_damping, max_damping]``. It needs ``step(closure)`` on the steps it
    adapts, with a closure that returns the loss of the current batch.

    Attributes:
        initial: Starting damping $\lambda_0$.
        decay: Per-step factor $\omega_1$ (19/20 in the paper).
        interval: Steps between adaptations ($T_1$).
        min_damping: Lower bound.
        max_damping: Upper bound.
    """

    initial: float = 1e-3
    decay: float = 19.0 / 20.0
    interval: int = 5
    min_damping: float = 1e-8
    max_damping: float = 1e4

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"LevenbergMarquardt decay must lie in (0, 1), got {self.decay!r}.")
        if not 0.0 < self.min_damping <= self.initial <= self.max_damping:
            raise ValueError(
                "LevenbergMarquardt needs 0 < min_damping <= initial <= max_damping, got "
                f"{self.min_damping!r}, {self.initial!r}, {self.max_damping!r}."
            )
        if self.interval < 1:
            raise ValueError(f"LevenbergMarquardt interval must be >= 1, got {self.interval!r}.")

    def adapt(self, damping: float, ratio: float) -> float:
        """The next damping after a step with reduction ratio ``ratio``."""
        omega = self.decay**self.interval
        if math.isnan(ratio) or ratio < 0.25:
            damping = damping / omega
        elif ratio > 0.75:
            damping = damping * omega
        return min(max(damping, self.min_damping), self.max_damping)

    def state(self) -> dict[str, Any]:
        """Plain values describing the configuration (for ``state_dict``)."""
        return {
            "initial": self.initial,
            "decay": self.decay,
            "interval": self.interval,
            "min_damping": self.min_damping,
            "max_damping": self.max_damping,
        }


DampingRule = Schedule | LevenbergMarquardt | DampingWarmup
"""What ``damping=`` takes: a constant, a function of the step or one of the rule classes."""


def check_damping(name: str, value: Any) -> None:
    """Check a damping rule: a positive constant, a schedule or one of the rule classes."""
    if not isinstance(value, LevenbergMarquardt | DampingWarmup):
        check_positive(name, value)
