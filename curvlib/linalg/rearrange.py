r"""The Van Loan–Pitsianis rearrangement of a layer's Fisher block, matrix-free.

For the per-sample gradient matrices $\bar W_{kn} \in \mathbb{R}^{d_o \times d_i}$
of one layer ([`curvlib.core.conventions`][curvlib.core.conventions]), the
block $F = \frac1N \sum_{k,n} \operatorname{vec}(\bar W_{kn})
\operatorname{vec}(\bar W_{kn})^\top$ satisfies
$\|F - G \otimes A\|_F = \|\mathcal R(F) - \operatorname{vec}(G)
\operatorname{vec}(A)^\top\|_F$ with the rearrangement

$$\mathcal R(F)\operatorname{vec}(V) = \operatorname{vec}\Big(\frac1N \sum_{k,n}
\bar W_{kn} V \bar W_{kn}^\top\Big), \qquad
\mathcal R(F)^\top\operatorname{vec}(U) = \operatorname{vec}\Big(\frac1N \sum_{k,n}
\bar W_{kn}^\top U \bar W_{kn}\Big),$$

a map from $d_i \times d_i$ to $d_o \times d_o$ matrices. So the best sums of
Kronecker products are the leading singular triples of $\mathcal R(F)$
(Van Loan & Pitsianis 1993), found here by power iterations
([`power_svd`][curvlib.linalg.rearrange.power_svd], with
[`Deflated`][curvlib.linalg.rearrange.Deflated] operators for later pairs) or by
restarted Golub–Kahan–Lanczos bidiagonalisation
([`lanczos_svd`][curvlib.linalg.rearrange.lanczos_svd]).

**Symmetric factors.** $F = F^\top$ makes $\mathcal R(F)$ commute with
transposition, $\mathcal R(F)\operatorname{vec}(V^\top) =
\operatorname{vec}(U^\top)$, so its singular vectors split into symmetric and
antisymmetric matrices. Only symmetric factors give a usable preconditioner, so
[`RearrangedFisher`][curvlib.linalg.rearrange.RearrangedFisher] restricts
$\mathcal R(F)$ to symmetric matrices by default: its singular triples are then
the best Kronecker sums with symmetric factors. The top pair of a positive
semi-definite $F$ is symmetric anyway (Van Loan & Pitsianis, theorem 5.8), and
both its factors are definite with one sign.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from curvlib.core.stats import PerSampleIO
from curvlib.linalg.factors import eigh, flush_subnormals, symmetrize

_BREAKDOWN = 1e3
"""Round-off level, in machine epsilons times the operator's size (breakdowns, zero pairs)."""

_TOL_FLOOR = 1e3
r"""Smallest stopping tolerance, in machine epsilons of the operator's dtype.

Products with $\mathcal R$ in float32 resolve the residuals only to about
$10^2\epsilon$: on the MNIST autoencoder's layers the power-iteration residual
stagnates at 1e-5 to 3e-5, so a tolerance of 1e-6 ran every update into the
iteration cap. 1e3 eps is 1.2e-4 in float32 and 2.2e-13 in float64.
"""


def effective_tol(tol: float, dtype: torch.dtype) -> float:
    """``tol``, raised to the round-off level of ``dtype`` (``_TOL_FLOOR`` epsilons)."""
    return max(tol, _TOL_FLOOR * torch.finfo(dtype).eps)


class RearrangedOperator(Protocol):
    """A linear map from ``[in_dim, in_dim]`` to ``[out_dim, out_dim]`` matrices and its adjoint."""

    out_dim: int
    in_dim: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, V: Tensor) -> Tensor:
        """Apply the map to ``[..., in_dim, in_dim]`` matrices."""

    def rmatvec(self, U: Tensor) -> Tensor:
        """Apply the adjoint to ``[..., out_dim, out_dim]`` matrices."""


