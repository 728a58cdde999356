r"""Shared machinery of the layer-wise (block-diagonal) approximations.

A [`LayerwiseApprox`][curvlib.approx.base.LayerwiseApprox] keeps one
[`LayerBlock`][curvlib.approx.base.LayerBlock] per curvature layer and
implements [`CurvatureApprox`][curvlib.core.protocols.CurvatureApprox] on top of
them: statistics are folded in with the running average
$C_k = \rho_k C_{k-1} + (1 - \rho_k)\, \hat C_k$,
$\rho_k = \min(1 - 1/k, \text{decay})$ (so the first update takes the
statistics as they are; ``decay=1`` weighs every update by its number of samples,
the mean over a data set), and ``inverse(damping)`` builds a new operator from
the current blocks. Vectors are per-layer $[W \mid b]$ matrices
([`curvlib.core.conventions`][curvlib.core.conventions]).
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from curvlib.core.checkpoint import RECORD_KEY, check_record, writer_record
from curvlib.core.layout import CurvatureLayer, kronecker_cost
from curvlib.core.stats import CurvatureStatistics, LayerStatistics, StatKind
from curvlib.linalg.factors import FactorizationError, flush_subnormals, flush_subnormals_
from curvlib.linalg.factors import symmetrize as symmetrized
from curvlib.linalg.parallel import default_workers, run_jobs

R = TypeVar("R")
LA = TypeVar("LA", bound="LayerwiseApprox")

LayerInverse = Callable[[Tensor], Tensor]
"""Applies one layer's damped inverse to ``[..., out, in_aug]`` matrices."""


@dataclass(frozen=True)
class InverseDraft:
    """A layer inverse built on the device, up to the few numbers it needs on the host.

    [`LayerwiseApprox.inverse`][curvlib.approx.base.LayerwiseApprox.inverse]
    reads the ``numbers`` of every layer's draft in one transfer (on a GPU: one
    synchronisation for the whole preconditioner instead of several per layer)
    and passes each draft its values.

    Attributes:
        numbers: A 1-D float64 tensor on the block's device: the checks and
            telemetry the inverse needs as Python numbers (e.g. the factorisations'
            ``info``, the condition estimate's parts).
        finish: Builds the inverse from the values of ``numbers``; ``None`` when
            the draft failed (a factorisation that needs jitter), for the block's
            checked ``inverse`` to build it instead.
        ahead: Builds, without reading ``numbers``, the inverse ``finish`` would
            build, its condition estimate not yet known (NaN); returns ``None``
            where the inverse depends on the numbers (an ``"auto"`` apply dtype
            chosen by the condition number). ``None``: no such build.
        settle: For an inverse built ``ahead``, given the values of ``numbers``:
            sets its condition estimate and returns ``True``, or returns ``False``
            where ``finish`` would have returned ``None`` (the inverse is then
            not to be used).
    """

    numbers: Tensor
    finish: Callable[[list[float]], LayerInverse | None]
    ahead: Callable[[], LayerInverse | None] | None = None
    settle: Callable[[LayerInverse, list[float]], bool] | None = None

    def __post_init__(self) -> None:
        if (self.ahead is None) != (self.settle is None):
            raise ValueError("An InverseDraft takes ahead and settle together, or neither.")

    def read(self) -> LayerInverse | None:
        """``finish`` with the values of ``numbers``, read now (one host read)."""
        return self.finish(self.numbers.tolist())


def settle_condition(inverse: LayerInverse, values: list[float]) -> bool:
    """``InverseDraft.settle`` where the draft's one number is the exact condition number."""
    inverse.condition_number = values[0]  # type: ignore[attr-defined]
    return True


class AheadInverse:
    """A preconditioner built before its host numbers are read, and how to check it.

    Returned by
    [`LayerwiseApprox.inverse_ahead`][curvlib.approx.base.LayerwiseApprox.inverse_ahead]
    ([`curvlib.core.protocols.AheadInverse`][curvlib.core.protocols.AheadInverse]).
    The caller reads ``numbers`` with whatever else it reads next (the
    optimizer: with the directions' measurements, so that a statistics step
    waits for the device once less) and passes their values to ``settle``.

    Attributes:
        preconditioner: Usable at once; its condition estimates are known after
            ``settle``.
        numbers: A 1-D float64 tensor on the blocks' device, every layer's
            draft numbers.
    """

    def __init__(
        self,
        preconditioner: BlockDiagonalPreconditioner,
        numbers: Tensor,
        settle: Callable[[list[float]], bool],
    ) -> None:
        self.preconditioner, self.numbers, self._settle = preconditioner, numbers, settle

    def settle(self, values: list[float]) -> bool:
        """Check the preconditioner with the values of ``numbers``.

        Returns:
            ``True`` (its condition estimates now set), or ``False`` where a
            layer's draft failed (a factorisation that needs jitter): the
            preconditioner must not be used, and ``inverse`` is to be called
            (which retries that layer with jitter).
        """
        return self._settle(values)


class NonFiniteStatisticsError(ValueError):
    """Statistics with NaN or Inf entries; the estimate was left unchanged."""


def check_damping(damping: float) -> float:
    """Return ``damping`` as a float after checking that it is positive and finite.

    Raises:
        ValueError: If it is not.
    """
    if not 0.0 < damping < math.inf:
        raise ValueError(f"damping must be positive and finite, got {damping!r}.")
    return float(damping)


def check_sampling(num_samples: int, generator: torch.Generator | None) -> int:
    """Validate the arguments of the ``sample`` methods.

    Raises:
        ValueError: If ``num_samples`` is not a positive integer.
        TypeError: If ``generator`` is neither ``None`` nor a ``torch.Generator``.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}.")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}; "
            "create one with torch.Generator(device).manual_seed(seed)."
        )
    return num_samples


def standard_normal(
    shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Standard normal draws with the dtype and device of ``like``."""
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)


