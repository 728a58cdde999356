r"""Shared machinery of the layer-wise (block-diagonal) approximations.

A [`LayerwiseApprox`][curvlib.approx.base.LayerwiseApprox] keeps one
[`LayerBlock`][curvlib.approx.base.LayerBlock] per curvature layer and
implements [`CurvatureApprox`][curvlib.core.protocols.CurvatureApprox] on top of
them: statistics are folded in with the running average
$C_k = \rho_k C_{k-1} + (1 - \rho_k)\, \hat C_k$,
$\rho_k = \min(1 - 1/k, \text{decay})$ (so the first update takes the
statistics as they are), and ``inverse(damping)`` builds a new operator from
the current blocks. Vectors are per-layer $[W \mid b]$ matrices
([`curvlib.core.conventions`][curvlib.core.conventions]).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from curvlib.core.stats import CurvatureStatistics, LayerStatistics, StatKind

LayerInverse = Callable[[Tensor], Tensor]
"""Applies one layer's damped inverse to ``[..., out, in_aug]`` matrices."""


class NonFiniteStatisticsError(ValueError):
    """Statistics with NaN or Inf entries; the estimate was left unchanged."""


class LayerBlock(ABC):
    r"""The running estimate of one layer's curvature block.

    Args:
        out_dim: Rows of the layer's $[W \mid b]$ matrix.
        in_dim: Columns of the layer's $[W \mid b]$ matrix (bias column included).
        dtype: Storage dtype of the estimate.
    """

    def __init__(self, out_dim: int, in_dim: int, dtype: torch.dtype | None) -> None:
        self.out_dim = out_dim
        self.in_dim = in_dim
        self.dtype = dtype

    @property
    def num_params(self) -> int:
        """Size of the block, ``out_dim * in_dim``."""
        return self.out_dim * self.in_dim

    @abstractmethod
    def update(self, stats: LayerStatistics, rho: float) -> None:
        """Fold in one step's statistics with weight ``1 - rho`` on the new ones."""

    @abstractmethod
    def matvec(self, mat: Tensor) -> Tensor:
        """Multiply ``[..., out, in]`` matrices by the block $C$."""

    @abstractmethod
    def inverse(self, damping: float) -> LayerInverse:
        """A new function applying the damped inverse of the block."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values that reproduce the estimate exactly."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the estimate from ``state_dict()``."""

    def to_dense(self) -> Tensor:
        """The dense ``[P, P]`` block (row-major vectorisation), via ``matvec`` on a basis."""
        basis = torch.eye(self.num_params, dtype=self._dense_dtype(), device=self._device())
        cols = self.matvec(basis.reshape(self.num_params, self.out_dim, self.in_dim))
        return cols.reshape(self.num_params, self.num_params).T

    def damped_to_dense(self, damping: float) -> Tensor:
        r"""The dense operator whose inverse ``inverse(damping)`` applies.

        Exact Tikhonov damping, $C + \lambda I$, unless a subclass documents
        another rule (and overrides this method to state it).
        """
        dense = self.to_dense()
        return dense + damping * torch.eye(dense.shape[0], dtype=dense.dtype, device=dense.device)

    def _dense_dtype(self) -> torch.dtype:
        return self.dtype or torch.get_default_dtype()

    def _device(self) -> torch.device:
        """The device of the estimate (that of its first tensor; CPU before any update)."""
        try:
            stack: list[Any] = [self.state_dict()]
        except RuntimeError:
            return torch.device("cpu")
        while stack:
            item = stack.pop()
            if isinstance(item, Tensor):
                return item.device
            if isinstance(item, Mapping):
                stack.extend(item.values())
            elif isinstance(item, list | tuple):
                stack.extend(item)
        return torch.device("cpu")

    def _cast(self, tensor: Tensor) -> Tensor:
        return tensor if self.dtype is None else tensor.to(self.dtype)


def running_average(old: Tensor | None, new: Tensor, rho: float) -> Tensor:
    """``rho * old + (1 - rho) * new``; ``new`` when there is no ``old``."""
    if old is None:
        return new.clone()
    return old.mul(rho).add_(new, alpha=1.0 - rho)