class RearrangedFisher:
    r"""$\mathcal R(F)$ of one layer, from its per-sample inputs and output gradients.

    With one output position ($T = 1$) $\bar W_{kn} = g_{kn}\bar a_n^\top$ is rank
    one and $\mathcal R(F)\operatorname{vec}(V) = \frac1N\sum_{k,n}
    (\bar a_n^\top V \bar a_n)\, g_{kn} g_{kn}^\top$: a product costs
    $O(N d_i^2 + KN d_o^2)$ and no per-sample gradient is formed. With several
    positions the exact $\bar W_{kn}$ are formed once ($KN d_o d_i$ memory) and a
    product costs $O(KN d_o d_i (d_o + d_i))$.

    Args:
        io: The layer's per-sample inputs and output gradients.
        symmetric: Restrict to symmetric matrices (module docstring): inputs are
            projected onto $(M + M^\top)/2$; the images of symmetric matrices
            are symmetric (up to rounding), so outputs need no projection.
        dtype: Compute in this dtype (default: that of ``io``).
    """

    def __init__(
        self, io: PerSampleIO, symmetric: bool = True, dtype: torch.dtype | None = None
    ) -> None:
        if dtype is not None:
            io = PerSampleIO(io.inputs.to(dtype), io.output_grads.to(dtype))
        self.symmetric = symmetric
        self.out_dim = int(io.output_grads.shape[-1])
        self.in_dim = int(io.inputs.shape[-1])
        self.dtype = io.inputs.dtype
        self.device = io.inputs.device
        self._num_samples = io.inputs.shape[0]
        self._inputs: Tensor | None = None  # [N, in]  (one position)
        self._grads: Tensor | None = None  # [K, N, out]  (one position)
        self._weights: Tensor | None = None  # [K N, out, in]  (several positions)
        if io.inputs.shape[1] == 1:
            self._inputs, self._grads = io.inputs[:, 0, :], io.output_grads[:, :, 0, :]
        else:
            self._weights = io.grads().flatten(0, 1)

    def _project(self, mat: Tensor) -> Tensor:
        return symmetrize(mat) if self.symmetric else mat

    def matvec(self, V: Tensor) -> Tensor:
        r"""$\frac1N\sum_{k,n} \bar W_{kn} V \bar W_{kn}^\top$ for ``[..., in, in]`` $V$."""
        V = self._project(V)
        if self._weights is None:
            assert self._inputs is not None and self._grads is not None
            a, g = self._inputs, self._grads  # [N, in], [K, N, out]
            quad = ((a @ V) * a).sum(-1)  # a_n^T V a_n, [..., N]
            weights = quad.unsqueeze(-2).expand(*quad.shape[:-1], g.shape[0], -1)
            flat = g.flatten(0, 1)  # [K N, out]
            out = (flat.T * weights.flatten(-2).unsqueeze(-2)) @ flat
        else:
            # einsum, not a broadcast matmul: that takes milliseconds on CPU (torch 2.14).
            left = torch.einsum("moi,...ij->...moj", self._weights, V)
            out = torch.einsum("...moj,mpj->...op", left, self._weights)
        return out / self._num_samples

    def rmatvec(self, U: Tensor) -> Tensor:
        r"""$\frac1N\sum_{k,n} \bar W_{kn}^\top U \bar W_{kn}$ for ``[..., out, out]`` $U$."""
        U = self._project(U)
        if self._weights is None:
            assert self._inputs is not None and self._grads is not None
            a, g = self._inputs, self._grads
            quad = ((g @ U.unsqueeze(-3)) * g).sum((-1, -3))  # sum_k g_kn^T U g_kn, [..., N]
            out = (a.T * quad.unsqueeze(-2)) @ a
        else:
            left = torch.einsum("...op,mpj->...moj", U, self._weights)
            out = torch.einsum("moi,...moj->...ij", self._weights, left)
        return out / self._num_samples