class LayerBlock(ABC):
    r"""The running estimate of one layer's curvature block.

    Args:
        out_dim: Rows of the layer's $[W \mid b]$ matrix.
        in_dim: Columns of the layer's $[W \mid b]$ matrix (bias column included).
        dtype: Storage dtype of the estimate.
    """

    cheap_condition: ClassVar[bool] = False
    """Whether ``condition_number`` costs little next to ``inverse``.

    ``LayerwiseApprox.inverse`` then calls it when it builds the preconditioner;
    otherwise (and unless the inverse carries a float ``condition_number``
    attribute) the estimate is computed on first access, from a snapshot of the
    block.
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
        """Fold in one step's statistics with weight ``1 - rho`` on the new ones.

        Assign new tensors to the estimate's attributes instead of changing its
        tensors in place: when a later layer's update fails,
        [`LayerwiseApprox.update`][curvlib.approx.base.LayerwiseApprox.update]
        restores every block from a shallow copy taken before.
        """

    @abstractmethod
    def matvec(self, mat: Tensor) -> Tensor:
        """Multiply ``[..., out, in]`` matrices by the block $C$."""

    @abstractmethod
    def inverse(self, damping: float) -> LayerInverse:
        """A new function applying the damped inverse of the block."""

    def factorisation_cost(self) -> float:
        r"""The estimated cost of building the block's inverse, in units its approximation shares.

        [`LayerwiseApprox`][curvlib.approx.base.LayerwiseApprox] schedules the
        blocks' factorisations over the CPU's threads by it
        ([`run_jobs`][curvlib.linalg.parallel.run_jobs]): a block whose
        factorisations are smaller than its shape (dead coordinates decoupled)
        says so, or a thread gets a large job while another idles. Default:
        $d_\text{out}^3 + d_\text{in}^3$.
        """
        return kronecker_cost(self.out_dim, self.in_dim)

    def draft_inverse(self, damping: float) -> InverseDraft | None:
        """``inverse(damping)`` without host reads until its ``finish``, or ``None``.

        Where ``finish`` returns an inverse it must equal what ``inverse`` would
        have returned. ``None`` (the default): this block has no draft, and
        ``inverse`` builds it.
        """
        return None

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

    # -- the block as an operator: dense fallbacks, overridden where structure allows ------

    def trace(self) -> Tensor:
        r"""$\operatorname{tr} C$ of the undamped block, a 0-d tensor.

        Default: the diagonal of ``to_dense()``, $P$ products with the block
        and $O(P^2)$ memory. Structured blocks override it.
        """
        return torch.diagonal(self.to_dense()).sum()

    def logdet(self, damping: float) -> Tensor:
        r"""$\log\det D(\lambda)$ of the damped operator that ``inverse(damping)`` inverts.

        $D(\lambda)$ is ``damped_to_dense(damping)``: $C + \lambda I$ unless the
        block documents another damping rule. Default: a Cholesky factorisation
        of the dense $P \times P$ operator, $O(P^3)$ time and $O(P^2)$ memory.

        Raises:
            FactorizationError: If the damped operator is not positive definite.
        """
        return 2.0 * torch.log(torch.diagonal(self._dense_cholesky(damping))).sum()

    def sample(
        self, damping: float, num_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""Draws from $\mathcal N(0, D(\lambda)^{-1})$, ``[num_samples, out, in]``.

        $D(\lambda)$ is ``damped_to_dense(damping)``. Default: with the dense
        Cholesky factor $D = LL^\top$, $x = L^{-\top} z$ for standard normal $z$
        (covariance $L^{-\top}L^{-1} = D^{-1}$): $O(P^3)$ once and $O(P^2)$ per
        draw, $O(P^2)$ memory.

        Every curvlib block draws its noise as one
        ``torch.randn((num_samples, out, in), generator=generator)`` and maps it
        linearly, so a seeded generator reproduces the draws exactly.
        """
        chol = self._dense_cholesky(damping)
        z = standard_normal((num_samples, self.out_dim, self.in_dim), chol, generator)
        draws: Tensor = torch.linalg.solve_triangular(
            chol.T, z.reshape(num_samples, -1).T, upper=True
        )
        return draws.T.reshape(num_samples, self.out_dim, self.in_dim)

    def condition_number(self, damping: float) -> float:
        r"""The condition number of $D(\lambda)$ = ``damped_to_dense(damping)``, or an estimate.

        Default: exact, from the eigenvalues of the dense operator, $O(P^3)$.
        Structured blocks override it with an estimate that costs little next to
        building the inverse; each documents whether it is exact or a lower bound.
        """
        values = torch.linalg.eigvalsh(self.damped_to_dense(damping))
        return float(values[-1] / values[0])

    def _dense_cholesky(self, damping: float) -> Tensor:
        damped = self.damped_to_dense(damping)
        chol, info = torch.linalg.cholesky_ex((damped + damped.T) / 2)
        if int(info) != 0:
            raise FactorizationError(
                f"The damped {damped.shape[0]}x{damped.shape[0]} block is not positive "
                "definite; increase the damping."
            )
        result: Tensor = chol
        return result

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
        """A statistic in the block's storage dtype (unchanged when ``dtype`` is ``None``).

        A hook for subclasses: call it on every statistic ``update`` stores.
        """
        return tensor if self.dtype is None else tensor.to(self.dtype)


