r"""KPSVD, Deflation, KFAC-corrected and Lanczos against dense rearranged blocks (float64).

The library never forms $F$ or $\mathcal R(F)$; these tests do, from the
per-sample gradient matrices ``io.grads()``, and check the approximations
against the dense SVD of $\mathcal R(F)$ and against the exact block of
``tests.oracle.dense_ggn``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor

from curvlib.approx.base import LayerwiseApprox
from curvlib.approx.deflation import Deflation, KroneckerSumBlock
from curvlib.approx.kfac import KFAC
from curvlib.approx.kfac_corrected import KFACCorrected
from curvlib.approx.kpsvd import KPSVD
from curvlib.approx.lanczos import Lanczos
from curvlib.core import CurvatureStatistics, PerSampleIO, StatKind
from curvlib.linalg.rearrange import Deflated, RearrangedFisher, lanczos_svd, power_svd
from curvlib.linalg.sample_space import RearrangedForm
from tests import oracle
from tests import problems as P
from tests.approx.cases import PROBLEMS, fit_statistics, perturbed
from tests.approx.damping import paper_pi_split
from tests.problems import Problem

RTOL = 1e-8
"""Relative tolerance for converged iterations (tol 1e-12) against dense SVDs."""

TIGHT = {"tol": 1e-12}
POWER = {**TIGHT, "max_iter": 5000}

ALL_IO = frozenset({StatKind.KRONECKER, StatKind.PER_SAMPLE_IO})

FORM_CASES = [(problem, RearrangedForm.AUTO) for problem in PROBLEMS] + [
    (problem, form)
    for problem in PROBLEMS[:2]  # Linear and Conv2d; the transposed convolution's 50
    for form in (RearrangedForm.MATRIX_FREE, RearrangedForm.SAMPLE_SPACE)  # columns: too slow
]
"""Each form forced on the MLP and the CNN, and the per-layer choice on every problem."""


def _case_id(case: object) -> str:
    return case.name if isinstance(case, Problem) else str(getattr(case, "value", case))


class _AllStats(KFAC):
    """KFAC that asks for per-sample statistics too: one extraction serves every method."""

    required_stats = ALL_IO


@functools.cache
def _stats(problem: Problem) -> CurvatureStatistics:
    """EXACT statistics of the problem's batch, shared by the tests (never modified)."""
    return fit_statistics(problem, _AllStats())


def _fitted(approx: LayerwiseApprox, stats: CurvatureStatistics) -> LayerwiseApprox:
    approx.update(stats)
    return approx


def _dense_rearranged(W: Tensor) -> Tensor:
    r"""$\mathcal R(F)$, ``[out^2, in^2]``, from ``[K, N, out, in]`` gradients."""
    _, n, out, inp = W.shape
    return torch.einsum("knij,knab->iajb", W, W).reshape(out * out, inp * inp) / n


def _dense_block(W: Tensor) -> Tensor:
    vec = W.flatten(-2).flatten(0, 1)
    return vec.T @ vec / W.shape[1]


def _rearrange(F: Tensor, out: int, inp: int) -> Tensor:
    r"""$\mathcal R$ of a dense ``[out*in, out*in]`` matrix."""
    return F.reshape(out, inp, out, inp).permute(0, 2, 1, 3).reshape(out * out, inp * inp)


def _svd_terms(R: Tensor, out: int, inp: int, count: int) -> list[Tensor]:
    r"""The dense Kronecker terms $\sigma_j U_j \otimes V_j$ of the top singular triples."""
    U, S, Vh = torch.linalg.svd(R)
    return [
        S[j] * torch.kron(U[:, j].reshape(out, out), Vh[j].reshape(inp, inp)) for j in range(count)
    ]


def _close(actual: Tensor, expected: Tensor, scale: float, what: str, rtol: float = RTOL) -> None:
    err = float((actual - expected).abs().max())
    assert err <= rtol * scale, f"{what}: max error {err:.3e}, scale {scale:.3e}"