class Deflated:
    r"""An operator minus Kronecker terms.

    $\mathcal R - \sum_j \operatorname{vec}(G_j)\operatorname{vec}(A_j)^\top$.
    Deflating by the leading singular pairs $(\sqrt{\sigma_j} U_j, \sqrt{\sigma_j}
    V_j)$ moves the next pair to the top; deflating by a KFAC term $(G, A)$ gives
    the rearranged residual $\mathcal R(F - G\otimes A)$.

    Args:
        op: The operator to deflate.
        terms: Pairs ``(G_j, A_j)`` with shapes ``[out, out]`` and ``[in, in]``.
    """

    def __init__(self, op: RearrangedOperator, terms: Sequence[tuple[Tensor, Tensor]]) -> None:
        self.op, self.terms = op, tuple(terms)
        self.out_dim, self.in_dim = op.out_dim, op.in_dim
        self.dtype, self.device = op.dtype, op.device

    def matvec(self, V: Tensor) -> Tensor:
        r"""$\mathcal R\operatorname{vec}(V) - \sum_j \langle A_j, V\rangle G_j$."""
        out = self.op.matvec(V)
        for G, A in self.terms:
            out = out - (V * A).sum((-2, -1), keepdim=True) * G
        return out

    def rmatvec(self, U: Tensor) -> Tensor:
        r"""$\mathcal R^\top\operatorname{vec}(U) - \sum_j \langle G_j, U\rangle A_j$."""
        out = self.op.rmatvec(U)
        for G, A in self.terms:
            out = out - (U * G).sum((-2, -1), keepdim=True) * A
        return out


class Coordinates(ABC):
    r"""$\mathcal R$ acting on coordinate vectors, with the Frobenius geometry of the matrices.

    [`power_svd`][curvlib.linalg.rearrange.power_svd] and
    [`lanczos_svd`][curvlib.linalg.rearrange.lanczos_svd] run on coordinates:
    flattened matrices for the matrix-free form (Euclidean inner product), or
    coefficients over the rank-one terms of $\mathcal R(F)$ for the sample-space
    form ([`SampleSpaceFisher`][curvlib.linalg.sample_space.SampleSpaceFisher],
    whose inner product is a Gram matrix). Coordinates are 1-d tensors; linear
    combinations of them represent the same combinations of matrices.

    Attributes:
        out_dim: Side of the output matrices.
        in_dim: Side of the input matrices.
        dtype: Working dtype of the statistics (it sets the tolerances).
        device: Device of the statistics.
        stall_window: Stop power iterations once the residual has not reached a
            new minimum for this many iterations (``None``: never). For
            coordinates whose norms come from an ill-conditioned Gram matrix,
            where the residual bottoms out above the requested tolerance.
    """

    out_dim: int
    in_dim: int
    dtype: torch.dtype
    device: torch.device
    stall_window: int | None = None

    @abstractmethod
    def matvec(self, v: Tensor) -> Tensor:
        r"""Coordinates of $\mathcal R V$ from those of $V$."""

    @abstractmethod
    def rmatvec(self, u: Tensor) -> Tensor:
        r"""Coordinates of $\mathcal R^\top U$ from those of $U$."""

    @abstractmethod
    def inner_in(self, basis: Tensor, v: Tensor) -> Tensor:
        r"""$\langle V_j, V\rangle_F$ for the rows of ``basis`` (``[m, dim]``, or one vector)."""

    @abstractmethod
    def inner_out(self, basis: Tensor, u: Tensor) -> Tensor:
        r"""$\langle U_j, U\rangle_F$ for the rows of ``basis``."""

    @abstractmethod
    def start(self, v0: Tensor | None, u0: Tensor | None) -> Tensor:
        """Coordinates of a start on the input side (not normalised; zero if none exists)."""

    @abstractmethod
    def in_matrix(self, v: Tensor) -> Tensor:
        """The ``[in, in]`` matrix of input coordinates, in ``dtype``."""

    @abstractmethod
    def out_matrix(self, u: Tensor) -> Tensor:
        """The ``[out, out]`` matrix of output coordinates, in ``dtype``."""

    def psd_part(self, coords: Tensor) -> Tensor | None:
        """Coordinates of a positive semi-definite matrix near the one of ``coords``.

        ``None`` (the default) where only an eigendecomposition of the matrix
        can tell; works for either side.
        """
        return None

    def norm_in(self, v: Tensor) -> float:
        """Frobenius norm of the input matrix with coordinates ``v``."""
        return math.sqrt(max(float(self.inner_in(v, v)), 0.0))

    def norm_out(self, u: Tensor) -> float:
        """Frobenius norm of the output matrix with coordinates ``u``."""
        return math.sqrt(max(float(self.inner_out(u, u)), 0.0))


