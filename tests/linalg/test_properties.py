"""Property tests of ``curvlib.linalg`` against dense references on random SPD inputs.

``hypothesis`` draws sizes, seeds, damping and dtype; every reference is a dense
solve or SVD written out here. Tolerances depend on the dtype (``RTOL``): the
damping is at least ``1e-2`` of factors of unit scale, so the damped operators
have condition numbers below about ``1e3`` and float32 keeps three digits.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from curvlib.linalg import (
    KroneckerSumInverse,
    damped_inverse,
    lanczos_svd,
    pi_split,
    power_svd,
    two_term_inverse,
    woodbury_solve,
)
from tests.dead_units import decoupled_from_the_first_dead_row

RTOL = {torch.float64: 1e-8, torch.float32: 2e-3}
"""Largest relative Frobenius error of a solve against its dense reference."""

SVD_RTOL = {torch.float64: 1e-6, torch.float32: 1e-3}
"""Largest relative error of a computed singular value (iterations stop at 1e-6)."""

FAST = settings(max_examples=25, deadline=None)

dtypes = st.sampled_from([torch.float64, torch.float32])
dampings = st.floats(min_value=1e-2, max_value=10.0)
sizes = st.integers(min_value=1, max_value=6)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def _spd(n: int, gen: torch.Generator, rank: int | None = None) -> Tensor:
    """A random symmetric PSD matrix of unit scale (singular when ``rank < n``)."""
    b = torch.randn(n, n if rank is None else rank, generator=gen, dtype=torch.float64)
    return b @ b.T / max(b.shape[1], 1)


def _rel(actual: Tensor, expected: Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300))


@FAST
@given(n=sizes, rank=st.integers(0, 6), damping=dampings, dtype=dtypes, seed=seeds)
def test_damped_inverse_inverts(
    n: int, rank: int, damping: float, dtype: torch.dtype, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    mat = _spd(n, gen, min(rank, n))
    inv = damped_inverse(mat.to(dtype), damping)
    expected = torch.linalg.inv(mat + damping * torch.eye(n, dtype=torch.float64))
    assert inv.dtype == dtype
    assert _rel(inv, expected) < RTOL[dtype]


@FAST
@given(d_out=sizes, d_in=sizes, damping=dampings, dtype=dtypes, seed=seeds)
def test_factored_kronecker_inverse_solves_the_damped_product(
    d_out: int, d_in: int, damping: float, dtype: torch.dtype, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    A, G = _spd(d_in, gen, rank=2), _spd(d_out, gen, rank=2)
    V = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    gamma_a, gamma_g = pi_split(A, G, damping)
    assert abs(gamma_a * gamma_g - damping) <= 1e-12 * damping
    inv_g = damped_inverse(G.to(dtype), gamma_g)
    inv_a = damped_inverse(A.to(dtype), gamma_a)
    got = inv_g @ V.to(dtype) @ inv_a
    # row-major vec: vec(G V A) = (G kron A) vec(V) for symmetric A
    dense = torch.kron(G + gamma_g * torch.eye(d_out, dtype=torch.float64),
                       A + gamma_a * torch.eye(d_in, dtype=torch.float64))  # fmt: skip
    expected = torch.linalg.solve(dense, V.reshape(-1)).reshape(d_out, d_in)
    assert _rel(got, expected) < RTOL[dtype]


@FAST
@given(d_out=sizes, d_in=sizes, damping=dampings, dtype=dtypes, seed=seeds)
def test_two_term_inverse_solves_the_damped_sum(
    d_out: int, d_in: int, damping: float, dtype: torch.dtype, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    G1, A1 = _spd(d_out, gen), _spd(d_in, gen)
    G2, A2 = _spd(d_out, gen, rank=1), _spd(d_in, gen, rank=1)  # PSD: no eigenvalue floored
    V = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    inverse = two_term_inverse(*(m.to(dtype) for m in (G1, A1, G2, A2)), damping)
    got = inverse(V.to(dtype))
    gamma_a, gamma_g = pi_split(A1, G1, damping)
    eye_g, eye_a = torch.eye(d_out, dtype=torch.float64), torch.eye(d_in, dtype=torch.float64)
    dense = torch.kron(G1 + gamma_g * eye_g, A1 + gamma_a * eye_a) + torch.kron(G2, A2)
    expected = torch.linalg.solve(dense, V.reshape(-1)).reshape(d_out, d_in)
    assert inverse.num_floored == 0
    assert _rel(got, expected) < RTOL[dtype]


def _symmetric(n: int, gen: torch.Generator, scale: float) -> Tensor:
    """A random symmetric indefinite matrix."""
    b = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return scale * (b + b.T) / 2


def _dense_floored(
    G1: Tensor, A1: Tensor, G2: Tensor, A2: Tensor, damping: float, min_eig: float
) -> tuple[Tensor, int]:
    r"""The dense floored operator of the $P \times P$ pair, and how many eigenvalues floored.

    The generalised eigenproblem of $K_2 = G_2 \otimes A_2$ against the damped first
    term $K_1$, solved densely: $K_1 = CC^\top$, $C^{-1}K_2C^{-\top} = Q\mu Q^\top$,
    and the operator $CQ \max(1 + \mu, \epsilon) (CQ)^\top$.
    """
    gamma_a, gamma_g = pi_split(A1, G1, damping)
    eye_g = torch.eye(G1.shape[0], dtype=torch.float64)
    eye_a = torch.eye(A1.shape[0], dtype=torch.float64)
    first = torch.kron(G1 + gamma_g * eye_g, A1 + gamma_a * eye_a)
    chol = torch.linalg.cholesky(first)
    whitened = torch.linalg.solve_triangular(chol, torch.kron(G2, A2), upper=False)
    whitened = torch.linalg.solve_triangular(chol, whitened.T, upper=False)
    mu, Q = torch.linalg.eigh((whitened + whitened.T) / 2)
    basis = chol @ Q
    floored = (basis * (1.0 + mu).clamp_min(min_eig)) @ basis.T
    return floored, int((1.0 + mu < min_eig).sum())


def _assert_inverts(
    inverse: KroneckerSumInverse, floored: Tensor, num_floored: int, gen: torch.Generator
) -> None:
    """``inverse`` applies ``floored``'s inverse to a random matrix and floored as many."""
    d_out, d_in = inverse.scale.shape
    V = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    expected = torch.linalg.solve(floored, V.reshape(-1)).reshape(d_out, d_in)
    assert inverse.num_floored == num_floored
    assert _rel(inverse(V), expected) < RTOL[torch.float64]


