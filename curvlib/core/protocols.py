r"""The three interfaces that connect the layers of curvlib.

* An [`Extractor`][curvlib.core.protocols.Extractor] runs the curvature
  backward and hands out [`CurvatureStatistics`][curvlib.core.stats.CurvatureStatistics].
* A [`CurvatureApprox`][curvlib.core.protocols.CurvatureApprox] folds statistics
  into an estimate $C \approx F$ and builds damped inverses.
* A [`Preconditioner`][curvlib.core.protocols.Preconditioner] is such an inverse:
  an operator that maps gradients to update directions.
* Optionally, an extractor also offers
  [`CurvatureProducts`][curvlib.core.protocols.CurvatureProducts]: exact
  curvature products on the last batch (adaptive learning rate and momentum).

Vectors are dictionaries from layer name to $[W \mid b]$ matrices
(``[out, in_aug]``), the layout of
[`curvlib.core.conventions`][curvlib.core.conventions].
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from torch import Generator, Tensor

from curvlib.core.layout import ModelLayout
from curvlib.core.stats import CurvatureStatistics, FisherType, StatKind

LayerTensors = Mapping[str, Tensor]
r"""Per-layer $[W \mid b]$ matrices keyed by layer name."""


@runtime_checkable
class Extractor(Protocol):
    """Computes curvature statistics during a model's backward pass."""

    @property
    def layout(self) -> ModelLayout:
        """The curvature layers statistics are computed for."""
        ...

    @property
    def fisher_type(self) -> FisherType:
        """The flavour of the statistics."""
        ...

    def collect(self) -> AbstractContextManager[Any]:
        """Context in which one forward and backward pass records statistics."""
        ...

    def statistics(self) -> CurvatureStatistics:
        """The statistics recorded by the last completed ``collect()`` block."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Random state (MC targets, sub-batches) for exact resumption."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by ``state_dict``, all or nothing (owners rely on it)."""
        ...


@runtime_checkable
class CurvatureProducts(Protocol):
    r"""Optional extractor capability: the exact GGN of the batch loss on a few directions.

    What the adaptive learning rate and momentum of the optimizer need
    ([`curvlib.optim.adaptive`][curvlib.optim.adaptive]).
    [`CurvatureExtractor`][curvlib.extract.CurvatureExtractor] implements it
    with one Jacobian-vector product per direction.
    """

    def capture(self) -> AbstractContextManager[Any]:
        """Context in which the forward pass of a step is kept for ``ggn_gram``."""
        ...

    def ggn_gram(self, directions: Sequence[LayerTensors]) -> Tensor:
        r"""$[d_i^\top \mathcal G d_j]_{ij}$, $\mathcal G$ the GGN of the loss as computed.

        $\mathcal G = J^\top H_L J$ on the batch of the last ``capture()`` block,
        with $H_L$ the output Hessian of the batch loss itself (``mean``
        reduction included), at the current parameters.
        """
        ...


@runtime_checkable
class Preconditioner(Protocol):
    r"""A linear operator $P = (C + \lambda I)^{-1}$ on per-layer matrices."""

    def apply(self, grads: LayerTensors) -> dict[str, Tensor]:
        """Multiply per-layer gradient matrices by $P$."""
        ...


class AheadInverse(Protocol):
    """Optional: an inverse built before the numbers that check it are read.

    An approximation may offer ``inverse_ahead(damping) -> AheadInverse | None``
    ([`LayerwiseApprox.inverse_ahead`][curvlib.approx.base.LayerwiseApprox.inverse_ahead]):
    the preconditioner ``inverse(damping)`` would return, built without a host
    read, with the checks it needs (e.g. each Cholesky factorisation's ``info``)
    left on the device in ``numbers``. The optimizer reads them with the
    directions' measurements, so that a statistics step on a GPU waits once
    less, and passes their values to ``settle``.
    """

    @property
    def preconditioner(self) -> Preconditioner:
        """Usable at once; equal to ``inverse(damping)``'s where ``settle`` accepts."""
        ...

    @property
    def numbers(self) -> Tensor:
        """A 1-D float64 tensor on the device: the checks, unread."""
        ...

    def settle(self, values: list[float]) -> bool:
        """Whether ``preconditioner`` stands, given the values of ``numbers``.

        ``False`` where it failed: it must not be used, and ``inverse`` is to be
        called instead.
        """
        ...


@runtime_checkable
class CurvatureApprox(Protocol):
    r"""An approximation $C \approx F$ built from curvature statistics.

    The steps are separate: ``update`` folds in statistics, ``inverse`` builds a
    new damped-inverse operator (never a cache that can go stale), ``matvec``
    multiplies by $C$ and ``to_dense`` returns a layer's block as a matrix.

    An approximation may also set the class attributes ``default_damping`` (a
    positive number) and ``default_damping_samples`` (a non-negative int): the
    optimizer then damps it with that $\lambda$, or warms the damping up over
    that many samples, when no ``damping`` is given
    ([`default_damping`][curvlib.optim.defaults.default_damping]); likewise
    ``default_kl_clip`` (a positive number,
    [`default_kl_clip`][curvlib.optim.defaults.default_kl_clip]) and
    ``default_t_inv`` (a positive int,
    [`default_t_inv`][curvlib.optim.defaults.default_t_inv]).
    """

    @property
    def required_stats(self) -> frozenset[StatKind]:
        """The statistics this approximation needs; the extractor computes nothing else."""
        ...

    def update(self, stats: CurvatureStatistics) -> None:
        """Fold one step's statistics into the running estimate.

        If it raises, the estimate must be as it was before the call (the
        optimizer then skips the update and keeps its preconditioner).
        """
        ...

    def inverse(self, damping: float) -> Preconditioner:
        r"""A new operator applying $(C + \lambda I)^{-1}$ with $\lambda$ = ``damping``."""
        ...

    def matvec(self, vectors: LayerTensors) -> dict[str, Tensor]:
        """Multiply per-layer matrices by $C$."""
        ...

    def to_dense(self, layer: str) -> Tensor:
        """The dense ``[P, P]`` block of one layer (row-major vectorisation)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values that reproduce the estimate exactly."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the estimate from ``state_dict()``.

        Raise a ``ValueError`` for a state another approximation wrote (the
        built-in ones compare the record of
        [`curvlib.core.checkpoint`][curvlib.core.checkpoint]). The curvature
        engine loads into a copy first, so a failure here changes no optimizer.
        """
        ...


