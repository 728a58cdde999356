r"""KFAC: one Kronecker product per layer (Martens & Grosse 2015; KFC for convolutions)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor

from curvlib.approx.base import (
    DEFAULT_DECAY,
    InverseDraft,
    LayerBlock,
    LayerInverse,
    LayerwiseApprox,
    SharedInverseBlock,
    running_average,
    standard_normal,
)
from curvlib.core.stats import LayerStatistics, StatKind
from curvlib.linalg.factors import (
    blockwise_damped_inverse,
    cholesky_inverse,
    cpu_live_coordinates,
    damped_cholesky,
    device_negligible_limit,
    eigh,
    embed_live,
    first_cholesky,
    flush_below_,
    flush_negligible,
    flush_negligible_,
    independent_blocks,
    live_block,
    live_size,
    negligible_limit,
    pi_shifts,
    pi_split,
    symmetrize,
)
from curvlib.linalg.kron import eigenbasis_apply
from curvlib.linalg.precision import (
    ApplyDtype,
    apply_cost,
    check_apply_dtype,
    condition_free_dtype,
    resolve_apply_dtype,
)


class KFACDamping(Enum):
    r"""How KFAC realises the Tikhonov term $F + \lambda I$.

    Attributes:
        PI: Factored damping, $(G + \frac{\sqrt\lambda}{\pi} I) \otimes
            (A + \pi\sqrt\lambda I)$ with the trace-norm $\pi$ (Martens & Grosse
            2015, section 6.3): two Cholesky inverses, no eigendecomposition. It
            adds $\lambda I$ exactly and the cross terms $\frac{\sqrt\lambda}{\pi}
            I\otimes A + \pi\sqrt\lambda\, G\otimes I$ on top.
        EIGEN: Exact damping $(G \otimes A + \lambda I)^{-1}$ in the Kronecker
            eigenbasis, $Q_G [(Q_G^\top V Q_A) \oslash (s_G s_A^\top + \lambda)] Q_A^\top$:
            two eigendecompositions.
        SQRT: Factored damping without the $\pi$ split, $(G + \sqrt\lambda I)
            \otimes (A + \sqrt\lambda I)$: both factors get the same
            $\sqrt\lambda$, as in the K-FAC code of the KPSVD papers
            (``pi=False``). Two Cholesky inverses like ``PI``; the
            cross terms $\sqrt\lambda (I\otimes A + G\otimes I)$ are unbalanced
            when the factors' scales differ. With
            [`ConvDamping.PER_POSITION`][curvlib.approx.kfac.ConvDamping] a
            convolution with $T$ output positions gets $(G + \sqrt{\lambda/T} I)
            \otimes (A + \sqrt{\lambda T} I)$.
    """

    PI = "pi"
    EIGEN = "eigen"
    SQRT = "sqrt"


class ConvDamping(Enum):
    r"""How KFAC damps a layer with $T$ output positions (a convolution).

    Attributes:
        UNIFORM: Every layer gets $\lambda$ as it is (the default).
        PER_POSITION: The rule of the K-FAC code of the KPSVD papers: the layer's
            damping is $\lambda / T$, applied to the position-*averaged* input factor
            $\bar A = A / T$, and the preconditioned gradient is divided by $T$. In
            curvlib's factors ($A$ summed over positions,
            [`curvlib.core.conventions`][curvlib.core.conventions]) the damped
            operator is $T\,(G + \gamma_G I)\otimes(\bar A + \gamma_{\bar A} I)
            = (G + \gamma_G I)\otimes(A + T\gamma_{\bar A} I)$ with the shifts
            $(\gamma_G, \gamma_{\bar A})$ the damping mode gives $(G, \bar A)$ at
            $\lambda/T$. It changes only ``SQRT``, to $(G + \sqrt{\lambda/T} I)
            \otimes (A + \sqrt{\lambda T} I)$: under ``PI`` the trace-norm $\pi$ of
            $(G, \bar A)$ is that of $(G, A)$ divided by $\sqrt T$, which gives
            the same shifts as $\lambda$ on $(G, A)$, and under ``EIGEN``
            $T(G\otimes\bar A + \frac\lambda T I) = G\otimes A + \lambda I$.
            Layers with one position ($T = 1$, ``Linear``) are unchanged.
    """

    UNIFORM = "uniform"
    PER_POSITION = "per_position"


class KroneckerInverse:
    r"""$(G' \otimes A')^{-1}$ applied as $V \mapsto G'^{-1} V A'^{-1}$ (KFAC's ``PI``, ``SQRT``).

    With ``apply_dtype`` (e.g. bfloat16, [`curvlib.linalg.precision`][curvlib.linalg.precision])
    the two products run on copies of the inverses in that dtype and the result
    is returned in the inverses' own dtype. The inverses are flushed with
    [`flush_negligible`][curvlib.linalg.flush_negligible] unless ``flush=False``
    says that the caller has done so.

    Attributes:
        g_inv: $G'^{-1}$, ``[d_out, d_out]``.
        a_inv: $A'^{-1}$, ``[d_in, d_in]``.
        condition_number: A lower bound of the condition number of $G' \otimes A'$
            ([`factor_condition`][curvlib.approx.kfac.factor_condition] of each factor,
            multiplied).
    """

    def __init__(
        self,
        g_inv: Tensor,
        a_inv: Tensor,
        condition_number: float,
        apply_dtype: torch.dtype | None = None,
        *,
        flush: bool = True,
    ) -> None:
        if flush:  # else the caller has flushed them (``flush_negligible``)
            g_inv, a_inv = flush_negligible(g_inv), flush_negligible(a_inv)
        self.g_inv, self.a_inv = g_inv, a_inv
        self.condition_number = condition_number
        self.apply_dtype = apply_dtype or self.a_inv.dtype
        """The dtype the two products run in (the result is in the inverses' dtype)."""
        self._g, self._a = self.g_inv.to(self.apply_dtype), self.a_inv.to(self.apply_dtype)

    def __call__(self, mat: Tensor) -> Tensor:
        """Apply the inverse to ``[..., d_out, d_in]`` matrices."""
        return (self._g @ mat.to(self.apply_dtype) @ self._a).to(self.a_inv.dtype)

    def apply_outer(self, u: Tensor, v: Tensor) -> Tensor:
        r"""The inverse on rank-one matrices $u_k v_k^\top$: $(G'^{-1}u_k)(A'^{-1}v_k)^\top$.

        $O(c\,(d_\text{out}^2 + d_\text{in}^2))$ for ``u`` ``[c, d_out]`` and ``v``
        ``[c, d_in]``, where ``__call__`` on the products costs
        $O(c\,d_\text{out} d_\text{in} (d_\text{out} + d_\text{in}))$; in the
        inverses' dtype (no ``apply_dtype``: these are matrix-vector products).
        Returns ``[c, d_out, d_in]``.
        """
        left = u.to(self.g_inv.dtype) @ self.g_inv  # both inverses are symmetric
        right = v.to(self.a_inv.dtype) @ self.a_inv
        return left[:, :, None] * right[:, None, :]


class EigenbasisInverse:
    r"""$(G \otimes A + \lambda I)^{-1}$ in the Kronecker eigenbasis (KFAC's ``EIGEN`` inverse).

    Also EKFAC's inverse, whose ``scale`` holds the reciprocals of its damped
    scalings (and ``condition_number`` that of its damped operator). With
    ``apply_dtype`` the four products run on copies of the bases in that dtype
    ([`eigenbasis_apply`][curvlib.linalg.kron.eigenbasis_apply]). The bases are
    flushed with [`flush_negligible`][curvlib.linalg.flush_negligible] unless
    ``flush=False`` says that the caller has done so.

    Attributes:
        q_g: Eigenvectors of $G$, ``[d_out, d_out]``.
        q_a: Eigenvectors of $A$, ``[d_in, d_in]``.
        scale: $1 / (s_G s_A^\top + \lambda)$, ``[d_out, d_in]``.
        condition_number: The exact condition number of $G\otimes A + \lambda I$,
            $\max(1/\text{scale}) / \min(1/\text{scale})$.
    """

    def __init__(
        self,
        q_g: Tensor,
        q_a: Tensor,
        scale: Tensor,
        apply_dtype: torch.dtype | None = None,
        condition_number: float | None = None,
        *,
        flush: bool = True,
    ) -> None:
        if flush:  # else the caller has flushed them (``flush_negligible``)
            q_g, q_a = flush_negligible(q_g), flush_negligible(q_a)
        self.q_g, self.q_a, self.scale = q_g, q_a, scale
        if condition_number is None:  # one host synchronisation; callers that have it pass it
            condition_number = float(scale.max() / scale.min())
        self.condition_number = condition_number
        self.apply_dtype = apply_dtype or scale.dtype
        """The dtype the four products run in (the scaling runs in ``scale``'s dtype)."""
        self._q_g, self._q_a = self.q_g.to(self.apply_dtype), self.q_a.to(self.apply_dtype)

    def __call__(self, mat: Tensor) -> Tensor:
        """Apply the inverse to ``[..., d_out, d_in]`` matrices."""
        return eigenbasis_apply(self._q_g, self._q_a, self.scale, mat)


def factor_condition(factor: Tensor, shift: float, chol: Tensor, inverse: Tensor) -> float:
    r"""A lower bound of the condition number of an SPD matrix $M = F + sI$ from its factorisation.

    $\lambda_\max(M) \ge \max_i M_{ii}$, and $\lambda_\min(M)$ is at most both
    $\min_i L_{ii}^2$ (each $L_{ii}^2$ is the inverse of a diagonal entry of the
    inverse of a leading principal submatrix, whose eigenvalues interlace
    $M$'s) and $1 / \max_i (M^{-1})_{ii}$; so
    $\kappa(M) \ge \max_i M_{ii} / \min(\min_i L_{ii}^2, 1/\max_i (M^{-1})_{ii})$.
    It is exact for diagonal $M$ and never below 1. Cost $O(n)$ given the factors.

    Args:
        factor: $F$, ``[n, n]``.
        shift: $s$, the damping (and jitter) on $F$'s diagonal.
        chol: The lower Cholesky factor $L$ of $M$.
        inverse: $M^{-1}$.
    """
    least_pivot = chol.diagonal().square().min()
    return _factor_condition(*_condition_parts(factor, least_pivot, inverse).tolist(), shift)


def _condition_parts(factor: Tensor, least_pivot: Tensor, inverse: Tensor) -> Tensor:
    r"""``[max_i F_ii, min_i L_ii², max_i (M⁻¹)_ii]`` as float64, left on the device.

    ``least_pivot``: $\min_i L_{ii}^2$ of the Cholesky factor of $M$ or of a
    symmetric permutation of it (the blocks', the dead coordinates' $\sqrt{s}^2$).
    """
    parts = [factor.diagonal().max(), least_pivot, inverse.diagonal().max()]
    return torch.stack(parts).double()


def _decoupled(chol: Tensor, live: Tensor | None, size: int, shift: Tensor | float) -> Tensor:
    r"""The Cholesky factor of the live block embedded with $\sqrt{s}$ on the dead coordinates.

    A dead coordinate (a zero row: a dead ReLU unit, an input zero on every
    statistics sample) of a damped factor $F + sI$ is decoupled: its Cholesky
    factor is $\sqrt{s}$ there and its inverse $1/s$, and only the other
    coordinates are factorised, at the cube of their number
    ([`cpu_live_coordinates`][curvlib.linalg.factors.cpu_live_coordinates]).
    """
    if live is None:
        return chol
    return embed_live(chol, live, size, torch.as_tensor(shift, dtype=chol.dtype).sqrt())


def _damped_side(factor: Tensor, shift: float, live: Tensor | None) -> tuple[float, Tensor]:
    """``(s, L)`` of one damped factor: the shift with ``damped_cholesky``'s jitter, decoupled.

    The running factors are averages of symmetrised statistics: symmetric to the bit.
    """
    chol, jitter = damped_cholesky(live_block(factor, live), shift, symmetric=True)
    shift = shift + jitter
    return shift, _decoupled(chol, live, factor.shape[-1], shift)


def _live_inverse(
    factor: Tensor, chol: Tensor, live: Tensor | None, shift: Tensor | float
) -> tuple[Tensor, Tensor]:
    r"""$(F + sI)^{-1}$ and the condition parts from the Cholesky factor of its live block.

    ``chol`` factorises $F + sI$ on the coordinates ``live`` (all of them where
    ``None``); the dead ones are decoupled: their inverse is $1/s$ and their
    pivots are $\sqrt{s}^2$, what the embedded factor of ``_decoupled`` has there.
    Returns the inverse and ``_condition_parts`` of it, as the embedded factor
    gives them, without embedding the factor.
    """
    inverse = cholesky_inverse(chol)
    pivots = chol.diagonal().square()
    if live is not None:
        root = torch.as_tensor(shift, dtype=chol.dtype).sqrt()
        pivots = torch.cat([pivots, root.square().reshape(1)])
        fill = torch.as_tensor(shift, dtype=chol.dtype).reciprocal()
        inverse = embed_live(inverse, live, factor.shape[-1], fill)
    return inverse, _condition_parts(factor, pivots.min(), inverse)


def _drafted_side(
    factor: Tensor, shift: Tensor | float, live: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(inverse, info, parts)`` of one damped factor from its first Cholesky, unread."""
    chol, info = first_cholesky(live_block(factor, live), shift, symmetric=True)
    inverse, parts = _live_inverse(factor, chol, live, shift)
    return inverse, info, parts


def _checked_side(factor: Tensor, shift: float, live: Tensor | None) -> tuple[Tensor, float]:
    """``(inverse, condition bound)`` of one damped factor, jittered where it must be."""
    chol, jitter = damped_cholesky(live_block(factor, live), shift, symmetric=True)
    inverse, parts = _live_inverse(factor, chol, live, shift + jitter)
    return inverse, _factor_condition(*parts.tolist(), shift + jitter)


def _factor_condition(*values: float) -> float:
    """``factor_condition`` from ``_condition_parts``' three values and the shift."""
    diagonal_max, chol_min, inverse_max, shift = values
    return max((diagonal_max + shift) / min(chol_min, 1.0 / inverse_max), 1.0)


def _settle_with(
    condition: Callable[[list[float]], float | None],
) -> Callable[[LayerInverse, list[float]], bool]:
    """``InverseDraft.settle`` of an inverse whose ``condition_number`` ``condition`` gives."""

    def settle(inverse: LayerInverse, values: list[float]) -> bool:
        value = condition(values)
        if value is None:
            return False
        inverse.condition_number = value  # type: ignore[attr-defined]
        return True

    return settle


def _float64(values: list[Tensor | float], like: Tensor) -> Tensor:
    """``values`` (0-dimensional tensors or floats) as one float64 tensor on ``like``'s device."""
    return torch.stack(
        [torch.as_tensor(v, dtype=torch.float64, device=like.device).reshape(()) for v in values]
    )


class _KFACBlock(SharedInverseBlock):
    def __init__(
        self,
        out_dim: int,
        in_dim: int,
        dtype: torch.dtype | None,
        damping: KFACDamping,
        conv_damping: ConvDamping = ConvDamping.UNIFORM,
        apply_dtype: ApplyDtype = "auto",
    ) -> None:
        super().__init__(out_dim, in_dim, dtype)
        self.damping_mode = damping
        self.conv_damping = conv_damping
        self.apply_dtype = apply_dtype
        self.positions = 1
        """$T$, the output positions of the layer's last statistics."""
        self.A: Tensor | None = None
        self.G: Tensor | None = None
        self._blocks_of: tuple[weakref.ref[Tensor], list[Tensor] | None] | None = None

    def update(self, stats: LayerStatistics, rho: float) -> None:
        assert stats.kronecker is not None
        self.positions = stats.kronecker.num_positions
        self.A = running_average(self.A, self._cast(stats.kronecker.A), rho, symmetrize=True)
        self.G = running_average(self.G, self._cast(stats.kronecker.G), rho, symmetrize=True)

    def _factors(self) -> tuple[Tensor, Tensor]:
        if self.A is None or self.G is None:
            raise RuntimeError("KFAC block has no estimate yet: update() first.")
        return self.A, self.G

    def _device(self) -> torch.device:
        return self.A.device if self.A is not None else torch.device("cpu")

    def matvec(self, mat: Tensor) -> Tensor:
        A, G = self._factors()
        return G @ mat.to(A.dtype) @ A

    def _shifts(self, damping: float) -> tuple[float, float]:
        """``(gamma_A, gamma_G)``: the shifts of the factored modes (``PI``, ``SQRT``)."""
        A, G = self._factors()
        if self.damping_mode is KFACDamping.PI:
            # ConvDamping.PER_POSITION gives the same shifts (see its docstring).
            return pi_split(A, G, damping)
        t = self.positions if self.conv_damping is ConvDamping.PER_POSITION else 1
        return (damping * t) ** 0.5, (damping / t) ** 0.5

    def _shift_values(self, damping: float) -> tuple[Tensor | float, Tensor | float]:
        """``_shifts`` without a host read: ``PI``'s as tensors on the factors' device."""
        if self.damping_mode is KFACDamping.PI:
            A, G = self._factors()
            return pi_shifts(A, G, damping)
        return self._shifts(damping)

    @property
    def _factored(self) -> bool:
        return self.damping_mode is not KFACDamping.EIGEN

    def _live(self) -> tuple[Tensor | None, Tensor | None]:
        """The live coordinates of ``G`` and ``A`` where decoupling them pays (CPU)."""
        A, G = self._factors()
        return cpu_live_coordinates(G), cpu_live_coordinates(A)

    def __getstate__(self) -> dict[str, Any]:
        """The block's attributes without the groups' cache (a weak reference does not pickle)."""
        state = self.__dict__.copy()
        state["_blocks_of"] = None
        return state

    def _a_blocks(self) -> list[Tensor] | None:
        """[`independent_blocks`][curvlib.linalg.factors.independent_blocks] of ``A``, cached.

        ``update`` and ``load_state_dict`` store new tensors, never change one in
        place: the groups found for a tensor hold as long as it is the estimate.
        """
        A, _ = self._factors()
        if self._blocks_of is None or self._blocks_of[0]() is not A:
            self._blocks_of = (weakref.ref(A), independent_blocks(A))
        return self._blocks_of[1]

    def factorisation_cost(self) -> float:
        """$d^3$ of the sides factorised: their live coordinates, or ``A``'s independent blocks."""
        if self.A is None or self.G is None:
            return super().factorisation_cost()
        out = float(live_size(cpu_live_coordinates(self.G), self.out_dim)) ** 3
        blocks = self._a_blocks() if self._factored else None
        if blocks is not None:
            return out + sum(index.shape[0] * float(index.shape[1]) ** 3 for index in blocks)
        return out + float(live_size(cpu_live_coordinates(self.A), self.in_dim)) ** 3

    def _damped_choleskys(
        self, damping: float, live: tuple[Tensor | None, Tensor | None] | None = None
    ) -> tuple[float, Tensor, float, Tensor]:
        """``(s_G, L_G, s_A, L_A)``: the damped factors' shifts and Cholesky factors.

        $G' = G + s_G I$ and $A' = A + s_A I$ (``PI`` or ``SQRT`` shifts), jitter
        included in the shifts; ``live``: ``_live()``, if the caller has it.
        """
        A, G = self._factors()
        gamma_a, gamma_g = self._shifts(damping)
        live_g, live_a = self._live() if live is None else live
        return (*_damped_side(G, gamma_g, live_g), *_damped_side(A, gamma_a, live_a))

    def _blockwise_a_inverse(self, damping: float) -> tuple[Tensor, float] | None:
        """``(A'^{-1}, its condition bound)`` block by block, where ``A`` has independent blocks.

        ``None`` without blocks, or where a block's factorisation failed: the dense
        factorisation, with its jittered retries, takes over.
        """
        blocks = self._a_blocks()
        if blocks is None:
            return None
        A, _ = self._factors()
        gamma_a, _ = self._shift_values(damping)
        a_inv, least, failed = blockwise_damped_inverse(A, gamma_a, blocks)
        if bool(failed):
            return None
        diagonal_max, least_pivot, inverse_max = _condition_parts(A, least, a_inv).tolist()
        return a_inv, _factor_condition(diagonal_max, least_pivot, inverse_max, float(gamma_a))

    def _eigenvalues(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues of ``G`` and ``A`` (round-off negatives clamped), ``eigvalsh`` only."""
        A, G = self._factors()
        return (
            torch.linalg.eigvalsh(G).clamp_min(0.0),
            torch.linalg.eigvalsh(A).clamp_min(0.0),
        )

    def draft_inverse(self, damping: float) -> InverseDraft | None:
        """``inverse``'s factored modes up to one host read.

        The numbers read: the Choleskys' ``info``, the shifts, the condition
        estimate's parts and the extremes that set the flush limits.
        """
        if not self._factored or not self.out_dim or not self.in_dim:
            return None
        if type(self).inverse is not _KFACBlock.inverse:  # a subclass's own inverse
            return None
        A, G = self._factors()
        gamma_a, gamma_g = self._shift_values(damping)
        g_inv, info_g, parts_g = _drafted_side(G, gamma_g, cpu_live_coordinates(G))
        blocks = self._a_blocks()
        if blocks is None:
            a_inv, info_a, parts_a = _drafted_side(A, gamma_a, cpu_live_coordinates(A))
        else:
            a_inv, least, failed = blockwise_damped_inverse(A, gamma_a, blocks)
            info_a = failed.to(torch.int32)
            parts_a = _condition_parts(A, least, a_inv)
        extremes = _float64([*torch.aminmax(g_inv), *torch.aminmax(a_inv)], G)
        numbers = torch.cat([
            _float64([info_g, info_a, gamma_g, gamma_a], G),
            parts_g,
            parts_a,
            extremes,
        ])  # fmt: skip

        def condition(v: list[float]) -> float | None:
            """``None`` where a Cholesky failed: the checked path retries with jitter."""
            if v[0] or v[1]:
                return None
            return _factor_condition(*v[4:7], v[2]) * _factor_condition(*v[7:10], v[3])

        def finish(v: list[float]) -> LayerInverse | None:
            value = condition(v)
            if value is None:
                return None
            g = flush_below_(g_inv, negligible_limit(v[10], v[11], g_inv.dtype))
            a = flush_below_(a_inv, negligible_limit(v[12], v[13], a_inv.dtype))
            return KroneckerInverse(g, a, value, self._apply_dtype(g, value), flush=False)

        def ahead() -> LayerInverse | None:
            apply_dtype = condition_free_dtype(lambda c: self._apply_dtype(g_inv, c))
            if apply_dtype is None:
                return None  # the condition number chooses it
            g = flush_below_(g_inv, device_negligible_limit(extremes[0], extremes[1], g_inv.dtype))
            a = flush_below_(a_inv, device_negligible_limit(extremes[2], extremes[3], a_inv.dtype))
            return KroneckerInverse(g, a, math.nan, apply_dtype, flush=False)

        return InverseDraft(numbers, finish, ahead, _settle_with(condition))

    def inverse(self, damping: float) -> LayerInverse:
        if self._factored:
            A, G = self._factors()
            gamma_a, gamma_g = self._shifts(damping)
            g_inv, condition_g = _checked_side(G, gamma_g, cpu_live_coordinates(G))
            blockwise = self._blockwise_a_inverse(damping)
            if blockwise is None:
                blockwise = _checked_side(A, gamma_a, cpu_live_coordinates(A))
            a_inv, condition_a = blockwise
            condition = condition_g * condition_a
            apply_dtype = self._apply_dtype(g_inv, condition)
            # Both inverses are new: flushed in place.
            g_inv, a_inv = flush_negligible_(g_inv), flush_negligible_(a_inv)
            return KroneckerInverse(g_inv, a_inv, condition, apply_dtype, flush=False)
        A, G = self._factors()
        ea, eg = eigh(A), eigh(G)
        scale = 1.0 / (eg.values[:, None] * ea.values[None, :] + damping)
        condition = float(scale.max() / scale.min())
        apply_dtype = self._apply_dtype(scale, condition)
        return EigenbasisInverse(eg.vectors, ea.vectors, scale, apply_dtype, condition)

    def _packed_sizes(self) -> list[int]:
        """``G'^{-1}``, ``A'^{-1}`` (or ``Q_G``, ``Q_A``, the scale), the condition number."""
        o, i = self.out_dim, self.in_dim
        return [o * o, i * i, 1] if self._factored else [o * o, i * i, o * i, 1]

    def _estimate_like(self) -> Tensor:
        return self._factors()[0]

    def _packed_parts(self, inverse: LayerInverse) -> tuple[list[Tensor], list[float]]:
        if isinstance(inverse, KroneckerInverse):
            return [inverse.g_inv, inverse.a_inv], [inverse.condition_number]
        assert isinstance(inverse, EigenbasisInverse)
        return [inverse.q_g, inverse.q_a, inverse.scale], [inverse.condition_number]

    def unpacked_inverse(self, packed: Tensor) -> LayerInverse:
        o, i = self.out_dim, self.in_dim
        *parts, last = torch.split(packed, self._packed_sizes())
        condition = float(last)
        left, right = parts[0].reshape(o, o).clone(), parts[1].reshape(i, i).clone()
        if self._factored:
            return KroneckerInverse(left, right, condition, self._apply_dtype(left, condition))
        scale = parts[2].reshape(o, i).clone()
        apply_dtype = self._apply_dtype(scale, condition)
        return EigenbasisInverse(left, right, scale, apply_dtype, condition)

    def _apply_dtype(self, like: Tensor, condition: float) -> torch.dtype:
        """The dtype the inverse's products run in (``KFAC(apply_dtype=)``).

        ``condition`` is the damped inverse's condition number (or a lower bound):
        ``"auto"`` keeps ``like``'s dtype where bfloat16 would swamp the direction.
        """
        cost = apply_cost(self.out_dim, self.in_dim)
        return resolve_apply_dtype(
            self.apply_dtype, like.dtype, like.device, cost, condition=condition,
            eigenbasis=not self._factored,
        )  # fmt: skip

    def trace(self) -> Tensor:
        r"""$\operatorname{tr}(G \otimes A) = \operatorname{tr} G \operatorname{tr} A$ (cheap)."""
        A, G = self._factors()
        return G.diagonal().sum() * A.diagonal().sum()

    def logdet(self, damping: float) -> Tensor:
        r"""Log-determinant of the damped operator, never a $P \times P$ matrix.

        ``PI`` and ``SQRT``: $\log\det(G'\otimes A') = d_i \log\det G' + d_o \log\det A'$ from
        the two factor Cholesky factorisations, $O(d_o^3 + d_i^3)$. This is the
        operator ``inverse`` inverts, $(G + \gamma_G I)\otimes(A + \gamma_A I)$,
        *not* $G\otimes A + \lambda I$. ``EIGEN``:
        $\sum_{ij}\log(s_{G,i} s_{A,j} + \lambda)$ from two ``eigvalsh``.
        """
        if self._factored:
            _, chol_g, _, chol_a = self._damped_choleskys(damping)
            return 2.0 * (
                self.in_dim * torch.log(chol_g.diagonal()).sum()
                + self.out_dim * torch.log(chol_a.diagonal()).sum()
            )
        s_g, s_a = self._eigenvalues()
        return torch.log(s_g[:, None] * s_a[None, :] + damping).sum()

    def sample(
        self, damping: float, num_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""Draws from $\mathcal N(0, D(\lambda)^{-1})$ through the factors, never $P \times P$.

        ``PI`` and ``SQRT``: $X = L_G^{-\top} Z L_A^{-1}$ with the Cholesky factors of the
        damped factors (covariance $G'^{-1}\otimes A'^{-1}$): $O(d_o^3 + d_i^3)$
        once, two triangular solves per draw. ``EIGEN``:
        $X = Q_G [Z \oslash (s_G s_A^\top + \lambda)^{1/2}] Q_A^\top$: two ``eigh``
        once, two products per draw.
        """
        if self._factored:
            _, chol_g, _, chol_a = self._damped_choleskys(damping)
            z = standard_normal((num_samples, self.out_dim, self.in_dim), chol_a, generator)
            left = torch.linalg.solve_triangular(chol_g.T, z, upper=True)  # L_G^{-T} Z
            # X L_A = L_G^{-T} Z, i.e. X = L_G^{-T} Z L_A^{-1}: row-major vec(X) is
            # (L_G^{-T} (x) L_A^{-T}) vec(Z), whose covariance is G'^{-1} (x) A'^{-1}.
            draws: Tensor = torch.linalg.solve_triangular(chol_a, left, upper=False, left=False)
            return draws
        A, G = self._factors()
        ea, eg = eigh(A), eigh(G)
        scale = (eg.values[:, None] * ea.values[None, :] + damping).rsqrt()
        z = standard_normal((num_samples, self.out_dim, self.in_dim), scale, generator)
        return eg.vectors @ (z * scale) @ ea.vectors.T

    def condition_number(self, damping: float) -> float:
        r"""Condition number of the damped operator.

        ``EIGEN``: exact, $(s_{G,\max} s_{A,\max} + \lambda) / (s_{G,\min}
        s_{A,\min} + \lambda)$ from two ``eigvalsh`` (cheaper than the two
        ``eigh`` of the inverse). ``PI`` and ``SQRT``: the lower bound of
        [`factor_condition`][curvlib.approx.kfac.factor_condition] for each damped
        factor, multiplied ($\kappa(G'\otimes A') = \kappa(G')\kappa(A')$), from the
        Cholesky factorisations the inverse needs anyway, $O(d_o^3 + d_i^3)$ on its
        own; the preconditioner gets it for $O(d_o + d_i)$ when built.
        """
        if self._factored:
            inverse = self.inverse(damping)
            assert isinstance(inverse, KroneckerInverse)
            return inverse.condition_number
        s_g, s_a = self._eigenvalues()
        return float((s_g[-1] * s_a[-1] + damping) / (s_g[0] * s_a[0] + damping))

    def to_dense(self) -> Tensor:
        A, G = self._factors()
        return torch.kron(G.contiguous(), A.contiguous())

    def damped_to_dense(self, damping: float) -> Tensor:
        if self.damping_mode is KFACDamping.EIGEN:
            return super().damped_to_dense(damping)
        A, G = self._factors()
        gamma_a, gamma_g = self._shifts(damping)
        return torch.kron(_shifted(G, gamma_g).contiguous(), _shifted(A, gamma_a).contiguous())

    def state_dict(self) -> dict[str, Any]:
        A, G = self._factors()
        return {"A": A.clone(), "G": G.clone(), "positions": self.positions}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # Symmetric to the bit, as the inverse assumes: a no-op on what update() stored.
        self.A, self.G = symmetrize(state["A"]), symmetrize(state["G"])
        self.positions = int(state.get("positions", 1))


def _shifted(mat: Tensor, shift: float) -> Tensor:
    return mat + shift * torch.eye(mat.shape[0], dtype=mat.dtype, device=mat.device)


class KFAC(LayerwiseApprox):
    r"""Kronecker-factored approximate curvature.

    Each layer's Fisher block is approximated by $G \otimes A$ with the running
    averages of the factors of
    [`curvlib.core.conventions`][curvlib.core.conventions] (KFC's convention for
    convolutions), and inverted with the damping rule of
    [`KFACDamping`][curvlib.approx.kfac.KFACDamping].

    Cost per layer with $d_o$ rows and $d_i$ columns: update $O(d_o^2 + d_i^2)$
    (the factor products are the extractor's); inverse two Cholesky
    factorisations $O(d_o^3 + d_i^3)$ (``PI``, ``SQRT``) or two eigendecompositions
    (``EIGEN``, several times slower); apply $O(d_o d_i (d_o + d_i))$
    (``EIGEN``: twice that).

    Example:
        >>> approx = KFAC(damping_mode=KFACDamping.PI)
        >>> approx.required_stats == frozenset({StatKind.KRONECKER})
        True

    Args:
        damping_mode: How $\lambda$ is applied.
        decay: Upper bound of the running-average weight on the old estimate.
        dtype: Storage dtype of the factors (default: that of the statistics).
        conv_damping: How layers with several output positions are damped
            ([`ConvDamping`][curvlib.approx.kfac.ConvDamping]; ``PER_POSITION``:
            $\lambda / T$ as in the KPSVD papers' code, which changes ``SQRT`` only).
        apply_dtype: The dtype the inverse is applied in on every step:
            ``"auto"`` (the default) multiplies in bfloat16 for float32 factors
            on CPUs that multiply bfloat16 in hardware (AMX, AVX-512 bfloat16),
            layers large enough to gain and damped inverses
            with condition numbers of at most 64
            ([`curvlib.linalg.precision`][curvlib.linalg.precision]), else in
            the factors' dtype; ``None`` always in the factors' dtype; or a
            dtype such as ``torch.bfloat16``. Factors and inverses keep ``dtype``.

    References:
        J. Martens and R. Grosse, "Optimizing neural networks with Kronecker-factored
        approximate curvature", ICML 2015. R. Grosse and J. Martens, "A
        Kronecker-factored approximate Fisher matrix for convolution layers", ICML 2016.
        A. Koroko et al., "Efficient approximations of the Fisher matrix in neural
        networks using Kronecker product singular value decomposition", ESAIM:
        Proceedings and Surveys, 2023 (``SQRT`` and ``PER_POSITION``).
    """

    required_stats: ClassVar[frozenset[StatKind]] = frozenset({StatKind.KRONECKER})
    shares_inverses: ClassVar[bool] = True

    def __init__(
        self,
        damping_mode: KFACDamping | str = KFACDamping.PI,
        decay: float = DEFAULT_DECAY,
        dtype: torch.dtype | None = None,
        conv_damping: ConvDamping | str = ConvDamping.UNIFORM,
        apply_dtype: ApplyDtype = "auto",
    ) -> None:
        super().__init__(decay=decay, dtype=dtype)
        self.damping_mode = KFACDamping(damping_mode)
        self.conv_damping = ConvDamping(conv_damping)
        self.apply_dtype = check_apply_dtype(apply_dtype)

    def _make_block(self, out_dim: int, in_dim: int) -> LayerBlock:
        return _KFACBlock(
            out_dim, in_dim, self.dtype, self.damping_mode, self.conv_damping, self.apply_dtype
        )