class SplitUpdateBlock(LayerBlock):
    r"""A block whose update has an expensive part that another rank can compute.

    In data-parallel training with ``DataParallel(split_inverses=True)`` that
    part (KPSVD's power iterations, the two-term methods' singular pairs,
    EKFAC's new scalings and first eigenbasis) is computed by the layer's owner
    alone (``fit``),
    broadcast as one flat tensor, and folded in on every rank
    (``update_fitted``), so that every rank ends with the estimate ``update``
    gives in one process. ``update(stats, rho)`` must equal
    ``update_fitted(stats, rho, fit(stats, rho))`` whenever ``fit_size`` is
    not zero.
    """

    @abstractmethod
    def fit_size(self) -> int:
        """How many numbers ``fit`` returns for the next update; 0 when nothing is split."""

    @abstractmethod
    def fit_dtype(self, stats: LayerStatistics) -> torch.dtype:
        """The dtype of ``fit``'s tensor for these statistics."""

    @abstractmethod
    def fit(self, stats: LayerStatistics, rho: float) -> Tensor:
        """The expensive part of the next update, packed flat; the estimate is unchanged.

        Filled with NaN where the computation fails, so that the owner still
        sends it and every rank refuses it alike.
        """

    @abstractmethod
    def update_fitted(self, stats: LayerStatistics, rho: float, packed: Tensor) -> None:
        """``update`` with its expensive part taken from ``packed`` (a finite ``fit``)."""


class SharedInverseBlock(LayerBlock):
    r"""A block whose damped inverse packs into one flat tensor and is rebuilt from it.

    In data-parallel training with ``DataParallel(split_inverses=True,
    broadcast="inverses")`` each layer's owner builds its inverse
    (``packed_inverse``), the owners broadcast them, and every rank rebuilds
    every layer's (``unpacked_inverse``) and applies them itself on every step.
    ``unpacked_inverse(packed_inverse(damping))`` applies as ``inverse(damping)``
    does.
    """

    @abstractmethod
    def _packed_sizes(self) -> list[int]:
        """The sizes of the packed inverse's parts: its tensors', then its numbers."""

    @abstractmethod
    def _packed_parts(self, inverse: LayerInverse) -> tuple[list[Tensor], list[float]]:
        """The tensors and the numbers of ``inverse``, in the order of ``_packed_sizes``."""

    @abstractmethod
    def _estimate_like(self) -> Tensor:
        """A tensor of the estimate: the packed inverse takes its dtype and device."""

    def inverse_template(self) -> Tensor:
        """An empty flat tensor of the packed inverse's size, dtype and device."""
        return self._estimate_like().new_empty(sum(self._packed_sizes()))

    def packed_inverse(self, damping: float) -> Tensor:
        """``inverse(damping)`` packed flat (``_packed_sizes``); NaN where building it fails."""
        try:
            inverse = self.inverse(damping)
        except (RuntimeError, ValueError):
            return self.inverse_template().fill_(torch.nan)
        like = self._estimate_like()
        tensors, numbers = self._packed_parts(inverse)
        flat = [t.reshape(-1).to(like.dtype) for t in tensors]
        return torch.cat([*flat, like.new_tensor(numbers)])

    @abstractmethod
    def unpacked_inverse(self, packed: Tensor) -> LayerInverse:
        """The inverse that ``packed_inverse`` packed (a finite one)."""


class OwnerFailedError(RuntimeError):
    """A part of a split update or inverse failed on the rank that computed it."""


def check_parts(
    parts: Mapping[str, Tensor],
    like: Mapping[str, Tensor],
    what: str,
    caller: str,
    lister: str,
    failure: type[Exception] = OwnerFailedError,
) -> None:
    """Raise unless ``parts`` holds exactly ``like``'s layers, in their shapes, all finite.

    The parts that owners computed and broadcast in data-parallel training
    (fitted updates, packed inverses, eigenbases), checked before any is used.

    Args:
        parts: The received parts, by layer.
        like: The expected ones (empty tensors of the right shapes), by layer.
        what: What the parts are, for the messages (e.g. ``"fitted parts"``).
        caller: The method that checks (for the messages).
        lister: The method that lists the expected layers (for the messages).
        failure: Raised for a part that is not finite.

    Raises:
        ValueError: For other layers than ``like``'s, or parts of the wrong size.
    """
    if set(parts) != set(like):
        raise ValueError(
            f"{caller} needs the {what} of exactly the layers {lister} lists, "
            f"{sorted(like)}; got {sorted(parts)}."
        )
    wrong = [name for name, t in parts.items() if t.shape != like[name].shape]
    if wrong:
        raise ValueError(f"The {what} of layers {wrong} have the wrong size.")
    failed = [name for name, t in parts.items() if not bool(torch.isfinite(t).all())]
    if failed:
        raise failure(
            f"The {what} of layers {failed} are not finite: computing them failed on the "
            "rank that owns them."
        )


def host_values(numbers: Mapping[str, Tensor]) -> dict[str, list[float]]:
    """The values of ``numbers`` (1-D tensors), in one host transfer per device."""
    by_device: dict[torch.device, list[str]] = {}
    for name, tensor in numbers.items():
        by_device.setdefault(tensor.device, []).append(name)
    values: dict[str, list[float]] = {}
    for names in by_device.values():
        flat = torch.cat([numbers[name].to(torch.float64) for name in names]).tolist()
        start = 0
        for name in names:
            size = numbers[name].numel()
            values[name] = flat[start : start + size]
            start += size
    return values


def _condition_of(block: LayerBlock, damping: float) -> Callable[[], float]:
    return lambda: block.condition_number(damping)


def _constant(value: float) -> Callable[[], float]:
    return lambda: value


DENSE_CONDITION_LIMIT = 4096
"""Largest block whose preconditioner computes the dense fallback condition number.

A block that keeps the dense $O(P^3)$ default of ``LayerBlock.condition_number``
and has more parameters than this gets ``nan`` in ``condition_numbers`` instead
(the block's own method still computes it on request).
"""


def _dense_only(block: LayerBlock) -> bool:
    return type(block).condition_number is LayerBlock.condition_number


@contextmanager
def naming_layer(name: str) -> Iterator[None]:
    """Re-raise a failed factorisation with the name of the layer it happened in.

    Raises:
        FactorizationError: For any ``RuntimeError`` inside the block (a
            ``torch.linalg.LinAlgError`` included), its message prefixed by the layer.
    """
    try:
        yield
    except RuntimeError as err:
        raise FactorizationError(f"layer {name!r}: {err}") from err