def _layers(stats: CurvatureStatistics) -> list[tuple[str, Tensor]]:
    return [(name, s.io.grads()) for name, s in stats.layers.items() if s.io is not None]


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_products_match_the_dense_rearranged_block(problem: Problem) -> None:
    gen = torch.Generator().manual_seed(0)
    for name, layer in _stats(problem).layers.items():
        assert layer.io is not None and layer.kronecker is not None
        W = layer.io.grads()
        out, inp = W.shape[-2:]
        R = _dense_rearranged(W)
        # The definition: R(F)[(i, k), (j, l)] = F[(i, j), (k, l)] (row-major vec).
        assert torch.allclose(R, _rearrange(_dense_block(W), out, inp), rtol=1e-12, atol=0)
        V = torch.randn(2, inp, inp, generator=gen, dtype=torch.float64)
        U = torch.randn(2, out, out, generator=gen, dtype=torch.float64)
        scale = float(R.abs().max()) * inp
        general = RearrangedFisher(layer.io, symmetric=False)
        _close(general.matvec(V).flatten(1), V.flatten(1) @ R.T, scale, f"R V, {name}")
        _close(general.rmatvec(U).flatten(1), U.flatten(1) @ R, scale, f"R^T U, {name}")
        # The symmetric restriction agrees on symmetric matrices.
        sym = RearrangedFisher(layer.io)
        V_sym = V + V.transpose(-1, -2)
        _close(sym.matvec(V_sym), general.matvec(V_sym), scale, f"symmetric R V, {name}")
        # Deflation subtracts vec(G) vec(A)^T exactly.
        G, A = layer.kronecker.G, layer.kronecker.A
        R_res = R - torch.outer(G.flatten(), A.flatten())
        deflated = Deflated(general, [(G, A)])
        _close(deflated.matvec(V).flatten(1), V.flatten(1) @ R_res.T, scale, f"deflated, {name}")
        _close(deflated.rmatvec(U).flatten(1), U.flatten(1) @ R_res, scale, f"deflated^T, {name}")


@pytest.mark.parametrize(("problem", "form"), FORM_CASES, ids=_case_id)
def test_kpsvd_is_the_top_singular_pair(problem: Problem, form: RearrangedForm) -> None:
    stats = _stats(problem)
    approx = _fitted(KPSVD(**POWER, form=form), stats)
    for name, W in _layers(stats):
        out, inp = W.shape[-2:]
        (expected,) = _svd_terms(_dense_rearranged(W), out, inp, 1)
        scale = float(expected.abs().max())
        _close(approx.to_dense(name), expected, scale, f"KPSVD {name}")
        # The normalisation rule: balanced norms, tr A >= 0, both factors PSD.
        block = approx.blocks[name]
        A, G = block.A, block.G  # type: ignore[attr-defined]
        sigma = float(torch.linalg.matrix_norm(expected)) ** 0.5
        assert abs(float(A.norm()) - float(G.norm())) <= RTOL * sigma
        assert float(A.trace()) >= 0.0
        for factor in (A, G):
            assert float(torch.linalg.eigvalsh(factor)[0]) >= -RTOL * float(factor.abs().max())


@pytest.mark.parametrize(("problem", "form"), FORM_CASES, ids=_case_id)
def test_deflation_is_the_optimal_rank_two_sum(problem: Problem, form: RearrangedForm) -> None:
    stats = _stats(problem)
    approx = _fitted(Deflation(**POWER, form=form), stats)
    genuine = 0
    for name, W in _layers(stats):
        out, inp = W.shape[-2:]
        first, second = _svd_terms(_dense_rearranged(W), out, inp, 2)
        scale = float(first.abs().max())
        G1, A1, G2, A2 = approx.blocks[name].factors  # type: ignore[attr-defined]
        term1, term2 = torch.kron(G1, A1), torch.kron(G2, A2)
        _close(term1, first, scale, f"first term of {name}")
        _close(term2, second, scale, f"second term of {name}")
        _close(approx.to_dense(name), first + second, scale, f"Deflation {name}")
        if float(second.norm()) > 1e-6 * float(first.norm()):
            # A genuine second pair: orthogonal to the first, not the first one again.
            genuine += 1
            cosine = float((term1 * term2).sum() / (term1.norm() * term2.norm()))
            assert abs(cosine) < 1e-6, f"{name}: second term parallel to the first ({cosine})"
    assert genuine >= 1