class BlockDiagonalPreconditioner:
    r"""$(C + \lambda I)^{-1}$ of a block-diagonal approximation, one function per layer.

    Args:
        inverses: The per-layer damped inverses, keyed by layer name.
    """

    def __init__(self, inverses: Mapping[str, LayerInverse]) -> None:
        self._inverses = dict(inverses)

    @property
    def layers(self) -> tuple[str, ...]:
        """The layers this preconditioner acts on."""
        return tuple(self._inverses)

    def apply(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Multiply per-layer gradient matrices by the damped inverse.

        Raises:
            KeyError: If a layer has no block (it received no statistics yet).
        """
        missing = [name for name in grads if name not in self._inverses]
        if missing:
            raise KeyError(f"No curvature estimate for layers {missing}: update() first.")
        return {name: self._inverses[name](grad) for name, grad in grads.items()}


class LayerwiseApprox(ABC):
    r"""Base class of approximations that are block-diagonal over layers.

    Subclasses set ``required_stats`` and implement ``_make_block``.

    Args:
        decay: Upper bound of the running-average weight $\rho$ on the old estimate.
        dtype: Storage dtype of the estimates (default: that of the statistics).

    Raises:
        ValueError: If ``decay`` is outside ``[0, 1)``.
    """

    required_stats: ClassVar[frozenset[StatKind]]

    def __init__(self, decay: float = 0.95, dtype: torch.dtype | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay!r}.")
        self.decay = float(decay)
        self.dtype = dtype
        self.num_updates = 0
        self._blocks: dict[str, LayerBlock] = {}

    @abstractmethod
    def _make_block(self, out_dim: int, in_dim: int) -> LayerBlock:
        r"""A fresh block for a layer with an ``out_dim x in_dim`` $[W \mid b]$ matrix."""

    @property
    def blocks(self) -> Mapping[str, LayerBlock]:
        """The per-layer estimates, keyed by layer name."""
        return dict(self._blocks)

    def update(self, stats: CurvatureStatistics) -> None:
        """Fold one step's statistics into every layer's running estimate.

        Raises:
            NonFiniteStatisticsError: If any statistic has NaN/Inf entries; then
                nothing is changed.
            ValueError: If a statistic this approximation needs is missing.
        """
        if not stats.is_finite():
            raise NonFiniteStatisticsError(
                "Statistics contain NaN or Inf; the curvature estimate was left unchanged."
            )
        for name, layer_stats in stats.layers.items():
            self._check_has_required(name, layer_stats)
        self.num_updates += 1
        rho = min(1.0 - 1.0 / self.num_updates, self.decay)
        for name, layer_stats in stats.layers.items():
            if name not in self._blocks:
                layer = layer_stats.layer
                self._blocks[name] = self._make_block(layer.out_dim, layer.in_dim_aug)
            self._blocks[name].update(layer_stats, rho)

    def _check_has_required(self, name: str, stats: LayerStatistics) -> None:
        have = {
            StatKind.KRONECKER: stats.kronecker is not None,
            StatKind.PER_SAMPLE_IO: stats.io is not None,
            StatKind.PER_SAMPLE_GRAD: stats.grads is not None,
            StatKind.DIAGONAL: stats.diagonal is not None,
        }
        missing = [kind.name for kind in self.required_stats if not have[kind]]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs {missing} statistics for layer {name!r}; create "
                f"the extractor with stats={{{', '.join(f'StatKind.{m}' for m in missing)}}}."
            )

    def inverse(self, damping: float) -> BlockDiagonalPreconditioner:
        r"""A new operator applying $(C + \lambda I)^{-1}$ block by block.

        Raises:
            ValueError: If ``damping`` is not positive.
        """
        if not damping > 0.0:
            raise ValueError(f"damping must be positive, got {damping!r}.")
        return BlockDiagonalPreconditioner(
            {name: block.inverse(damping) for name, block in self._blocks.items()}
        )

    def matvec(self, vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Multiply per-layer matrices by $C$."""
        return {name: self._block(name).matvec(mat) for name, mat in vectors.items()}

    def to_dense(self, layer: str) -> Tensor:
        """The dense block of one layer (row-major vectorisation)."""
        return self._block(layer).to_dense()

    def damped_to_dense(self, layer: str, damping: float) -> Tensor:
        """The dense operator of one layer whose inverse ``inverse(damping)`` applies."""
        return self._block(layer).damped_to_dense(damping)

    def _block(self, name: str) -> LayerBlock:
        if name not in self._blocks:
            raise KeyError(f"No curvature estimate for layer {name!r}: update() first.")
        return self._blocks[name]

    def state_dict(self) -> dict[str, Any]:
        """Counters and per-layer estimates: tensors and plain values only."""
        return {
            "num_updates": self.num_updates,
            "blocks": {
                name: {"shape": [b.out_dim, b.in_dim], "state": b.state_dict()}
                for name, b in self._blocks.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counters and estimates saved by ``state_dict()``."""
        blocks: dict[str, LayerBlock] = {}
        for name, entry in state["blocks"].items():
            out_dim, in_dim = entry["shape"]
            block = self._make_block(int(out_dim), int(in_dim))
            block.load_state_dict(entry["state"])
            blocks[name] = block
        self._blocks = blocks
        self.num_updates = int(state["num_updates"])