def running_average(
    old: Tensor | None, new: Tensor, rho: float, *, symmetrize: bool = False
) -> Tensor:
    r"""``rho * old + (1 - rho) * new`` (``new`` without ``old``), subnormals flushed to zero.

    Always a new tensor: operators built from ``old`` stay valid, and ``new``
    is left as it is. ``symmetrize=True`` averages
    [`symmetrize`][curvlib.linalg.symmetrize]``(new)`` in its place (a square
    statistic symmetric only up to rounding), scaled and averaged in place:
    one new tensor where symmetrising, averaging and flushing made three, and a result
    symmetric to the bit if ``old`` is (every pass after the symmetrisation
    is elementwise on symmetric operands).
    """
    if symmetrize:
        out = symmetrized(new)
        if old is not None:
            out.mul_(1.0 - rho).add_(old, alpha=rho)
    elif old is None:
        return flush_subnormals(new)
    else:
        out = old.mul(rho).add_(new, alpha=1.0 - rho)
    # Entries that decay geometrically (a unit that stopped firing) would turn
    # subnormal and slow every later product with the estimate: flush them.
    return flush_subnormals_(out.contiguous())


@dataclass(frozen=True)
class LayerShape:
    """The matrices one layer's inverse acts on: ``[out_dim, in_dim]``, dtype and device."""

    out_dim: int
    in_dim: int
    dtype: torch.dtype
    device: torch.device