class _Flattened(Coordinates):
    """A matrix-free operator on flattened matrices (the Euclidean inner product)."""

    def __init__(self, op: RearrangedOperator) -> None:
        self.op = op
        self.out_dim, self.in_dim, self.dtype, self.device = (
            op.out_dim, op.in_dim, op.dtype, op.device
        )  # fmt: skip

    def matvec(self, v: Tensor) -> Tensor:
        return self.op.matvec(v.view(self.in_dim, self.in_dim)).reshape(-1)

    def rmatvec(self, u: Tensor) -> Tensor:
        return self.op.rmatvec(u.view(self.out_dim, self.out_dim)).reshape(-1)

    def inner_in(self, basis: Tensor, v: Tensor) -> Tensor:
        return basis @ v

    def inner_out(self, basis: Tensor, u: Tensor) -> Tensor:
        return basis @ u

    def norm_in(self, v: Tensor) -> float:
        return float(v.norm())

    def norm_out(self, u: Tensor) -> float:
        return float(u.norm())

    def start(self, v0: Tensor | None, u0: Tensor | None) -> Tensor:
        return _start(self.op, v0, u0).reshape(-1)

    def in_matrix(self, v: Tensor) -> Tensor:
        return v.view(self.in_dim, self.in_dim)

    def out_matrix(self, u: Tensor) -> Tensor:
        return u.view(self.out_dim, self.out_dim)


def coordinates(op: RearrangedOperator | Coordinates) -> Coordinates:
    """``op`` itself when it works on coordinates, else its flattened-matrix form."""
    return op if isinstance(op, Coordinates) else _Flattened(op)


class DeflatedCoordinates(Coordinates):
    r"""[`Deflated`][curvlib.linalg.rearrange.Deflated] for terms given by coordinates.

    $\mathcal R - \sum_j \operatorname{vec}(G_j)\operatorname{vec}(A_j)^\top$ with
    $G_j$, $A_j$ given by their coordinates in ``op``: in the sample-space form a
    product stays $O(\text{coordinates}^2)$, where deflating by matrices would
    need their inner products with every term of $\mathcal R(F)$.

    Args:
        op: The operator to deflate.
        terms: Coordinate pairs ``(g_j, a_j)`` of ``op``'s output and input side.
    """

    def __init__(self, op: Coordinates, terms: Sequence[tuple[Tensor, Tensor]]) -> None:
        self.op, self.terms = op, tuple(terms)
        self.stall_window = op.stall_window
        self.out_dim, self.in_dim, self.dtype, self.device = (
            op.out_dim, op.in_dim, op.dtype, op.device
        )  # fmt: skip

    def matvec(self, v: Tensor) -> Tensor:
        r"""$\mathcal R v - \sum_j \langle a_j, v\rangle g_j$."""
        out = self.op.matvec(v)
        for g, a in self.terms:
            out = out - self.op.inner_in(a, v) * g
        return out

    def rmatvec(self, u: Tensor) -> Tensor:
        r"""$\mathcal R^\top u - \sum_j \langle g_j, u\rangle a_j$."""
        out = self.op.rmatvec(u)
        for g, a in self.terms:
            out = out - self.op.inner_out(g, u) * a
        return out

    def inner_in(self, basis: Tensor, v: Tensor) -> Tensor:
        """As ``op``."""
        return self.op.inner_in(basis, v)

    def inner_out(self, basis: Tensor, u: Tensor) -> Tensor:
        """As ``op``."""
        return self.op.inner_out(basis, u)

    def start(self, v0: Tensor | None, u0: Tensor | None) -> Tensor:
        """The start of ``op``; a deflated term in it is annihilated by the first product."""
        return self.op.start(v0, u0)

    def in_matrix(self, v: Tensor) -> Tensor:
        """As ``op``."""
        return self.op.in_matrix(v)

    def out_matrix(self, u: Tensor) -> Tensor:
        """As ``op``."""
        return self.op.out_matrix(u)


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
            sine criterion of [`power_svd`][curvlib.linalg.rearrange.power_svd].
        u: Coordinates of ``U`` in the operator it was computed from
            ([`Coordinates`][curvlib.linalg.rearrange.Coordinates]).
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
    [`Coordinates.psd_part`][curvlib.linalg.rearrange.Coordinates.psd_part]
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
    [`balanced_factors`][curvlib.linalg.rearrange.balanced_factors]; operators on
    coordinates by the triple's coordinates scaled the same way
    ([`DeflatedCoordinates`][curvlib.linalg.rearrange.DeflatedCoordinates]).

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