@FAST
@given(d_out=sizes, d_in=sizes, damping=dampings, scale=st.floats(0.1, 30.0), seed=seeds)
def test_two_term_inverse_of_an_indefinite_sum_inverts_the_dense_floored_operator(
    d_out: int, d_in: int, damping: float, scale: float, seed: int
) -> None:
    r"""The floor, against the generalised eigenproblem of the dense $P \times P$ pair."""
    gen = torch.Generator().manual_seed(seed)
    G1, A1 = _spd(d_out, gen), _spd(d_in, gen)
    G2, A2 = _symmetric(d_out, gen, scale), _symmetric(d_in, gen, 1.0)
    min_eig = 0.1
    inverse = two_term_inverse(G1, A1, G2, A2, damping, min_eig=min_eig)
    floored, num_floored = _dense_floored(G1, A1, G2, A2, damping, min_eig)
    _assert_inverts(inverse, floored, num_floored, gen)


def _kill(mat: Tensor, dead: Tensor) -> Tensor:
    """``mat`` with the rows and columns ``dead`` set to zero (dead units)."""
    mat = mat.clone()
    mat[dead] = 0.0
    mat[:, dead] = 0.0
    return mat


@FAST
@given(
    d_out=sizes,
    d_in=sizes,
    damping=dampings,
    scale=st.floats(0.1, 30.0),
    seed=seeds,
    dead_fraction=st.sampled_from([0.3, 0.6, 1.0]),
)
def test_two_term_inverse_with_dead_coordinates_inverts_the_dense_floored_operator(
    d_out: int, d_in: int, damping: float, scale: float, seed: int, dead_fraction: float
) -> None:
    """Rows zero in both terms: the dense floored pair's operator, logdet and Choleskys.

    ``two_term_inverse`` factorises the other coordinates apart (as the test above).
    """
    gen = torch.Generator().manual_seed(seed)
    dead_g = torch.rand(d_out, generator=gen) < dead_fraction
    dead_a = torch.rand(d_in, generator=gen) < dead_fraction
    G1, A1 = _kill(_spd(d_out, gen), dead_g), _kill(_spd(d_in, gen), dead_a)
    G2 = _kill(_symmetric(d_out, gen, scale), dead_g)
    A2 = _kill(_symmetric(d_in, gen, 1.0), dead_a)
    min_eig = 0.1
    with decoupled_from_the_first_dead_row():
        inverse = two_term_inverse(G1, A1, G2, A2, damping, min_eig=min_eig)
    floored, num_floored = _dense_floored(G1, A1, G2, A2, damping, min_eig)
    _assert_inverts(inverse, floored, num_floored, gen)
    want = float(torch.logdet(floored))
    assert float(inverse.logdet()) == pytest.approx(want, rel=1e-8, abs=1e-8)
    gamma_a, gamma_g = pi_split(A1, G1, damping)
    for got, factor, gamma in ((inverse.chol_G, G1, gamma_g), (inverse.chol_A, A1, gamma_a)):
        eye = torch.eye(factor.shape[0], dtype=torch.float64)
        assert _rel(got, torch.linalg.cholesky(factor + gamma * eye)) < RTOL[torch.float64]