class BlockDiagonalPreconditioner:
    r"""$(C + \lambda I)^{-1}$ of a block-diagonal approximation, one function per layer.

    Returned by [`LayerwiseApprox.inverse`][curvlib.approx.base.LayerwiseApprox.inverse].
    ``apply`` (or its alias ``matvec``) multiplies per-layer matrices by the
    inverse, ``to_dense(layer)`` returns a layer's dense inverse block and
    ``condition_numbers`` the per-layer condition estimates of the damped
    operators $D_l(\lambda)$ (what each block's ``condition_number`` documents:
    exact or a lower bound).

    **Condition estimates.** A layer inverse may carry its estimate as a float
    attribute ``condition_number``, computed from the factorisation it was built
    from (the Kronecker, two-term and Woodbury inverses do, for the cost of a few
    diagonals); those are filled when the preconditioner is built. For any other
    layer, ``condition`` supplies a function, called on the first access of
    ``condition_numbers``
    ([`LayerwiseApprox.inverse`][curvlib.approx.base.LayerwiseApprox.inverse]
    passes the block's own value when ``LayerBlock.cheap_condition`` is set, and
    otherwise a deferred call on a snapshot of the block).

    Args:
        inverses: The per-layer damped inverses, keyed by layer name.
        shapes: Each layer's matrix shape, dtype and device (needed by ``to_dense``).
        condition: Functions computing the estimate of layers whose inverse has no
            ``condition_number``.
    """

    def __init__(
        self,
        inverses: Mapping[str, LayerInverse],
        shapes: Mapping[str, LayerShape] | None = None,
        condition: Mapping[str, Callable[[], float]] | None = None,
    ) -> None:
        self._inverses = dict(inverses)
        self._shapes = dict(shapes or {})
        self._conditions: dict[str, float] = {}
        for name, inverse in self._inverses.items():
            estimate = getattr(inverse, "condition_number", None)
            if isinstance(estimate, float | int) and not isinstance(estimate, bool):
                self._conditions[name] = float(estimate)
        self._pending = {
            name: fn for name, fn in (condition or {}).items() if name not in self._conditions
        }

    @property
    def layers(self) -> tuple[str, ...]:
        """The layers this preconditioner acts on."""
        return tuple(self._inverses)

    def settle_conditions(self, conditions: Mapping[str, float]) -> None:
        """Set the condition estimates of layers built ahead of them (``inverse_ahead``)."""
        self._conditions.update({name: float(value) for name, value in conditions.items()})

    @property
    def condition_numbers(self) -> dict[str, float]:
        r"""Condition estimates of the damped per-layer operators, keyed by layer name."""
        if self._pending:
            for name, fn in self._pending.items():
                self._conditions[name] = float(fn())
            self._pending = {}
        return dict(self._conditions)

    def apply(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Multiply per-layer gradient matrices by the damped inverse.

        Args:
            grads: ``[..., out, in]`` matrices for some or all layers.

        Returns:
            The products, keyed like ``grads``.

        Raises:
            KeyError: If a layer has no block (it received no statistics yet).
        """
        missing = [name for name in grads if name not in self._inverses]
        if missing:
            raise KeyError(f"No curvature estimate for layers {missing}: update() first.")
        return {name: self._inverses[name](grad) for name, grad in grads.items()}

    def apply_outer(self, layer: str, u: Tensor, v: Tensor) -> Tensor:
        r"""One layer's inverse applied to the rank-one matrices $u_k v_k^\top$, ``[c, out, in]``.

        ``u`` is ``[c, out]``, ``v`` ``[c, in]``. A Kronecker inverse
        ([`KroneckerInverse.apply_outer`][curvlib.approx.kfac.KroneckerInverse.apply_outer])
        keeps the factors apart (matrix-vector products); any other layer
        inverse is applied to the products.

        Raises:
            KeyError: If the layer has no block.
        """
        if layer not in self._inverses:
            raise KeyError(f"No curvature estimate for layer {layer!r}: update() first.")
        inverse = self._inverses[layer]
        outer = getattr(inverse, "apply_outer", None)
        if outer is not None:
            result: Tensor = outer(u, v)
            return result
        return inverse(u[:, :, None] * v[:, None, :])

    def matvec(self, vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The same as ``apply``: this operator *is* the inverse."""
        return self.apply(vectors)

    def to_dense(self, layer: str) -> Tensor:
        r"""The dense inverse block $D_l(\lambda)^{-1}$, ``[P_l, P_l]`` (row-major vectorisation).

        Applies the inverse to the $P_l$ basis matrices: $P_l$ applications and
        $O(P_l^2)$ memory, for small nets and tests.

        Raises:
            KeyError: If the layer is unknown.
            ValueError: If the preconditioner was built without the layer's shape.
        """
        if layer not in self._inverses:
            raise KeyError(f"No curvature estimate for layer {layer!r}: update() first.")
        if layer not in self._shapes:
            raise ValueError(
                f"This preconditioner was built without the shape of layer {layer!r}; "
                "pass shapes= to BlockDiagonalPreconditioner to use to_dense()."
            )
        shape = self._shapes[layer]
        size = shape.out_dim * shape.in_dim
        basis = torch.eye(size, dtype=shape.dtype, device=shape.device)
        cols = self._inverses[layer](basis.reshape(size, shape.out_dim, shape.in_dim))
        return cols.reshape(size, size).T


DEFAULT_DECAY = 0.5
r"""Default running-average weight $\rho$ on the old estimate, per update.

Per *update*, not per step: with the optimizer's default ``t_cov = 10`` it is
about $0.93$ per step, a window of roughly 20 steps; 0.95 per update would
average over roughly 200 steps, most of a short run. On the convergence
benchmark the shorter window reached Adam's loss sooner on both digit
autoencoders and later on the MLP and the CNN (its ablation row). With
``t_cov=1`` a decay of about 0.95 gives the same window.
"""


class LayerwiseApprox(ABC):
    r"""Base class of approximations that are block-diagonal over layers.

    Subclasses set ``required_stats`` and implement ``_make_block``.

    Args:
        decay: Upper bound of the running-average weight $\rho$ on the old estimate.
            ``1.0`` keeps no window: every update is weighed by its number of
            samples, so after one pass over a data set the running quantities
            (KFAC's $A$ and $G$, a diagonal) are their means over all of it, as
            a Laplace approximation or EWC needs. Methods that fit each batch
            first (KPSVD, the two-term methods) average their per-batch fits.
        dtype: Storage dtype of the estimates (default: that of the statistics).

    Attributes:
        workers: How many layers' blocks are factorised at once (inverses,
            eigenbases), each on one thread. ``None`` (the default): torch's
            intra-op threads on the CPU, one at a time on an accelerator
            ([`run_jobs`][curvlib.linalg.parallel.run_jobs] has the schedule,
            by each block's ``factorisation_cost``); ``1`` factorises one layer
            after the other on every thread.

    Raises:
        ValueError: If ``decay`` is outside ``[0, 1]``.
    """

    required_stats: ClassVar[frozenset[StatKind]]

    def __init__(self, decay: float = DEFAULT_DECAY, dtype: torch.dtype | None = None) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(
                f"decay must lie in [0, 1], got {decay!r} (1.0: the mean over all updates)."
            )
        self.decay = float(decay)
        self.dtype = dtype
        self.num_updates = 0
        self.num_samples_seen = 0
        self._blocks: dict[str, LayerBlock] = {}
        self.workers: int | None = None

    @abstractmethod
    def _make_block(self, out_dim: int, in_dim: int) -> LayerBlock:
        r"""A fresh block for a layer with an ``out_dim x in_dim`` $[W \mid b]$ matrix.

        The one hook a subclass must implement; ``update`` calls it for a layer's
        first statistics and ``load_state_dict`` for every saved block.
        """

    @property
    def blocks(self) -> Mapping[str, LayerBlock]:
        """The per-layer estimates, keyed by layer name."""
        return dict(self._blocks)

    def update(self, stats: CurvatureStatistics) -> None:
        """Fold one step's statistics into every layer's running estimate.

        All layers are updated or none: if a block's update raises (e.g. a
        factorisation that fails even with jitter), every block is restored
        and the error propagates.

        Raises:
            NonFiniteStatisticsError: If any statistic has NaN/Inf entries; then
                nothing is changed.
            ValueError: If a statistic this approximation needs is missing.
        """
        self._update_with(stats, {})

    def _check_statistics(self, stats: CurvatureStatistics) -> None:
        if not stats.is_finite():
            raise NonFiniteStatisticsError(
                "Statistics contain NaN or Inf; the curvature estimate was left unchanged."
            )
        for name, layer_stats in stats.layers.items():
            self._check_has_required(name, layer_stats)

    def _update_with(self, stats: CurvatureStatistics, fitted: Mapping[str, Tensor]) -> None:
        """``update``, with the expensive parts of the layers in ``fitted`` given."""
        self._check_statistics(stats)
        rho = self._old_weight(stats.num_samples)
        with self._all_or_none():
            # One after the other: running averages are bound by memory, and
            # updating layers concurrently measured slower.
            for name, layer_stats in stats.layers.items():
                if name not in self._blocks:
                    layer = layer_stats.layer
                    self._blocks[name] = self._make_block(layer.out_dim, layer.in_dim_aug)
                block = self._blocks[name]
                if name in fitted:
                    assert isinstance(block, SplitUpdateBlock)
                    block.update_fitted(layer_stats, rho, fitted[name])
                else:
                    block.update(layer_stats, rho)
        self.num_updates += 1
        self.num_samples_seen += stats.num_samples

    # -- an update split by layer (data-parallel training) ---------------------------------

    splits_update: ClassVar[bool] = False
    """Whether ``update`` can be split by layer: ``update_due``, ``fitted``, ``update_with``.

    In data-parallel training with ``DataParallel(split_inverses=True)`` each
    layer's owner computes the expensive part of its update (``fitted``), the
    owners broadcast them, and every rank folds all of them in
    (``update_with``): every rank ends with the estimate that ``update`` gives
    ([Distributed training](../distributed.md)). Set by the approximations
    whose blocks are [`SplitUpdateBlock`][curvlib.approx.base.SplitUpdateBlock]s.
    """

    owner_statistics: ClassVar[frozenset[StatKind]] = frozenset()
    """The per-sample kinds that a split update reads only in ``fitted``, on each layer's owner.

    ``update_with`` on every rank must not read them for the layers ``update_due``
    lists: data-parallel training then gathers those layers' samples of these
    kinds to their owners alone, and the other ranks hold them with no samples
    ([Distributed training](../distributed.md)). Empty: every rank receives
    every sample.
    """

    def _block_for(self, name: str, stats: LayerStatistics) -> LayerBlock:
        """The layer's block, or the fresh one its first update would make (not stored)."""
        block = self._blocks.get(name)
        if block is None:
            block = self._make_block(stats.layer.out_dim, stats.layer.in_dim_aug)
        return block

    def update_due(self, stats: CurvatureStatistics) -> dict[str, Tensor]:
        """An empty tensor for every layer whose next update has a part to split.

        Shaped, typed and placed like that layer's ``fitted`` part, in the
        order of the statistics' layers. Ranks that hold the same estimate and
        the same statistics list the same layers.
        """
        due: dict[str, Tensor] = {}
        for name, layer_stats in stats.layers.items():
            block = self._block_for(name, layer_stats)
            if isinstance(block, SplitUpdateBlock) and (size := block.fit_size()):
                device = layer_stats.tensors()[0].device
                due[name] = torch.empty(size, dtype=block.fit_dtype(layer_stats), device=device)
        return due

    def fitted(self, stats: CurvatureStatistics, layers: Collection[str]) -> dict[str, Tensor]:
        """The expensive part of the next update of each of ``layers``; the estimate is unchanged.

        A layer whose part fails comes back filled with NaN, so that its owner
        still sends it; ``update_with`` then refuses it on every rank alike.

        Raises:
            ValueError: For a layer that ``update_due`` does not list, or
                statistics that ``update`` would refuse.
        """
        self._check_statistics(stats)
        due = self.update_due(stats)
        unknown = [name for name in layers if name not in due]
        if unknown:
            raise ValueError(
                f"No split update is due for layers {unknown}: pass names from update_due()."
            )
        rho = self._old_weight(stats.num_samples)
        out: dict[str, Tensor] = {}
        for name in due:
            if name in layers:
                block = self._block_for(name, stats.layers[name])
                assert isinstance(block, SplitUpdateBlock)
                with naming_layer(name):
                    out[name] = block.fit(stats.layers[name], rho)
        return out

    def update_with(self, stats: CurvatureStatistics, fitted: Mapping[str, Tensor]) -> None:
        """``update``, with every due layer's expensive part taken from ``fitted``.

        ``fitted`` holds what ``fitted`` computed for the layers ``update_due``
        lists, here or on other ranks; afterwards the estimate is the one
        ``update`` would leave. All layers are updated or none.

        Raises:
            ValueError: If ``fitted`` does not hold exactly the due layers with
                their sizes, or ``update`` would refuse the statistics.
            OwnerFailedError: If a part is not finite (it failed on the rank that
                computed it); then nothing changes.
        """
        check_parts(fitted, self.update_due(stats), "fitted parts", "update_with", "update_due()")
        self._update_with(stats, fitted)

    def _old_weight(self, num_samples: int) -> float:
        """Weight of the old estimate in the next update (see ``decay``)."""
        if self.decay == 1.0:
            return self.num_samples_seen / (self.num_samples_seen + num_samples)
        return min(1.0 - 1.0 / (self.num_updates + 1), self.decay)

    @contextmanager
    def _all_or_none(self) -> Iterator[None]:
        """Restore every block (and drop new ones) if the body raises.

        Blocks assign new tensors rather than writing into old ones, so shallow
        copies keep the previous estimate at the cost of a few references.
        """
        saved = {name: copy.copy(block) for name, block in self._blocks.items()}
        try:
            yield
        except BaseException:
            self._blocks = saved
            raise

    def _each_block(
        self, fn: Callable[[str, LayerBlock], R], names: Collection[str] | None = None
    ) -> dict[str, R]:
        """``fn(name, block)`` on every block (or those in ``names``), concurrently.

        See ``workers`` for the schedule.

        A failing factorisation is re-raised with the name of its layer.
        """

        def job(name: str, block: LayerBlock) -> Callable[[], R]:
            def run() -> R:
                with naming_layer(name):
                    return fn(name, block)

            return run

        blocks = self._blocks
        if names is not None:
            blocks = {name: block for name, block in blocks.items() if name in names}
        if not blocks:
            return {}
        return run_jobs(
            {name: job(name, block) for name, block in blocks.items()},
            {name: b.factorisation_cost() for name, b in blocks.items()},
            self.workers or default_workers(next(iter(blocks.values()))._device()),
        )

    def _check_has_required(self, name: str, stats: LayerStatistics) -> None:
        have = stats.kinds()
        missing = [kind.name for kind in self.required_stats if kind not in have]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs {missing} statistics for layer {name!r}; create "
                f"the extractor with stats={{{', '.join(f'StatKind.{m}' for m in missing)}}}."
            )

    splits_inverse: ClassVar[bool] = True
    """Whether ``inverse`` can build the blocks of some layers only (``layers=``)."""

    def work_cost(self, layer: CurvatureLayer) -> float:
        r"""The estimated cost of ``layer``'s split work, up to a constant.

        Data-parallel training with ``split_inverses`` balances the layers'
        owners by it ([`curvlib.distributed.ownership`][curvlib.distributed.ownership]).
        Here the two factorisations of a Kronecker-factored block,
        $d_\text{out}^3 + d_\text{in}^3$ ($d_\text{in}$ with the bias column);
        approximations whose expensive part scales otherwise say so.
        """
        return layer.kronecker_cost

    def inverse(
        self, damping: float, layers: Collection[str] | None = None
    ) -> BlockDiagonalPreconditioner:
        r"""A new operator applying $(C + \lambda I)^{-1}$ block by block.

        Its ``condition_numbers`` hold each layer's condition estimate
        ([`BlockDiagonalPreconditioner`][curvlib.approx.base.BlockDiagonalPreconditioner]).
        ``layers`` restricts it to those layers' blocks: in data-parallel training
        each rank inverts its share ([`curvlib.distributed`][curvlib.distributed]).

        Raises:
            ValueError: If ``damping`` is not positive.
        """
        damping = check_damping(damping)
        drafts = self._each_block(lambda _, block: block.draft_inverse(damping), layers)
        values = host_values({name: d.numbers for name, d in drafts.items() if d is not None})
        inverses: dict[str, LayerInverse] = {}
        for name, value in values.items():
            draft = drafts[name]
            assert draft is not None
            with naming_layer(name):
                built = draft.finish(value)
            if built is not None:
                inverses[name] = built
        # The blocks without a draft, and those whose draft failed: checked, one by one.
        rest = [name for name in drafts if name not in inverses]
        inverses.update(self._each_block(lambda _, block: block.inverse(damping), rest))
        return self._preconditioner(inverses, damping)

    def inverse_ahead(self, damping: float) -> AheadInverse | None:
        """``inverse(damping)`` without a host read, checked when the caller reads its numbers.

        Every block's draft builds its inverse ahead of its numbers
        (``InverseDraft.ahead``); where ``settle`` accepts the numbers' values the
        preconditioner equals ``inverse(damping)`` bit for bit, condition
        estimates included. ``None`` where some block has no such build, or the
        blocks live on several devices: call ``inverse``.

        Raises:
            ValueError: If ``damping`` is not positive.
        """
        damping = check_damping(damping)
        if type(self).inverse is not LayerwiseApprox.inverse:
            return None  # a subclass's own inverse

        def build(_: str, block: LayerBlock) -> tuple[InverseDraft, LayerInverse] | None:
            draft = block.draft_inverse(damping)
            if draft is None or draft.ahead is None:
                return None
            inverse = draft.ahead()
            return None if inverse is None else (draft, inverse)

        if len({block._device() for block in self._blocks.values()}) != 1:
            return None
        built = self._each_block(build)
        if any(pair is None for pair in built.values()):
            return None
        drafts = {name: pair[0] for name, pair in built.items() if pair is not None}
        inverses = {name: pair[1] for name, pair in built.items() if pair is not None}
        numbers = torch.cat([draft.numbers.to(torch.float64) for draft in drafts.values()])
        preconditioner = self._preconditioner(inverses, damping)

        def settle(values: list[float]) -> bool:
            start, conditions = 0, {}
            for name, draft in drafts.items():
                size = draft.numbers.numel()
                assert draft.settle is not None
                with naming_layer(name):
                    if not draft.settle(inverses[name], values[start : start + size]):
                        return False
                conditions[name] = inverses[name].condition_number  # type: ignore[attr-defined]
                start += size
            preconditioner.settle_conditions(conditions)
            return True

        return AheadInverse(preconditioner, numbers, settle)

    def _preconditioner(
        self, inverses: Mapping[str, LayerInverse], damping: float
    ) -> BlockDiagonalPreconditioner:
        """The operator of ``inverses``, with the blocks' condition estimates."""
        shapes: dict[str, LayerShape] = {}
        condition: dict[str, Callable[[], float]] = {}
        for name, block in self._blocks.items():
            if name not in inverses:
                continue
            inverse = inverses[name]
            shapes[name] = LayerShape(
                block.out_dim, block.in_dim, block._dense_dtype(), block._device()
            )
            if isinstance(getattr(inverse, "condition_number", None), float):
                continue
            if block.cheap_condition:
                condition[name] = _constant(block.condition_number(damping))
            elif _dense_only(block) and block.num_params > DENSE_CONDITION_LIMIT:
                condition[name] = _constant(math.nan)
            else:
                # A snapshot, so that later updates cannot leak into this operator.
                condition[name] = _condition_of(copy.deepcopy(block), damping)
        return BlockDiagonalPreconditioner(inverses, shapes, condition)

    # -- inverses built by their owners and sent whole (data-parallel training) ------------

    shares_inverses: ClassVar[bool] = False
    """Whether the layer inverses can be sent: ``inverse_templates``, ``inverse_parts``,
    ``inverse_from_parts``.

    In data-parallel training with ``DataParallel(split_inverses=True,
    broadcast="inverses")`` each layer's owner builds its inverse
    (``inverse_parts``), the owners broadcast them, and every rank builds the
    whole preconditioner from them (``inverse_from_parts``)
    ([Distributed training](../distributed.md)). Set by the approximations
    whose blocks are [`SharedInverseBlock`][curvlib.approx.base.SharedInverseBlock]s.
    """

    def _shared_blocks(self) -> dict[str, SharedInverseBlock]:
        blocks: dict[str, SharedInverseBlock] = {}
        for name, block in self._blocks.items():
            if not isinstance(block, SharedInverseBlock):
                raise TypeError(f"{type(self).__name__}'s layer inverses cannot be sent.")
            blocks[name] = block
        return blocks

    def inverse_templates(self) -> dict[str, Tensor]:
        """An empty tensor per layer, shaped, typed and placed like its packed inverse."""
        return {name: block.inverse_template() for name, block in self._shared_blocks().items()}

    def inverse_parts(self, damping: float, layers: Collection[str]) -> dict[str, Tensor]:
        """The damped inverse of each of ``layers``, packed flat (NaN where it fails).

        Raises:
            ValueError: If ``damping`` is not positive, or for a layer without an estimate.
        """
        damping = check_damping(damping)
        blocks = self._shared_blocks()
        unknown = [name for name in layers if name not in blocks]
        if unknown:
            raise ValueError(f"No estimate for layers {unknown}.")
        return self._each_block(lambda name, _: blocks[name].packed_inverse(damping), set(layers))

    def inverse_from_parts(
        self, damping: float, parts: Mapping[str, Tensor]
    ) -> BlockDiagonalPreconditioner:
        """The preconditioner ``inverse(damping)`` builds, from every layer's packed inverse.

        ``parts`` holds what ``inverse_parts`` computed for every layer, here or
        on other ranks.

        Raises:
            ValueError: If ``parts`` does not hold exactly every layer with its size.
            OwnerFailedError: If a part is not finite (building it failed on the
                rank that computed it).
        """
        templates = self.inverse_templates()
        check_parts(parts, templates, "inverses", "inverse_from_parts", "inverse_templates()")
        blocks = self._shared_blocks()
        inverses = {name: blocks[name].unpacked_inverse(parts[name]) for name in templates}
        return self._preconditioner(inverses, damping)

    def trace(self, layer: str | None = None) -> Tensor:
        r"""$\operatorname{tr} C$ of one layer's block, or of all of them (``layer=None``).

        Cost: each block's ``trace`` ($O(d_o + d_i)$ for Kronecker blocks).

        Raises:
            KeyError: If ``layer`` has no estimate.
            RuntimeError: Before the first ``update``.
        """
        return self._sum(lambda block: block.trace(), layer)

    def logdet(self, damping: float, layer: str | None = None) -> Tensor:
        r"""$\log\det D(\lambda)$ of the damped operator ``inverse(damping)`` inverts.

        Summed over layers when ``layer`` is ``None`` (the approximation is block
        diagonal). $D(\lambda)$ is each block's ``damped_to_dense``: exact
        $C + \lambda I$ or the block's documented damping rule (KFAC's
        $\pi$-split, the floored two-term operator, the per-layer heuristic).

        Raises:
            ValueError: If ``damping`` is not positive and finite.
            KeyError: If ``layer`` has no estimate.
            RuntimeError: Before the first ``update``.
        """
        damping = check_damping(damping)
        return self._sum(lambda block: block.logdet(damping), layer)

    def sample(
        self, damping: float, num_samples: int = 1, *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        r"""Draws from $\mathcal N(0, D(\lambda)^{-1})$, independent across layers.

        The layers are independent because the approximation is block diagonal;
        each block draws with its own ``sample`` (documented cost).

        Args:
            damping: $\lambda > 0$.
            num_samples: Draws per layer.
            generator: Source of randomness; a seeded generator makes the draws
                reproducible (layers are drawn in the order of ``blocks``).

        Returns:
            ``[num_samples, out, in]`` per layer.

        Raises:
            ValueError: If ``damping`` or ``num_samples`` is not positive.
            TypeError: If ``generator`` is not a ``torch.Generator``.
            RuntimeError: Before the first ``update``.
        """
        damping = check_damping(damping)
        check_sampling(num_samples, generator)
        if not self._blocks:
            raise RuntimeError("No curvature estimate yet: update() first.")
        return {
            name: block.sample(damping, num_samples, generator)
            for name, block in self._blocks.items()
        }

    def _sum(self, fn: Callable[[LayerBlock], Tensor], layer: str | None) -> Tensor:
        if layer is not None:
            return fn(self._block(layer))
        if not self._blocks:
            raise RuntimeError("No curvature estimate yet: update() first.")
        values = [fn(block) for block in self._blocks.values()]
        return torch.stack(values).sum()

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
        """Counters and per-layer estimates: tensors and plain values only.

        With the record of what wrote it ([`curvlib.core.checkpoint`][curvlib.core.checkpoint]):
        the approximation's class.
        """
        return {
            RECORD_KEY: writer_record(self),
            "num_updates": self.num_updates,
            "num_samples_seen": self.num_samples_seen,
            "blocks": {
                name: {"shape": [b.out_dim, b.in_dim], "state": b.state_dict()}
                for name, b in self._blocks.items()
            },
        }

    def snapshot(self) -> Callable[[], dict[str, Any]]:
        """``state_dict`` of the estimate as it is now, computed when called.

        Later ``update`` and ``refresh`` calls leave it as it is: the blocks
        assign new tensors instead of writing into their old ones, so shallow
        copies of the blocks keep the estimate at the cost of a few references.
        The optimizer keeps the estimate its live inverse was built from this
        way, for checkpoints taken before the next rebuild.
        """
        return self.frozen().state_dict

    def frozen(self: LA) -> LA:
        """A copy of the estimate as it is now, which later updates leave as it is.

        The blocks assign new tensors instead of writing into their old ones, so
        shallow copies of the blocks share the tensors and copy nothing. The
        optimizer builds an overlapped inverse from it (``overlap_inverse``)
        while training goes on.
        """
        frozen = copy.copy(self)
        frozen._blocks = {name: copy.copy(block) for name, block in self._blocks.items()}
        return frozen

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counters and estimates saved by ``state_dict()``; all or nothing.

        Raises:
            ValueError: If another approximation wrote ``state`` (e.g. a KFAC
                checkpoint loaded into KPSVD), or a layer's saved estimate is
                incomplete; nothing is changed then.
        """
        check_record(state, writer_record(self), f"this {type(self).__name__}")
        blocks: dict[str, LayerBlock] = {}
        for name, entry in state["blocks"].items():
            out_dim, in_dim = entry["shape"]
            block = self._make_block(int(out_dim), int(in_dim))
            try:
                block.load_state_dict(entry["state"])
            except KeyError as err:
                raise ValueError(
                    f"The saved estimate of layer {name!r} lacks {err}: it was not written by "
                    f"{type(self).__name__}.state_dict(); nothing was changed."
                ) from err
            blocks[name] = block
        self._blocks, self.num_updates = blocks, int(state["num_updates"])
        self.num_samples_seen = int(state.get("num_samples_seen", 0))
