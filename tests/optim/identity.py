"""An identity approximation (C = 0, so the preconditioner is 1/damping) for optimizer tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor

from curvlib.core import CurvatureStatistics, StatKind


class _Scaled:
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def apply(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {name: self.factor * g for name, g in grads.items()}


class ZeroCurvature:
    r"""$C = 0$: the damped inverse is $I / \\lambda$, so damping 1 gives plain SGD."""

    required_stats: ClassVar[frozenset[StatKind]] = frozenset({StatKind.KRONECKER})

    def __init__(self) -> None:
        self.num_updates = 0

    def update(self, stats: CurvatureStatistics) -> None:
        self.num_updates += 1

    def inverse(self, damping: float) -> _Scaled:
        return _Scaled(1.0 / damping)

    def matvec(self, vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {name: 0.0 * v for name, v in vectors.items()}

    def to_dense(self, layer: str) -> Tensor:
        raise NotImplementedError("not needed by the optimizer tests")

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