def psd_start(op: RearrangedOperator | Coordinates, v0: Tensor | None = None) -> Tensor | None:
    r"""A positive semi-definite start for the top pair of a positive semi-definite $F$.

    ``v0`` (e.g. the previous step's $A$) when given, else the identity for a
    matrix-free operator and ``None`` for one on coordinates (whose own start,
    e.g. the batch's KFAC factor in the sample-space form, is positive
    semi-definite). Both products map positive semi-definite matrices to
    positive semi-definite ones ($\sum_{k,n} \bar W_{kn} V \bar W_{kn}^\top$ is a
    nonnegative combination), so every power iterate from such a start,
    converged or not, is positive semi-definite up to rounding: no eigenvalue
    clamp is needed. The identity is never orthogonal to the top pair,
    $\langle I, V_1\rangle = \operatorname{tr} V_1 > 0$.
    """
    if v0 is not None or isinstance(op, Coordinates):
        return v0
    return torch.eye(op.in_dim, dtype=op.dtype, device=op.device)


def _start(op: RearrangedOperator, v0: Tensor | None, u0: Tensor | None) -> Tensor:
    """The normalised start: ``v0``, else ``R^T u0``, else a fixed generic symmetric matrix."""
    dtype, device = op.dtype, op.device
    candidates = [v0, None if u0 is None else op.rmatvec(u0.to(device, dtype))]
    for cand in candidates:
        if cand is not None and bool(torch.isfinite(cand).all()) and float(cand.norm()) > 0:
            start: Tensor = cand.to(device, dtype)
            return start.div(start.norm())
    # Cold start: the identity plus a deterministic perturbation.
    t = torch.arange(op.in_dim, dtype=dtype, device=device)
    wiggle = torch.sin(1.0 + t[:, None] * t[None, :] + t[:, None] + t[None, :])
    start = torch.eye(op.in_dim, dtype=dtype, device=device) / math.sqrt(op.in_dim)
    start = start + wiggle * (0.1 / wiggle.norm())
    return start.div(start.norm())


