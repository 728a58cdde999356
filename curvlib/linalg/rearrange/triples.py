r"""Singular triples of $\mathcal R(F)$ and the Kronecker factors they stand for.

A triple $(\sigma, U, V)$ is the term $\sigma\, U \otimes V$;
[`balanced_factors`][curvlib.linalg.balanced_factors] turns it into factors
$(G, A)$ that can be averaged across batches, and
[`deflated`][curvlib.linalg.deflated] removes it from the operator it came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlib.linalg.factors import eigh, flush_subnormals, symmetrize
from curvlib.linalg.rearrange.fisher import Deflated, RearrangedOperator, effective_tol
from curvlib.linalg.rearrange.spaces import Coordinates, DeflatedCoordinates


@dataclass(frozen=True)
class SingularTriple:
    r"""A singular triple $\mathcal R \operatorname{vec}(V) \approx \sigma \operatorname{vec}(U)$.

    Attributes:
        sigma: Singular value $\sigma \ge 0$.
        U: Left singular matrix, ``[out, out]``, unit Frobenius norm (zero if $\sigma = 0$).
        V: Right singular matrix, ``[in, in]``, unit Frobenius norm (zero if $\sigma = 0$).
        iterations: Products with $\mathcal R$ (each followed by one with
            $\mathcal R^\top$) spent on it; for Lanczos, on all its triples together.
        residual: $\|\mathcal R^\top U - \sigma V\|_F / \sigma_1$ (Lanczos) or the
            sine criterion of [`power_svd`][curvlib.linalg.power_svd].
        u: Coordinates of ``U`` in the operator it was computed from
            ([`Coordinates`][curvlib.linalg.Coordinates]).
        v: Coordinates of ``V``.
    """

    sigma: float
    U: Tensor
    V: Tensor
    iterations: int
    residual: float
    u: Tensor | None = None
    v: Tensor | None = None


def _balanced_scale(triple: SingularTriple) -> float:
    r"""The signed $\sqrt\sigma$ by which `balanced_factors` scales both sides."""
    V = triple.V
    trace = V.diagonal().sum()
    if bool(trace.abs() <= 1e3 * torch.finfo(V.dtype).eps * V.norm()):
        trace = V.flatten()[V.abs().argmax()]
    return math.sqrt(max(triple.sigma, 0.0)) * (1.0 if float(trace) >= 0 else -1.0)


def balanced_factors(triple: SingularTriple, *, psd: bool = False) -> tuple[Tensor, Tensor]:
    r"""The normalised Kronecker factors $(G, A)$ with $G\otimes A = \sigma\, U \otimes V$.

    The rule that makes factors from different batches comparable (so that they can
    be averaged): the sign makes $\operatorname{tr} A \ge 0$ (if the trace vanishes,
    the entry of $A$ of largest magnitude is made positive) and the scale is split
    evenly, $\|G\|_F = \|A\|_F = \sqrt\sigma$.

    Args:
        triple: The singular triple.
        psd: Clamp negative eigenvalues of both factors to zero (for the top pair
            of a positive semi-definite $F$, where they are round-off or
            truncation error of the iteration): one ``eigh`` per factor.

    Returns:
        ``(G, A)``, ``[out, out]`` and ``[in, in]``, contiguous (``torch.kron``
        of torch 2.14 rejects transposed inputs), subnormal entries flushed to
        zero ([`flush_subnormals`][curvlib.linalg.factors.flush_subnormals]).
    """
    scale = _balanced_scale(triple)
    G, A = scale * triple.U, scale * triple.V
    if psd:
        G, A = ((e.vectors * e.values) @ e.vectors.T for e in (eigh(G), eigh(A)))
    return flush_subnormals(symmetrize(G)), flush_subnormals(symmetrize(A))


def psd_factors(
    op: RearrangedOperator | Coordinates, triple: SingularTriple
) -> tuple[Tensor, Tensor]:
    r"""The factors of `balanced_factors` with ``psd=True``, without ``eigh`` where possible.

    For the top pair of a positive semi-definite $F$. Where ``op`` offers
    [`Coordinates.psd_part`][curvlib.linalg.Coordinates.psd_part]
    and it moves neither factor by more than ten times the triple's residual
    (its own error), the factors are formed from those coordinates: no
    ``eigh``. Otherwise each factor's negative eigenvalues are clamped.
    """
    if isinstance(op, Coordinates) and triple.u is not None and triple.v is not None:
        scale = _balanced_scale(triple)
        u, v = scale * triple.u, scale * triple.v
        pu, pv = op.psd_part(u), op.psd_part(v)
        slack = 10.0 * max(triple.residual, effective_tol(0.0, op.dtype)) * abs(scale)
        if (
            pu is not None
            and pv is not None
            and op.norm_out(u - pu) <= slack
            and op.norm_in(v - pv) <= slack
        ):
            # The matrices of the triple plus the (sparse) corrections.
            G = scale * triple.U + op.out_matrix(pu - u)
            A = scale * triple.V + op.in_matrix(pv - v)
            return flush_subnormals(symmetrize(G)), flush_subnormals(symmetrize(A))
    return balanced_factors(triple, psd=True)


def deflated(
    op: RearrangedOperator | Coordinates, triple: SingularTriple
) -> Deflated | Coordinates:
    r"""``op`` minus the balanced Kronecker term of ``triple`` (which ``op`` produced).

    Matrix-free operators are deflated by the matrices of
    [`balanced_factors`][curvlib.linalg.balanced_factors]; operators on
    coordinates by the triple's coordinates scaled the same way
    ([`DeflatedCoordinates`][curvlib.linalg.DeflatedCoordinates]).

    A zero triple (``sigma = 0`` without coordinates, what the power
    iterations return when $\mathcal R$ vanishes at round-off) leaves ``op`` as it is.

    Raises:
        ValueError: If ``op`` is on coordinates and a nonzero ``triple`` carries none.
    """
    if not isinstance(op, Coordinates):
        return Deflated(op, [balanced_factors(triple)])
    if triple.sigma == 0.0 and triple.u is None:
        return op  # a zero pair (the operator vanished at round-off): nothing to remove
    if triple.u is None or triple.v is None:
        raise ValueError("The triple has no coordinates: compute it with power_svd on this op.")
    scale = _balanced_scale(triple)
    return DeflatedCoordinates(op, [(scale * triple.u, scale * triple.v)])