def check_approx(approx: object, name: str = "approx") -> None:
    """Raise a ``TypeError`` naming the fix unless ``approx`` is an approximation *instance*.

    A class such as ``KFAC`` passes the protocol check (it has the methods) but
    fails at the first update; ``KFAC()`` is meant.
    """
    if isinstance(approx, type):
        raise TypeError(
            f"{name} must be an approximation object, got the class {approx.__name__}: "
            f"write {approx.__name__}() (with its settings, e.g. {approx.__name__}(decay=0.95))."
        )
    if not isinstance(approx, CurvatureApprox):
        raise TypeError(
            f"{name} must be a curvature approximation such as KFAC(), got {type(approx).__name__}."
        )


@runtime_checkable
class RefreshableApprox(CurvatureApprox, Protocol):
    r"""An approximation with an expensive part and a cheap part on two time scales.

    EKFAC is the example: its eigenbasis costs two eigendecompositions, its
    scalings only a projection of the statistics. The optimizer's engine calls
    ``refresh()`` on the steps where an inverse is due, *before* that step's
    ``update`` (so the step's statistics are the first ones folded in after the
    refresh), and, because ``inverse`` is then cheap, rebuilds the inverse
    after *every* update, so the scalings of every statistics step reach the
    preconditioner at once.
    """

    def refresh(self) -> None:
        """Recompute the expensive part from the running statistics, for the next ``update``.

        The estimate (``matvec``, ``inverse``) may keep its current form until
        the next ``update`` switches to the refreshed part; a failure leaves the
        approximation as it was.
        """
        ...


@runtime_checkable
class CurvatureOperator(Protocol):
    r"""Optional: a fitted approximation used as an operator, without the optimizer.

    What Laplace approximations and EWC need besides ``matvec`` and ``inverse``.
    $D(\lambda)$ is the damped operator that ``inverse(damping)`` inverts: exact
    $C + \lambda I$ or the approximation's documented damping rule (e.g. KFAC's
    $(G + \gamma_G I)\otimes(A + \gamma_A I)$). Each implementation states the
    cost of each method.
    """

    def trace(self, layer: str | None = None) -> Tensor:
        r"""$\operatorname{tr} C$ of one layer's block, or of the whole approximation."""
        ...

    def logdet(self, damping: float, layer: str | None = None) -> Tensor:
        r"""$\log\det D(\lambda)$ of one layer's block, or of the whole approximation."""
        ...

    def sample(
        self, damping: float, num_samples: int = 1, *, generator: Generator | None = None
    ) -> dict[str, Tensor]:
        r"""Draws from $\mathcal N(0, D(\lambda)^{-1})$: ``[num_samples, out, in]`` per layer."""
        ...


@runtime_checkable
class ReplicaSync(Protocol):
    r"""Optional: keeps data-parallel replicas of the curvature in agreement.

    Given to the optimizer and the curvature engine when the model trains on
    several ranks of a process group;
    [`curvlib.distributed.DataParallel`][curvlib.distributed.DataParallel]
    implements it with ``torch.distributed``. Every rank calls each method at
    the same point of the same step; afterwards every rank holds the same
    value. A group of one rank returns its inputs unchanged.
    """

    def reduce_statistics(
        self,
        stats: CurvatureStatistics,
        *,
        owners: Mapping[str, int] | None = None,
        kinds: Collection[StatKind] = (),
    ) -> CurvatureStatistics:
        """The statistics of the union of every rank's samples, on every rank.

        Except the per-sample tensors of ``kinds`` of the layers in ``owners``:
        those only the named rank receives (the owner of a split update, which
        alone reads them); the other ranks hold them with no samples.
        """
        ...

    def sync_gradients(self, params: Sequence[Tensor]) -> None:
        """Average the ``.grad`` of ``params`` over the ranks (a no-op where DDP did it)."""
        ...

    def mean(self, value: Tensor) -> Tensor:
        """The mean of ``value`` over the ranks (losses, Gram matrices)."""
        ...

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        ...

    def inverse_owners(self, costs: Mapping[str, float]) -> Mapping[str, int] | None:
        """The rank that inverts each layer, or ``None``: every rank inverts every layer."""
        ...

    @property
    def broadcast(self) -> str:
        """What the owners of a split send: ``"directions"`` on every step, or ``"inverses"``."""
        ...

    def share_directions(
        self, owned: LayerTensors, owners: Mapping[str, int], like: LayerTensors
    ) -> dict[str, Tensor]:
        """Every layer's direction on every rank, each sent by its owner.

        ``owned`` holds the directions of this rank's layers; ``like`` (the
        gradients) gives every layer's shape and dtype.
        """
        ...