@pytest.mark.parametrize("form", [RearrangedForm.MATRIX_FREE, RearrangedForm.SAMPLE_SPACE])
@pytest.mark.parametrize("n", [1, 2])
def test_lanczos_and_deflation_are_exact_for_rearranged_rank_two(
    n: int, form: RearrangedForm
) -> None:
    """A ``Linear`` layer with ``n`` samples has rank R(F) <= n: the rank-2 sum is exact."""
    problem = P.mlp_ce(n=n)
    stats = _stats(problem)
    model = problem.model()
    exact = oracle.dense_ggn(model, problem.loss_fn, problem.x, problem.y)
    lanczos = _fitted(Lanczos(**TIGHT, form=form), stats)
    deflation = _fitted(Deflation(**POWER, form=form), stats)
    for name, W in _layers(stats):
        F = oracle.block(exact, model, name)
        scale = float(F.abs().max())
        _close(_dense_block(W), F, scale, f"io block of {name} against the oracle", 1e-10)
        _close(lanczos.to_dense(name), F, scale, f"Lanczos {name}")
        _close(deflation.to_dense(name), F, scale, f"Deflation {name}")


@pytest.mark.parametrize(("problem", "form"), FORM_CASES, ids=_case_id)
def test_lanczos_matches_deflation(problem: Problem, form: RearrangedForm) -> None:
    stats = _stats(problem)
    lanczos = _fitted(Lanczos(**TIGHT, form=form), stats)
    deflation = _fitted(Deflation(**POWER, form=RearrangedForm.MATRIX_FREE), stats)
    for name in lanczos.blocks:
        expected = deflation.to_dense(name)
        _close(lanczos.to_dense(name), expected, float(expected.abs().max()), name)


def test_lanczos_restarts_converge() -> None:
    """A Krylov space smaller than the symmetric spaces (15 and 28) forces restarts."""
    layer = _stats(PROBLEMS[0]).layers["0"]
    assert layer.io is not None
    W = layer.io.grads()
    out, inp = W.shape[-2:]
    triples = lanczos_svd(RearrangedFisher(layer.io), 2, krylov_dim=4, tol=1e-12, max_restarts=500)
    assert triples[0].iterations > 4
    expected = _svd_terms(_dense_rearranged(W), out, inp, 2)
    for triple, term in zip(triples, expected, strict=True):
        actual = triple.sigma * torch.kron(triple.U, triple.V)
        _close(actual, term, float(expected[0].abs().max()), "restarted Lanczos")


@pytest.mark.parametrize(("problem", "form"), FORM_CASES, ids=_case_id)
def test_kfac_corrected_adds_the_best_kronecker_term_of_the_residual(
    problem: Problem, form: RearrangedForm
) -> None:
    stats = _stats(problem)
    approx = _fitted(KFACCorrected(**POWER, form=form), stats)
    for name, W in _layers(stats):
        kron = stats[name].kronecker
        assert kron is not None
        out, inp = W.shape[-2:]
        kfac = torch.kron(kron.G, kron.A)
        residual = _dense_block(W) - kfac
        (correction,) = _svd_terms(_rearrange(residual, out, inp), out, inp, 1)
        expected = kfac + correction
        _close(approx.to_dense(name), expected, float(expected.abs().max()), name)


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_quality_orderings_against_the_exact_block(problem: Problem) -> None:
    stats = _stats(problem)
    model = problem.model()
    exact = oracle.dense_ggn(model, problem.loss_fn, problem.x, problem.y)
    fitted = {
        "kfac": _fitted(KFAC(), stats),
        "kpsvd": _fitted(KPSVD(**POWER), stats),
        "deflation": _fitted(Deflation(**POWER), stats),
        "lanczos": _fitted(Lanczos(**TIGHT), stats),
        "corrected": _fitted(KFACCorrected(**POWER), stats),
    }
    for name, W in _layers(stats):
        F = oracle.block(exact, model, name)
        _close(_dense_block(W), F, float(F.abs().max()), f"io block of {name}", 1e-10)
        err = {key: float((a.to_dense(name) - F).norm()) for key, a in fitted.items()}
        slack = 1e-10 * float(F.norm())  # the iterations' tolerance, and round-off
        assert err["kpsvd"] <= err["kfac"] + slack, (name, err)
        assert err["deflation"] <= err["kpsvd"] + slack, (name, err)
        assert err["lanczos"] <= err["kpsvd"] + slack, (name, err)
        assert err["corrected"] <= err["kfac"] + slack, (name, err)


