r"""$\mathcal R(F)$ on coordinate vectors, common to the matrix-free and sample-space forms.

[`power_svd`][curvlib.linalg.power_svd] and
[`lanczos_svd`][curvlib.linalg.lanczos_svd] work on
[`Coordinates`][curvlib.linalg.Coordinates]; a matrix-free
[`RearrangedOperator`][curvlib.linalg.RearrangedOperator] is wrapped into
flattened matrices by ``coordinates``. The starts of the iterations live here
too.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from curvlib.linalg.rearrange.fisher import RearrangedOperator


class Coordinates(ABC):
    r"""$\mathcal R$ acting on coordinate vectors, with the Frobenius geometry of the matrices.

    [`power_svd`][curvlib.linalg.power_svd] and
    [`lanczos_svd`][curvlib.linalg.lanczos_svd] run on coordinates:
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
    def matvec(self, v: Tensor, metric: Tensor | None = None) -> Tensor:
        r"""Coordinates of $\mathcal R V$ from those of $V$.

        ``metric``: ``metric_in(v)`` where the caller has it already; the
        sample-space form then needs no product of its own (its image is a
        weighting of it).
        """

    @abstractmethod
    def rmatvec(self, u: Tensor, metric: Tensor | None = None) -> Tensor:
        r"""Coordinates of $\mathcal R^\top U$ from those of $U$ (``metric``: ``metric_out(u)``)."""

    @abstractmethod
    def metric_in(self, v: Tensor) -> Tensor:
        r"""``v`` through the input side's Gram matrix: $\langle V_j, V\rangle_F = b_j^\top m$.

        For the coordinates $b_j$ of any $V_j$. The iterations keep these
        images next to their vectors, so that inner products and norms cost
        no further product.
        """

    @abstractmethod
    def metric_out(self, u: Tensor) -> Tensor:
        r"""``u`` through the output side's Gram matrix (as ``metric_in``)."""

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

    def inner_in(self, basis: Tensor, v: Tensor) -> Tensor:
        r"""$\langle V_j, V\rangle_F$ for the rows of ``basis`` (``[m, dim]``, or one vector)."""
        return basis @ self.metric_in(v)

    def inner_out(self, basis: Tensor, u: Tensor) -> Tensor:
        r"""$\langle U_j, U\rangle_F$ for the rows of ``basis``."""
        return basis @ self.metric_out(u)

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

    def matvec(self, v: Tensor, metric: Tensor | None = None) -> Tensor:
        return self.op.matvec(v.view(self.in_dim, self.in_dim)).reshape(-1)

    def rmatvec(self, u: Tensor, metric: Tensor | None = None) -> Tensor:
        return self.op.rmatvec(u.view(self.out_dim, self.out_dim)).reshape(-1)

    def metric_in(self, v: Tensor) -> Tensor:
        return v

    def metric_out(self, u: Tensor) -> Tensor:
        return u

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
    r"""[`Deflated`][curvlib.linalg.Deflated] for terms given by coordinates.

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

    def matvec(self, v: Tensor, metric: Tensor | None = None) -> Tensor:
        r"""$\mathcal R v - \sum_j \langle a_j, v\rangle g_j$: one product of ``op``'s."""
        metric = self.op.metric_in(v) if metric is None else metric
        out = self.op.matvec(v, metric)
        for g, a in self.terms:
            out = out - (a @ metric) * g
        return out

    def rmatvec(self, u: Tensor, metric: Tensor | None = None) -> Tensor:
        r"""$\mathcal R^\top u - \sum_j \langle g_j, u\rangle a_j$."""
        metric = self.op.metric_out(u) if metric is None else metric
        out = self.op.rmatvec(u, metric)
        for g, a in self.terms:
            out = out - (g @ metric) * a
        return out

    def metric_in(self, v: Tensor) -> Tensor:
        """As ``op``."""
        return self.op.metric_in(v)

    def metric_out(self, u: Tensor) -> Tensor:
        """As ``op``."""
        return self.op.metric_out(u)

    def start(self, v0: Tensor | None, u0: Tensor | None) -> Tensor:
        """The start of ``op``; a deflated term in it is annihilated by the first product."""
        return self.op.start(v0, u0)

    def in_matrix(self, v: Tensor) -> Tensor:
        """As ``op``."""
        return self.op.in_matrix(v)

    def out_matrix(self, u: Tensor) -> Tensor:
        """As ``op``."""
        return self.op.out_matrix(u)


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