def power_svd(
    op: RearrangedOperator | Coordinates,
    v0: Tensor | None = None,
    u0: Tensor | None = None,
    *,
    tol: float = 1e-6,
    max_iter: int = 100,
    scale: float = 0.0,
) -> SingularTriple:
    r"""The top singular triple by power iterations on $\mathcal R^\top\mathcal R$.

    Each iteration computes $u = \mathcal R v / \|\mathcal R v\|$,
    $w = \mathcal R^\top u$, and stops once $\|w - \langle u, \mathcal R v\rangle
    v\|_F \le \text{tol}\, \|w\|_F$ (the sine of the angle between $v$ and its
    image). The error shrinks by $(\sigma_2/\sigma_1)^2$ per iteration, so a warm
    start from the previous step's factor saves most of them.

    Args:
        op: The operator, matrix-free or on coordinates
            ([`Coordinates`][curvlib.linalg.rearrange.Coordinates]).
        v0: Warm start on the input side (``[in, in]``; need not be normalised).
        u0: Warm start on the output side, used when ``v0`` is missing.
        tol: Relative residual at which to stop (raised to
            [`effective_tol`][curvlib.linalg.rearrange.effective_tol] of the
            operator's dtype: a smaller one is below round-off).
        max_iter: Cap on the iterations.
        scale: Size of the operator that ``op`` was deflated from (e.g. its
            $\sigma_1$): a singular value at round-off level of it,
            $\|\mathcal R v\| \le 10^3 \epsilon \cdot$ ``scale``, counts as zero.

    Returns:
        The triple; ``sigma = 0`` with zero matrices when $\mathcal R v$ is zero
        (or at round-off level of ``scale``).

    Raises:
        ValueError: If ``max_iter < 1``.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter!r}.")
    space = coordinates(op)
    tol = effective_tol(tol, space.dtype)
    tiny = _BREAKDOWN * torch.finfo(space.dtype).eps * scale
    v = space.start(v0, u0)
    size = space.norm_in(v)
    if not size > 0:
        return _zero_triples(1, space, 1)[0]
    v = v / size
    u, sigma, residual = v, 0.0, math.inf
    best, stalled = math.inf, 0
    for iteration in range(1, max_iter + 1):
        image = space.matvec(v)
        alpha = space.norm_out(image)
        if not alpha > tiny:
            return _zero_triples(1, space, iteration)[0]
        u = image / alpha
        w = space.rmatvec(u)
        beta = space.norm_in(w)
        if not beta > tiny:  # beta >= alpha in exact arithmetic: a breakdown at round-off
            return _zero_triples(1, space, iteration)[0]
        residual = space.norm_in(w - alpha * v) / beta
        v, sigma = w / beta, beta
        if residual <= tol:
            break
        best, stalled = (residual, 0) if residual < best else (best, stalled + 1)
        if space.stall_window is not None and stalled >= space.stall_window:
            break
    U, V = space.out_matrix(u), space.in_matrix(v)
    return SingularTriple(sigma, U, V, iteration, residual, u, v)


def _orthogonalise(
    space: Coordinates, w: Tensor, basis: list[Tensor], side: str
) -> tuple[Tensor, Tensor]:
    """Remove the components along an orthonormal basis (Gram–Schmidt twice)."""
    if not basis:
        return w, w.new_zeros(0)
    inner = space.inner_out if side == "out" else space.inner_in
    Q = torch.stack(basis)
    coef = inner(Q, w)
    w = w - coef @ Q
    again = inner(Q, w)
    return w - again @ Q, coef + again


def lanczos_svd(
    op: RearrangedOperator | Coordinates,
    rank: int = 2,
    v0: Tensor | None = None,
    *,
    krylov_dim: int = 10,
    tol: float = 1e-6,
    max_restarts: int = 20,
) -> tuple[SingularTriple, ...]:
    r"""The top ``rank`` singular triples by restarted Golub–Kahan–Lanczos bidiagonalisation.

    Builds orthonormal $V_k$, $U_k$ with $\mathcal R V_k = U_k B_k$ and
    $\mathcal R^\top U_k = V_k B_k^\top + \beta_k v_{k+1} e_k^\top$ (full
    reorthogonalisation), takes the Ritz triples from the SVD $B_k = X \Sigma
    Y^\top$ and stops once every wanted residual $\beta_k |X_{ki}| \le
    \text{tol}\,\sigma_1$. Otherwise it thick-restarts (Baglama & Reichel 2005)
    from the ``rank + 1`` leading Ritz vectors and $v_{k+1}$. A breakdown
    ($\alpha_j$ or $\beta_j$ at round-off level) means an invariant subspace was
    found and the triples are exact: with rank$(\mathcal R) \le$ ``rank`` the
    result is the exact rearranged block. Cost per restart: ``krylov_dim``
    products with $\mathcal R$ and $\mathcal R^\top$ and the reorthogonalisation,
    $O(k^2 (d_o^2 + d_i^2))$ matrix-free, $O(k^2 N)$ plus $k$ Gram products in
    the sample-space form.

    Args:
        op: The operator, matrix-free or on coordinates
            ([`Coordinates`][curvlib.linalg.rearrange.Coordinates]).
        rank: How many triples.
        v0: Start on the input side (``[in, in]``, e.g. a sum of the previous
            factors); the operator's own start when missing or zero (the cold
            start of [`power_svd`][curvlib.linalg.rearrange.power_svd] for a
            matrix-free one).
        krylov_dim: Largest Krylov dimension $k$ before a restart.
        tol: Relative residual at which to stop (raised to
            [`effective_tol`][curvlib.linalg.rearrange.effective_tol] of the
            operator's dtype).
        max_restarts: Cap on the restarts.

    Returns:
        ``rank`` triples by decreasing $\sigma$; missing ones (rank$(\mathcal R) <$
        ``rank``) have $\sigma = 0$ and zero matrices. ``iterations`` counts all
        products of the call.

    Raises:
        ValueError: If ``krylov_dim < rank + 2``.
    """
    if krylov_dim < rank + 2:
        raise ValueError(f"krylov_dim must be at least rank + 2 = {rank + 2}, got {krylov_dim}.")
    space = coordinates(op)
    tol = effective_tol(tol, space.dtype)
    first = space.start(v0, None)
    size = space.norm_in(first)
    if not size > 0:
        return _zero_triples(rank, space, 0)
    Vs = [first / size]
    like = Vs[0]
    Us: list[Tensor] = []
    B = like.new_zeros(krylov_dim, krylov_dim)
    scale, beta, products = 0.0, 0.0, 0
    tiny = _BREAKDOWN * torch.finfo(space.dtype).eps
    for restart in range(max_restarts + 1):
        broke = ""
        for j in range(len(Us), krylov_dim):
            w, coef = _orthogonalise(space, space.matvec(Vs[j]), Us, "out")
            products += 1
            B[:j, j] = coef
            alpha = space.norm_out(w)
            scale = max(scale, alpha, float(coef.abs().max()) if j else 0.0)
            if alpha <= tiny * scale:
                broke = "alpha"
                break
            B[j, j] = alpha
            Us.append(w / alpha)
            f, _ = _orthogonalise(space, space.rmatvec(Us[j]), Vs, "in")
            beta = space.norm_in(f)
            if beta <= tiny * scale:
                broke = "beta"
                break
            Vs.append(f / beta)  # after the last step: the residual direction v_{k+1}
        m = len(Us)
        if m == 0:
            break
        U_basis = torch.stack(Us)
        V_basis = torch.stack(Vs[: m + 1] if broke == "alpha" else Vs[:m])
        X, s, Yt = torch.linalg.svd(B[:m, : V_basis.shape[0]], full_matrices=False)
        left, right = X.T @ U_basis, Yt @ V_basis  # Ritz vectors, as rows
        residuals = [0.0] * m if broke else (beta * X[-1].abs() / s[0]).tolist()
        if broke or restart == max_restarts or max(residuals[:rank]) <= tol:
            triples = tuple(
                SingularTriple(
                    float(s[i]),
                    space.out_matrix(left[i]),
                    space.in_matrix(right[i]),
                    products,
                    residuals[i],
                    left[i],
                    right[i],
                )
                for i in range(min(rank, m))
            )
            return triples + _zero_triples(rank - len(triples), space, products)
        # Thick restart: keep the leading Ritz pairs and the residual direction v_{k+1}.
        keep = min(rank + 1, m - 1)
        Us, Vs = list(left[:keep]), [*right[:keep], Vs[-1]]
        B = like.new_zeros(krylov_dim, krylov_dim)
        B[:keep, :keep] = torch.diag(s[:keep])
    return _zero_triples(rank, space, products)


def _zero_triples(count: int, space: Coordinates, iterations: int) -> tuple[SingularTriple, ...]:
    dtype, device = space.dtype, space.device
    zero_u = torch.zeros(space.out_dim, space.out_dim, dtype=dtype, device=device)
    zero_v = torch.zeros(space.in_dim, space.in_dim, dtype=dtype, device=device)
    return tuple(SingularTriple(0.0, zero_u, zero_v, iterations, 0.0) for _ in range(count))