@FAST
@given(m=st.integers(1, 8), p=st.integers(1, 12), damping=dampings, dtype=dtypes, seed=seeds)
def test_woodbury_solve_matches_the_dense_solve(
    m: int, p: int, damping: float, dtype: torch.dtype, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(m, p, generator=gen, dtype=torch.float64) / p**0.5
    v = torch.randn(3, p, generator=gen, dtype=torch.float64)
    got = woodbury_solve(rows.to(dtype), v.to(dtype), damping)
    dense = rows.T @ rows + damping * torch.eye(p, dtype=torch.float64)
    expected = torch.linalg.solve(dense, v.T).T
    assert _rel(got, expected) < RTOL[dtype]


class DenseRearranged:
    """A dense map from ``[in, in]`` to ``[out, out]`` matrices: ``vec(U) = M vec(V)``."""

    def __init__(self, mat: Tensor, out_dim: int, in_dim: int) -> None:
        self.mat, self.out_dim, self.in_dim = mat, out_dim, in_dim
        self.dtype, self.device = mat.dtype, mat.device

    def matvec(self, V: Tensor) -> Tensor:
        flat = V.reshape(*V.shape[:-2], -1) @ self.mat.T
        return flat.reshape(*V.shape[:-2], self.out_dim, self.out_dim)

    def rmatvec(self, U: Tensor) -> Tensor:
        flat = U.reshape(*U.shape[:-2], -1) @ self.mat
        return flat.reshape(*U.shape[:-2], self.in_dim, self.in_dim)


def _with_spectrum(
    out_dim: int, in_dim: int, gen: torch.Generator, dtype: torch.dtype
) -> tuple[DenseRearranged, Tensor]:
    """A dense operator with singular values 1, 1/2 and the rest below 1/4."""
    rows, cols = out_dim * out_dim, in_dim * in_dim
    k = min(rows, cols)
    left, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen, dtype=torch.float64))
    sigma = torch.rand(k, generator=gen, dtype=torch.float64) / 4
    sigma[0] = 1.0
    if k > 1:
        sigma[1] = 0.5
    mat = left @ torch.diag(sigma) @ right.T
    return DenseRearranged(mat.to(dtype), out_dim, in_dim), torch.linalg.svdvals(mat)


@FAST
@given(out_dim=st.integers(1, 4), in_dim=st.integers(1, 4), dtype=dtypes, seed=seeds)
def test_power_svd_finds_the_top_singular_triple(
    out_dim: int, in_dim: int, dtype: torch.dtype, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    op, sigma = _with_spectrum(out_dim, in_dim, gen, dtype)
    triple = power_svd(op, tol=1e-6, max_iter=500)  # type: ignore[arg-type]
    assert abs(triple.sigma - float(sigma[0])) < SVD_RTOL[dtype] * float(sigma[0])
    image = op.matvec(triple.V.to(dtype)).double()
    assert _rel(image, triple.sigma * triple.U.double()) < 10 * SVD_RTOL[dtype] ** 0.5


@FAST
@given(out_dim=st.integers(2, 4), in_dim=st.integers(2, 4), dtype=dtypes, seed=seeds)
def test_lanczos_svd_finds_the_top_two_singular_values(
    out_dim: int, in_dim: int, dtype: torch.dtype, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    op, sigma = _with_spectrum(out_dim, in_dim, gen, dtype)
    triples = lanczos_svd(op, rank=2, tol=1e-6)  # type: ignore[arg-type]
    for triple, expected in zip(triples, sigma[:2].tolist(), strict=True):
        assert abs(triple.sigma - expected) < SVD_RTOL[dtype] * float(sigma[0])