def test_warm_start_needs_fewer_iterations() -> None:
    problem = PROBLEMS[1]  # the convolution: sigma_2 / sigma_1 = 0.8, slow convergence
    first, second = _stats(problem), _stats(perturbed(problem, 0.05))
    ops = [RearrangedFisher(s["0"].io) for s in (first, second) if s["0"].io is not None]
    previous = power_svd(ops[0], tol=1e-10, max_iter=1000)
    cold = power_svd(ops[1], tol=1e-10, max_iter=1000)
    warm = power_svd(ops[1], previous.V, tol=1e-10, max_iter=1000)
    assert warm.iterations < cold.iterations, (warm.iterations, cold.iterations)
    assert abs(warm.sigma - cold.sigma) <= 1e-8 * cold.sigma
    # The approximation warm-starts from its previous estimate.
    running = _fitted(_fitted(KPSVD(tol=1e-10, max_iter=1000), first), second)
    fresh = _fitted(KPSVD(tol=1e-10, max_iter=1000), second)
    warm_its = running.blocks["0"].last_iterations  # type: ignore[attr-defined]
    cold_its = fresh.blocks["0"].last_iterations  # type: ignore[attr-defined]
    assert warm_its < cold_its, (warm_its, cold_its)


def test_zero_statistics_give_a_zero_estimate() -> None:
    io = PerSampleIO(torch.zeros(3, 1, 4, dtype=torch.float64), torch.zeros(2, 3, 1, 2).double())
    op = RearrangedFisher(io)
    assert power_svd(op).sigma == 0.0
    assert all(t.sigma == 0.0 and float(t.U.norm()) == 0.0 for t in lanczos_svd(op))


def test_the_floor_keeps_an_indefinite_correction_positive_definite() -> None:
    """KFAC-corrected on the convolution of the CNN, where KFC's G (x) A overshoots.

    Whitened by the damped KFAC term, some eigenvalues of the correction fall below
    -1 + epsilon (so far that the unfloored damped sum is indefinite); the floor
    raises them, the operator used is positive definite, and the inverse inverts
    exactly that floored operator.
    """
    approx = _fitted(KFACCorrected(min_eig=0.1), _stats(PROBLEMS[1]))
    damping = 1e-3
    block = approx.blocks["0"]
    assert isinstance(block, KroneckerSumBlock) and block.factors is not None
    inverse = block.inverse(damping)
    assert inverse.num_floored > 0
    G, A, G_c, A_c = block.factors
    gamma_a, gamma_g = paper_pi_split(A, G, damping)
    eye_a, eye_g = torch.eye(A.shape[0]).double(), torch.eye(G.shape[0]).double()
    unfloored = torch.kron(G + gamma_g * eye_g, A + gamma_a * eye_a) + torch.kron(G_c, A_c)
    assert float(torch.linalg.eigvalsh(unfloored)[0]) < 0.0
    damped = block.damped_to_dense(damping)
    _close(damped, damped.T, float(damped.abs().max()), "symmetry", 1e-12)
    assert float(torch.linalg.eigvalsh(damped)[0]) > 0.0
    vec = torch.randn(G.shape[0], A.shape[0], generator=torch.Generator().manual_seed(0)).double()
    applied = inverse((damped @ vec.flatten()).reshape(vec.shape))
    _close(applied, vec, float(vec.abs().max()), "inverse of the floored operator", 1e-9)


@pytest.mark.parametrize("make", [Deflation, Lanczos, KFACCorrected], ids=lambda m: m.__name__)
def test_damped_operator_without_flooring_is_the_damped_sum(make: type[LayerwiseApprox]) -> None:
    """The documented rule: lambda on the first term, pi-split, the second term as it is."""
    approx = _fitted(make(), _stats(PROBLEMS[0]))
    damping = 1e-2
    checked = 0
    for block in approx.blocks.values():
        assert isinstance(block, KroneckerSumBlock) and block.factors is not None
        if block.inverse(damping).num_floored:
            continue
        checked += 1
        G1, A1, G2, A2 = block.factors
        gamma_a, gamma_g = paper_pi_split(A1, G1, damping)
        eye_a, eye_g = torch.eye(A1.shape[0]).double(), torch.eye(G1.shape[0]).double()
        expected = torch.kron(G1 + gamma_g * eye_g, A1 + gamma_a * eye_a) + torch.kron(G2, A2)
        _close(block.damped_to_dense(damping), expected, float(expected.abs().max()), "damped")
    assert checked >= 1
