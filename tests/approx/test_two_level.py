"""Two-level corrections against dense references built here from the exact GGN.

The statistics are ``EXACT`` (type-2) on one batch, so the per-sample rows the
coarse level uses give exactly the GGN that ``tests.oracle.dense_ggn`` computes
with ``torch.func``; the references below are dense solves with it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from curvlib.approx.coarse import (
    EXACT_EIGH_LIMIT,
    CoarseSpace,
    FixedSpace,
    Nicolaides,
    ResidualSpace,
    Spectral,
    SpectralEnd,
    Tselepidis,
    extreme_eigenpairs,
)
from curvlib.approx.coarse_fisher import RestrictedFisher
from curvlib.approx.deflation import Deflation
from curvlib.approx.diagonal import Diagonal
from curvlib.approx.ekfac import EKFAC
from curvlib.approx.kfac import KFAC, KFACDamping
from curvlib.approx.kpsvd import KPSVD
from curvlib.approx.two_level import (
    CorrectionForm,
    RefreshableTwoLevel,
    TwoLevel,
    TwoLevelPreconditioner,
    _coarse_solve,
    _size_limit,
)
from curvlib.core import (
    CurvatureStatistics,
    FisherType,
    RefreshableApprox,
    StatKind,
    cross_layer_factors,
)
from curvlib.wiring import PreconditionedOptimizer
from tests import oracle
from tests import problems as P
from tests.approx.cases import fit_statistics, perturbed
from tests.hyper import FRESH, train_steps

DAMPING = 1e-2
EXACT = dict(rtol=1e-9, atol=1e-11)
"""Float64 identities (dense solves of small systems)."""
UNGUARDED = dict(max_condition=1e12, max_correction=1e6)
"""Safeguard bounds that the test problems never reach (asserted where used)."""

PROBLEMS = [P.mlp_ce(), P.cnn_ce(), P.tconv_bce()]
FINE: dict[str, Callable[[], object]] = {
    "kfac": lambda: KFAC(),
    "kpsvd": lambda: KPSVD(),
}
ALL_FINE: dict[str, Callable[[], object]] = {
    **FINE,
    "kfac_eigen": lambda: KFAC(KFACDamping.EIGEN),
    "ekfac": lambda: EKFAC(),
    "deflation": lambda: Deflation(),
    "diagonal": lambda: Diagonal(),
}
SPACES: dict[str, Callable[[], CoarseSpace]] = {
    "nicolaides": lambda: Nicolaides(),
    "nicolaides_krylov": lambda: Nicolaides(krylov=True),
    "spectral": lambda: Spectral(num_vectors=2),
    "spectral_smallest_krylov": lambda: Spectral(2, SpectralEnd.SMALLEST, krylov=True),
    "residual": lambda: ResidualSpace(),
    "residual_krylov": lambda: ResidualSpace(krylov=True),
}


class Fitted:
    """A two-level approximation fitted on a problem, with the dense GGN of its layers."""

    def __init__(self, problem: P.Problem, approx: TwoLevel) -> None:
        model = problem.model()
        approx.update(fit_statistics(problem, approx, FisherType.EXACT, model=model))
        self.approx = approx
        self.shapes = dict(approx._shapes)
        ggn = oracle.dense_ggn(model, problem.loss_fn, problem.x, problem.y, list(self.shapes))
        self.damped = ggn + DAMPING * torch.eye(ggn.shape[0], dtype=ggn.dtype)
        self.size = ggn.shape[0]

    def split(self, vec: Tensor) -> dict[str, Tensor]:
        return self.split_like(self.shapes, vec)

    @staticmethod
    def split_like(shapes: dict[str, tuple[int, int]], vec: Tensor) -> dict[str, Tensor]:
        out, start = {}, 0
        for name, (rows, cols) in shapes.items():
            out[name] = vec[start : start + rows * cols].reshape(rows, cols)
            start += rows * cols
        return out

    def join(self, mats: dict[str, Tensor]) -> Tensor:
        return torch.cat([mats[name].flatten() for name in self.shapes])

    def error(self, x: Tensor, grad: Tensor) -> float:
        """Squared (F + lambda I)-norm distance to the exact damped natural gradient."""
        diff = x - torch.linalg.solve(self.damped, grad)
        return float(diff @ self.damped @ diff)


def _grads(size: int, count: int = 3) -> list[Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(size, generator=gen, dtype=torch.float64) for _ in range(count)]


def _directions(
    pre: TwoLevelPreconditioner, shapes: dict[str, tuple[int, int]], size: int
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``(gradient, fine step, two-level direction)``, flattened, for each test gradient."""
    for grad in _grads(size):
        mats, start = {}, 0
        for name, (rows, cols) in shapes.items():
            mats[name] = grad[start : start + rows * cols].reshape(rows, cols)
            start += rows * cols
        zeta = torch.cat([v.flatten() for v in pre.fine.apply(mats).values()])
        yield grad, zeta, torch.cat([v.flatten() for v in pre.apply(mats).values()])


def _identity_space(problem: P.Problem) -> FixedSpace:
    model = problem.model()
    layers = [m for m in oracle.curvature_layer_names(model)]
    sizes = oracle.layer_slices(model, layers)
    vectors = {}
    for name in layers:
        module = model.get_submodule(name)
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        rows, cols = oracle.layer_matrix(module, module.weight.detach(), bias).shape
        assert rows * cols == sizes[name].stop - sizes[name].start
        vectors[name] = torch.eye(rows * cols, dtype=torch.float64).reshape(-1, rows, cols)
    return FixedSpace(vectors)


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
@pytest.mark.parametrize("fine", FINE, ids=str)
def test_whole_space_gives_the_exact_damped_natural_gradient(problem: P.Problem, fine: str) -> None:
    approx = TwoLevel(FINE[fine](), _identity_space(problem), **UNGUARDED)  # type: ignore[arg-type]
    fitted = Fitted(problem, approx)
    pre = fitted.approx.inverse(DAMPING)
    for grad in _grads(fitted.size):
        got = fitted.join(pre.apply(fitted.split(grad)))
        torch.testing.assert_close(got, torch.linalg.solve(fitted.damped, grad), **EXACT)
        assert pre.diagnostics["coarse_damping"] == 0.0
        assert float(pre.diagnostics["coarse_scale"]) == 1.0


# -- the safeguard ----------------------------------------------------------------------


def _spd(eigenvalues: list[float]) -> Tensor:
    """A symmetric matrix with these eigenvalues in a random orthonormal basis (float64)."""
    gen = torch.Generator().manual_seed(3)
    n = len(eigenvalues)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    vals = torch.tensor(eigenvalues, dtype=torch.float64)
    return (basis * vals) @ basis.T


def test_guard_damps_an_ill_conditioned_coarse_matrix_to_the_bound() -> None:
    matrix = _spd([1e-6, 1e-3, 0.5, 2.0])
    solve = _coarse_solve(matrix, 100.0)
    delta = (2.0 - 100.0 * 1e-6) / 99.0
    assert solve.damping == pytest.approx(delta, rel=1e-9)
    assert solve.condition == pytest.approx(2.0 / 1e-6, rel=1e-6)  # of F_c itself
    guarded = matrix + solve.damping * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(solve.inverse, torch.linalg.inv(guarded), **EXACT)
    values = torch.linalg.eigvalsh(guarded)
    assert float(values[-1] / values[0]) == pytest.approx(100.0, rel=1e-9)


def test_guard_leaves_a_well_conditioned_coarse_matrix_unchanged() -> None:
    matrix = _spd([1.0, 3.0, 50.0])
    solve = _coarse_solve(matrix, 100.0)
    assert solve.damping == 0.0
    assert solve.condition == pytest.approx(50.0, rel=1e-9)
    torch.testing.assert_close(solve.inverse, torch.linalg.inv(matrix), **EXACT)


def test_guard_drops_the_correction_on_non_finite_input() -> None:
    for bad in (float("nan"), float("inf")):
        matrix = _spd([1.0, 2.0])
        matrix[0, 1] = matrix[1, 0] = bad
        solve = _coarse_solve(matrix, 100.0)
        assert solve.condition == float("inf") and solve.damping == float("inf")
        assert torch.equal(solve.inverse, torch.zeros(2, 2, dtype=torch.float64))
    grads = {"0": torch.ones(2, 3, dtype=torch.float64)}
    beta, matrix = torch.tensor([1.0, float("inf")], dtype=torch.float64), _spd([1.0, 2.0])
    assert float(_size_limit(beta, matrix, grads, grads, 0.5)) == 0.0  # inf energy: no correction
    beta = torch.tensor([1e150, 0.0], dtype=torch.float64)  # a huge bound does not overflow
    assert float(_size_limit(beta, matrix, grads, grads, 1e300)) == 1.0
    nan_grads = {"0": torch.full((2, 3), float("nan"), dtype=torch.float64)}
    beta = torch.ones(2, dtype=torch.float64)
    assert float(_size_limit(beta, matrix, nan_grads, grads, 0.5)) == 0.0


@pytest.mark.parametrize("form", list(CorrectionForm), ids=lambda f: f.value)
def test_guard_damps_the_coarse_system_in_both_forms(form: CorrectionForm) -> None:
    """With the whole space as coarse space and a small bound: the dense damped solve."""
    problem, bound = P.mlp_ce(), 10.0
    approx = TwoLevel(KFAC(), _identity_space(problem), form=form, report_error=True,
                      max_condition=bound, max_correction=1e6)  # fmt: skip
    fitted = Fitted(problem, approx)
    values = torch.linalg.eigvalsh(fitted.damped)
    top, bottom = float(values[-1]), float(values[0])
    assert top / bottom > bound  # the guard has something to do
    delta = (top - bound * bottom) / (bound - 1.0)
    guarded = fitted.damped + delta * torch.eye(fitted.size, dtype=torch.float64)
    pre = approx.inverse(DAMPING)
    for grad, zeta, got in _directions(pre, fitted.shapes, fitted.size):
        rhs = grad - fitted.damped @ zeta if form is CorrectionForm.RESIDUAL else grad
        torch.testing.assert_close(got, zeta + torch.linalg.solve(guarded, rhs), **EXACT)
        assert pre.diagnostics["coarse_damping"] == pytest.approx(delta, rel=1e-9)
        assert pre.diagnostics["coarse_condition"] == pytest.approx(top / bottom, rel=1e-9)
        if form is CorrectionForm.RESIDUAL:  # still never away from the damped natural gradient
            assert fitted.error(got, grad) <= fitted.error(zeta, grad)
        change = float(pre.diagnostics["coarse_error_change"])
        assert change == pytest.approx(
            fitted.error(got, grad) - fitted.error(zeta, grad), rel=1e-6, abs=1e-9
        )


def test_guard_limits_the_correction_to_a_fraction_of_the_fine_step() -> None:
    problem, tau = P.mlp_ce(), 0.1
    approx = TwoLevel(KFAC(), _identity_space(problem), max_condition=1e12, max_correction=tau)
    fitted = Fitted(problem, approx)
    pre = approx.inverse(DAMPING)
    for grad, zeta, got in _directions(pre, fitted.shapes, fitted.size):
        full = torch.linalg.solve(fitted.damped, grad - fitted.damped @ zeta)
        scale = tau * float(grad @ zeta / (full @ fitted.damped @ full)) ** 0.5
        assert 0.0 < scale < 1.0
        assert float(pre.diagnostics["coarse_scale"]) == pytest.approx(scale, rel=1e-9)
        torch.testing.assert_close(got, zeta + scale * full, **EXACT)
        correction = got - zeta
        energy = float(correction @ fitted.damped @ correction)
        assert energy == pytest.approx(tau**2 * float(grad @ zeta), rel=1e-9)
        assert fitted.error(got, grad) <= fitted.error(zeta, grad)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_condition": v} for v in (1.0, 0.5, float("inf"), float("nan"), True, "10")]
    + [{"max_correction": v} for v in (0.0, -1.0, float("inf"), float("nan"), None)],
    ids=repr,
)
def test_bad_guard_parameters_name_the_fix(kwargs: dict[str, object]) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} .* must be a finite"):
        TwoLevel(KFAC(), Nicolaides(), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("form", list(CorrectionForm), ids=lambda f: f.value)
@pytest.mark.parametrize("fine", ALL_FINE, ids=str)
def test_empty_space_is_the_fine_level_alone(fine: str, form: CorrectionForm) -> None:
    problem = P.cnn_ce()
    fitted = Fitted(problem, TwoLevel(ALL_FINE[fine](), FixedSpace({}), form=form))  # type: ignore[arg-type]
    pre = fitted.approx.inverse(DAMPING)
    fine_pre = fitted.approx.fine.inverse(DAMPING)  # type: ignore[attr-defined]
    for grad in _grads(fitted.size):
        mats = fitted.split(grad)
        got, want = pre.apply(mats), fine_pre.apply(mats)
        for name in mats:
            torch.testing.assert_close(got[name], want[name], rtol=0.0, atol=0.0)
    assert pre.diagnostics["coarse_size"] == 0.0


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
@pytest.mark.parametrize("space", SPACES, ids=str)
@pytest.mark.parametrize("fine", ALL_FINE, ids=str)
def test_residual_form_never_moves_away_from_the_damped_natural_gradient(
    problem: P.Problem, space: str, fine: str
) -> None:
    approx = TwoLevel(ALL_FINE[fine](), SPACES[space](), form=CorrectionForm.RESIDUAL)  # type: ignore[arg-type]
    fitted = Fitted(problem, approx)
    pre = approx.inverse(DAMPING)
    for grad in _grads(fitted.size):
        mats = fitted.split(grad)
        zeta = fitted.join(pre.fine.apply(mats))
        got = fitted.join(pre.apply(mats))
        before, after = fitted.error(zeta, grad), fitted.error(got, grad)
        assert after <= before * (1 + 1e-9) + 1e-12, (before, after)
        # The reported change is the change of this very distance (up to the round-off
        # of the two large terms it is the difference of, with ill-conditioned spaces).
        change = float(pre.diagnostics["coarse_error_change"])
        assert change == pytest.approx(after - before, rel=1e-4, abs=1e-9 * before)


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
@pytest.mark.parametrize("fine", FINE, ids=str)
def test_additive_form_is_the_dense_two_level_preconditioner(problem: P.Problem, fine: str) -> None:
    approx = TwoLevel(FINE[fine](), Nicolaides(), form=CorrectionForm.ADDITIVE)  # type: ignore[arg-type]
    fitted = Fitted(problem, approx)
    pre = approx.inverse(DAMPING)
    fine_pre = approx.fine.inverse(DAMPING)  # type: ignore[attr-defined]
    # R0: one constant unit vector per layer, written out here.
    rows = []
    start = 0
    for rows_l, cols_l in fitted.shapes.values():
        row = torch.zeros(fitted.size, dtype=torch.float64)
        row[start : start + rows_l * cols_l] = (rows_l * cols_l) ** -0.5
        rows.append(row)
        start += rows_l * cols_l
    r0 = torch.stack(rows)
    fine_dense = torch.block_diag(*[fine_pre.to_dense(name) for name in fitted.shapes])
    want = fine_dense + r0.T @ torch.linalg.solve(r0 @ fitted.damped @ r0.T, r0)
    got = pre.to_dense_full()
    torch.testing.assert_close(got, want, **EXACT)
    torch.testing.assert_close(got, got.T, **EXACT)
    assert float(torch.linalg.eigvalsh(got)[0]) > 0.0


@pytest.mark.parametrize("space", ["nicolaides_krylov", "spectral", "spectral_smallest_krylov"])
@pytest.mark.parametrize("fine", FINE, ids=str)
def test_additive_form_is_positive_definite(space: str, fine: str) -> None:
    approx = TwoLevel(FINE[fine](), SPACES[space](), form="additive")  # type: ignore[arg-type]
    fitted = Fitted(P.tconv_bce(), approx)
    dense = approx.inverse(DAMPING).to_dense_full()
    assert float((dense - dense.T).abs().max()) <= 1e-9 * float(dense.abs().max())
    assert float(torch.linalg.eigvalsh((dense + dense.T) / 2)[0]) > 0.0
    assert fitted.size == dense.shape[0]


def test_spectral_vectors_are_the_extreme_kronecker_eigenvectors() -> None:
    problem = P.mlp_ce()
    for end in SpectralEnd:
        space = Spectral(num_vectors=3, end=end)
        approx = TwoLevel(KFAC(), space)
        model = problem.model()
        stats = fit_statistics(problem, approx, FisherType.EXACT, model=model)
        approx.update(stats)
        context = approx._context()
        vectors = space.vectors(context)
        for name, layer in stats.layers.items():
            assert layer.kronecker is not None
            kron = torch.kron(layer.kronecker.G, layer.kronecker.A)
            values = torch.linalg.eigvalsh(kron)
            want = values[-3:] if end is SpectralEnd.LARGEST else values[:3]
            flat = vectors[name].flatten(1)
            # Unit, orthonormal eigenvectors of G (x) A with the extreme eigenvalues.
            torch.testing.assert_close(flat @ flat.T, torch.eye(3, dtype=flat.dtype), **EXACT)
            rayleigh = torch.sort(torch.einsum("cp,pq,cq->c", flat, kron, flat)).values
            torch.testing.assert_close(rayleigh, want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("fine", ["kfac", "kpsvd", "kfac_eigen", "ekfac"])
def test_krylov_vectors_are_the_fine_inverse_applied_to_the_base_vectors(fine: str) -> None:
    """Nicolaides' Krylov vector of each layer is its dense fine inverse times the ones, normed.

    KFAC's and KPSVD's Kronecker inverses apply to the factors of the all-ones matrix;
    the eigenbasis inverses (KFAC's ``EIGEN``, EKFAC) to the matrix.
    """
    space = Nicolaides(krylov=True)
    approx = TwoLevel(ALL_FINE[fine](), space)  # type: ignore[arg-type]
    Fitted(P.mlp_ce(), approx)
    pre = approx.fine.inverse(DAMPING)
    vectors = space.vectors(approx._context(fine=pre))
    for name, (rows, cols) in approx._shapes.items():
        ones = torch.ones(rows * cols, dtype=torch.float64)
        want = pre.to_dense(name) @ ones  # type: ignore[attr-defined]
        assert vectors[name].shape == (2, rows, cols)
        torch.testing.assert_close(vectors[name][0].flatten(), ones / ones.norm(), **EXACT)
        torch.testing.assert_close(vectors[name][1].flatten(), want / want.norm(), **EXACT)


@pytest.mark.parametrize("damping", [KFACDamping.PI, KFACDamping.EIGEN])
def test_apply_outer_equals_the_apply_to_the_products(damping: KFACDamping) -> None:
    """Kronecker inverses keep the factors apart, eigenbasis inverses take the products."""
    approx = KFAC(damping)
    approx.update(fit_statistics(P.mlp_ce(), approx, FisherType.EXACT))
    pre = approx.inverse(DAMPING)
    gen = torch.Generator().manual_seed(1)
    for name in pre.layers:
        block = approx.blocks[name]
        out_dim, in_dim = block.out_dim, block.in_dim
        u = torch.randn(3, out_dim, generator=gen, dtype=torch.float64)
        v = torch.randn(3, in_dim, generator=gen, dtype=torch.float64)
        products = pre.apply({name: u[:, :, None] * v[:, None, :]})[name]
        torch.testing.assert_close(pre.apply_outer(name, u, v), products, **EXACT)
    with pytest.raises(KeyError, match="update"):
        pre.apply_outer("missing", u, v)


def test_subspace_iteration_finds_the_largest_eigenpairs_of_large_factors() -> None:
    gen = torch.Generator().manual_seed(3)
    n = EXACT_EIGH_LIMIT + 44
    basis = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    spectrum = 0.5 ** torch.arange(n, dtype=torch.float64)  # a gap of 2 between neighbours
    mat = (basis * spectrum) @ basis.T
    values, vectors = extreme_eigenpairs(mat, 3, largest=True)
    torch.testing.assert_close(values, spectrum[:3], rtol=1e-10, atol=0.0)
    overlap = (vectors.T @ basis[:, :3]).abs()
    torch.testing.assert_close(overlap, torch.eye(3, dtype=torch.float64), rtol=0.0, atol=1e-8)
    small_values, _ = extreme_eigenpairs(mat, 2, largest=False)
    torch.testing.assert_close(small_values, spectrum.flip(0)[:2], rtol=1e-6, atol=1e-14)


# -- Tselepidis: cross-layer Kronecker factors ----------------------------------------


def test_pooled_statistics_follow_the_documented_position_rule() -> None:
    problem = P.cnn_ce()
    model = problem.model()
    approx = TwoLevel(KFAC(), Tselepidis())
    assert StatKind.CROSS_LAYER in approx.required_stats
    from curvlib.extract import CurvatureExtractor

    ex = CurvatureExtractor(
        model,
        problem.loss_fn,
        stats={StatKind.CROSS_LAYER, StatKind.PER_SAMPLE_IO, StatKind.KRONECKER},
        fisher_type="exact",
    )
    with ex.collect():
        problem.loss_fn(model(problem.x), problem.y).backward()
    stats = ex.statistics()
    inputs = oracle.layer_inputs(model, problem.x)
    for name, layer in stats.layers.items():
        assert layer.pooled is not None and layer.io is not None and layer.kronecker is not None
        module = model.get_submodule(name)
        unfolded = oracle.unfolded_inputs(module, inputs[name])  # [N, T, in_aug]
        torch.testing.assert_close(layer.pooled.inputs, unfolded.mean(1), **EXACT)
        torch.testing.assert_close(layer.pooled.output_grads, layer.io.output_grads.sum(2), **EXACT)
        # The bias column of the pooled rank-one gradient is the per-sample bias gradient.
        bias = layer.io.grads()[..., -1]
        torch.testing.assert_close(layer.pooled.output_grads * layer.pooled.inputs[:, -1:], bias)
        if unfolded.shape[1] == 1:  # one position: the diagonal factors are KFAC's
            own = cross_layer_factors(layer.pooled, layer.pooled)
            torch.testing.assert_close(own.A, layer.kronecker.A, **EXACT)
            torch.testing.assert_close(own.G, layer.kronecker.G, **EXACT)


def _dense_cross_kronecker(stats: CurvatureStatistics) -> Tensor:
    """The Tselepidis model written out densely: block (l, m) = G_lm (x) A_lm."""
    names = list(stats.layers)
    pooled = {n: stats.layers[n].pooled for n in names}
    return torch.cat(
        [
            torch.cat(
                [
                    torch.kron(f.G, f.A)
                    for f in (cross_layer_factors(pooled[l], pooled[m]) for m in names)  # type: ignore[arg-type]
                ],
                dim=1,
            )
            for l in names  # noqa: E741
        ]
    )


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_tselepidis_uses_the_dense_cross_layer_kronecker_model(problem: P.Problem) -> None:
    approx = TwoLevel(KFAC(), Tselepidis())
    model = problem.model()
    stats = fit_statistics(problem, approx, FisherType.EXACT, model=model)
    approx.update(stats)
    names = list(stats.layers)
    dense = _dense_cross_kronecker(stats)
    damped = dense + DAMPING * torch.eye(dense.shape[0], dtype=dense.dtype)
    sizes = [stats.layers[n].layer.out_dim * stats.layers[n].layer.in_dim_aug for n in names]
    r0 = torch.block_diag(*[torch.full((1, s), s**-0.5, dtype=torch.float64) for s in sizes])
    pre = approx.inverse(DAMPING)
    for grad, zeta, got in _directions(pre, dict(approx._shapes), sum(sizes)):
        beta = torch.linalg.solve(r0 @ damped @ r0.T, r0 @ (grad - damped @ zeta))
        torch.testing.assert_close(got, zeta + r0.T @ beta, **EXACT)


def _random_space(shapes: dict[str, tuple[int, int]], count: int = 2) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(11)
    out = {}
    for name, shape in shapes.items():
        vecs = torch.randn(count, *shape, generator=gen, dtype=torch.float64)
        out[name] = vecs / vecs.flatten(1).norm(dim=1)[:, None, None]
    return out


@pytest.mark.parametrize("problem", [P.mlp_ce(), P.cnn_ce()], ids=lambda p: p.name)
@pytest.mark.parametrize("space", ["spectral", "nicolaides_krylov"])
def test_moving_space_is_the_dense_correction_for_the_latest_batch(
    space: str, problem: P.Problem
) -> None:
    r"""A space that moves with the fine level projects on the latest batch's samples.

    Its $R_0 F\zeta$ is $P\,(U\zeta)$ on every step (no rows of $R_0 F$), and the
    direction is the dense $F_\lambda$-optimal correction of the fine step for the
    latest batch's GGN, not for an average of the batches.
    """
    model = problem.model()
    approx = TwoLevel(KFAC(), SPACES[space](), **UNGUARDED)
    latest = torch.empty(0)
    for scale in (0.0, 1.0):
        batch = perturbed(problem, scale) if scale else problem
        approx.update(fit_statistics(batch, approx, FisherType.EXACT, model=model))
        latest = oracle.dense_ggn(model, batch.loss_fn, batch.x, batch.y, list(approx._shapes))
    damped = latest + DAMPING * torch.eye(latest.shape[0], dtype=torch.float64)
    pre = approx.inverse(DAMPING)
    assert pre._restricted is not None and not hasattr(pre._restricted, "rows")
    r0 = torch.block_diag(*pre._flat_rows.values())
    shapes = dict(approx._shapes)
    for grad, zeta, got in _directions(pre, shapes, latest.shape[0]):
        beta = torch.linalg.lstsq(r0 @ damped @ r0.T, r0 @ (grad - damped @ zeta)).solution
        torch.testing.assert_close(got, zeta + r0.T @ beta, rtol=1e-7, atol=1e-9)
    assert float(pre.diagnostics["coarse_scale"]) == 1.0


@pytest.mark.parametrize("problem", [P.mlp_ce(), P.cnn_ce()], ids=lambda p: p.name)
@pytest.mark.parametrize("space", ["nicolaides", "fixed", "tselepidis"])
def test_residual_form_is_optimal_for_the_running_average_of_the_batches(
    space: str, problem: P.Problem
) -> None:
    """A fixed space averages R0 F R0^T and the rows R0 F together (one Fisher for both).

    After three batches the correction is the F_avg-optimal one for the running
    average F_avg of the batches' Fishers (dense, written out here), never moves
    away from F_avg^-1 grad in that norm, and differs from the latest batch's optimum.
    """
    decay = 0.7
    model = problem.model()
    shapes = Fitted(problem, TwoLevel(KFAC(), Nicolaides())).shapes
    vectors = _random_space(shapes) if space == "fixed" else None
    make: Callable[[], CoarseSpace] = {
        "nicolaides": Nicolaides,
        "fixed": lambda: FixedSpace(vectors or {}),
        "tselepidis": Tselepidis,
    }[space]
    approx = TwoLevel(KFAC(), make(), decay=decay)
    average: Tensor | None = None
    latest = torch.empty(0)
    for k, scale in enumerate((0.0, 0.4, 1.0)):
        batch = perturbed(problem, scale) if scale else problem
        stats = fit_statistics(batch, approx, FisherType.EXACT, model=model)
        approx.update(stats)
        if space == "tselepidis":
            latest = _dense_cross_kronecker(stats)
        else:
            latest = oracle.dense_ggn(model, batch.loss_fn, batch.x, batch.y, list(shapes))
        rho = min(1.0 - 1.0 / (k + 1), decay)
        average = latest if average is None else rho * average + (1.0 - rho) * latest
    assert average is not None
    eye = torch.eye(average.shape[0], dtype=torch.float64)
    damped, damped_latest = average + DAMPING * eye, latest + DAMPING * eye
    if vectors is None:
        sizes = [rows * cols for rows, cols in shapes.values()]
        r0 = torch.block_diag(*[torch.full((1, n), n**-0.5, dtype=torch.float64) for n in sizes])
    else:
        blocks = [vectors[name].flatten(1) for name in shapes]
        r0 = torch.block_diag(*blocks)
    pre = approx.inverse(DAMPING)
    for grad, zeta, got in _directions(pre, shapes, average.shape[0]):
        beta = torch.linalg.solve(r0 @ damped @ r0.T, r0 @ (grad - damped @ zeta))
        torch.testing.assert_close(got, zeta + r0.T @ beta, **EXACT)
        exact = torch.linalg.solve(damped, grad)
        before = float((zeta - exact) @ damped @ (zeta - exact))
        after = float((got - exact) @ damped @ (got - exact))
        assert after <= before * (1 + 1e-9), (before, after)
        change = float(pre.diagnostics["coarse_error_change"])
        assert change == pytest.approx(after - before, rel=1e-4, abs=1e-9 * before)
        # The latest batch alone gives another correction: the average is what is used.
        beta_latest = torch.linalg.solve(
            r0 @ damped_latest @ r0.T, r0 @ (grad - damped_latest @ zeta)
        )
        assert float((r0.T @ (beta - beta_latest)).norm()) > 1e-3 * float((r0.T @ beta).norm())


@pytest.mark.parametrize("problem", [P.mlp_ce(n=10), P.cnn_ce()], ids=lambda p: p.name)
def test_coarse_fisher_comes_from_the_first_max_samples(problem: P.Problem) -> None:
    """``max_samples=k``: the coarse level uses the GGN of the first k samples, the fine all."""
    k = problem.n // 2
    model = problem.model()
    approx = TwoLevel(KFAC(), Nicolaides(), max_samples=k, **UNGUARDED)
    approx.update(fit_statistics(problem, approx, FisherType.EXACT, model=model))
    shapes = dict(approx._shapes)
    layers = list(shapes)
    first = oracle.dense_ggn(model, problem.loss_fn, problem.x[:k], problem.y[:k], layers)
    whole = oracle.dense_ggn(model, problem.loss_fn, problem.x, problem.y, layers)
    eye = torch.eye(first.shape[0], dtype=torch.float64)
    sizes = [rows * cols for rows, cols in shapes.values()]
    r0 = torch.block_diag(*[torch.full((1, n), n**-0.5, dtype=torch.float64) for n in sizes])
    pre = approx.inverse(DAMPING)
    # The fine level saw every sample: it equals KFAC fitted on the whole batch.
    alone = KFAC()
    alone.update(fit_statistics(problem, alone, FisherType.EXACT, model=model))
    fine = alone.inverse(DAMPING)
    for grad, zeta, got in _directions(pre, shapes, first.shape[0]):
        mats = Fitted.split_like(shapes, grad)
        zeta_alone = torch.cat([v.flatten() for v in fine.apply(mats).values()])
        torch.testing.assert_close(zeta, zeta_alone, **EXACT)
        for fisher, match in ((first + DAMPING * eye, True), (whole + DAMPING * eye, False)):
            beta = torch.linalg.solve(r0 @ fisher @ r0.T, r0 @ (grad - fisher @ zeta))
            close = torch.allclose(got, zeta + r0.T @ beta, **EXACT)
            assert close is match


@pytest.mark.parametrize("space", ["nicolaides", "spectral", "residual"])
def test_max_samples_at_or_above_the_batch_changes_nothing(space: str) -> None:
    problem = P.mlp_ce()
    directions = []
    for limit in (None, problem.n, problem.n + 5):
        fitted = Fitted(problem, TwoLevel(KFAC(), SPACES[space](), max_samples=limit))
        pre = fitted.approx.inverse(DAMPING)
        directions.append([got for _, _, got in _directions(pre, fitted.shapes, fitted.size)])
    for other in directions[1:]:
        for a, b in zip(directions[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("space", "same_as"),
    [("nicolaides", 128), ("nicolaides_krylov", 128), ("residual", 128), ("spectral", None),
     ("spectral_smallest_krylov", None)],
)  # fmt: skip
def test_auto_max_samples_is_the_space_s_own(space: str, same_as: int | None) -> None:
    """``"auto"``: the space's ``auto_samples``, 128 for all but Spectral, which takes all."""
    assert SPACES[space]().auto_samples == same_as
    problem = P.mlp_ce(n=130)
    directions = []
    for limit in ("auto", same_as, 128 if same_as is None else None):
        fitted = Fitted(problem, TwoLevel(KFAC(), SPACES[space](), max_samples=limit))
        pre = fitted.approx.inverse(DAMPING)
        directions.append([got for _, _, got in _directions(pre, fitted.shapes, fitted.size)])
    auto, same, other = directions
    assert all(torch.equal(a, b) for a, b in zip(auto, same, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(auto, other, strict=True))


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "64", "all"], ids=repr)
def test_bad_max_samples_names_the_fix(value: object) -> None:
    with pytest.raises(ValueError, match=r"max_samples .* positive int, 'auto'"):
        TwoLevel(KFAC(), Nicolaides(), max_samples=value)  # type: ignore[arg-type]


# -- wrapper behaviour ------------------------------------------------------------------


def test_refreshable_fine_levels_make_a_refreshable_two_level() -> None:
    assert isinstance(TwoLevel(EKFAC()), RefreshableTwoLevel)
    assert isinstance(TwoLevel(EKFAC()), RefreshableApprox)
    assert not isinstance(TwoLevel(KFAC()), RefreshableApprox)


def test_misuse_names_the_fix() -> None:
    with pytest.raises(ValueError, match="Nicolaides\\(krylov=True\\)"):
        Tselepidis(krylov=True)
    with pytest.raises(TypeError, match="CoarseSpace"):
        TwoLevel(KFAC(), "nicolaides")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_vectors"):
        Spectral(num_vectors=0)
    problem = P.mlp_ce()
    approx = TwoLevel(KFAC(), Nicolaides())
    with pytest.raises(RuntimeError, match="update"):
        approx.inverse(DAMPING)
    kron_only = fit_statistics(problem, KFAC(), FisherType.EXACT)
    with pytest.raises(ValueError, match=r"stats=approx\.required_stats"):
        approx.update(kron_only)
    assert approx.num_updates == 0 and approx.fine.state_dict()["blocks"] == {}  # untouched
    residual = Fitted(problem, TwoLevel(KFAC(), ResidualSpace()))
    with pytest.raises(ValueError, match="no matrix"):
        residual.approx.inverse(DAMPING).to_dense_full()
    small, large = RestrictedFisher(torch.eye(2)), RestrictedFisher(torch.eye(3))
    with pytest.raises(ValueError, match="vectors must stay the same"):
        small.averaged(large, 0.5)
    with pytest.raises(RuntimeError, match="restrict with rows"):
        small.project({})


def test_flushing_zeroes_only_the_entries_below_the_threshold() -> None:
    tiny = torch.finfo(torch.float32).tiny
    rows = torch.tensor([[[tiny / 4, -tiny / 2, 1e-30, -2.0]]])
    flushed = RestrictedFisher(torch.eye(1), {"0": rows}).flushed(tiny)
    assert flushed.rows is not None
    want = torch.tensor([[[0.0, 0.0, 1e-30, -2.0]]])
    torch.testing.assert_close(flushed.rows["0"], want, rtol=0.0, atol=0.0)


@pytest.mark.parametrize(
    "space",
    ["nicolaides", "nicolaides_krylov", "spectral", "residual", "tselepidis"],
)
def test_state_dict_round_trip(space: str) -> None:
    make = SPACES.get(space, lambda: Tselepidis())
    problem = P.cnn_ce()
    approx = TwoLevel(KFAC(), make(), decay=0.7)
    model = problem.model()
    for seed in range(3):
        approx.update(fit_statistics(perturbed(problem, 0.1 * (seed + 1)), approx, model=model))
    buffer = io.BytesIO()
    torch.save(approx.state_dict(), buffer)
    buffer.seek(0)
    restored = TwoLevel(KFAC(), make(), decay=0.7)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    grads = {
        name: torch.randn(
            rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
        )
        for name, (rows, cols) in approx._shapes.items()
    }
    want = approx.inverse(DAMPING).apply(grads)
    got = restored.inverse(DAMPING).apply(grads)
    for name in grads:
        torch.testing.assert_close(got[name], want[name], rtol=0.0, atol=0.0)
    assert restored.num_updates == 3


def _make_optimizer(model: nn.Module, problem: P.Problem, space: str, **kwargs: object):  # type: ignore[no-untyped-def]
    make = SPACES.get(space, lambda: Tselepidis())
    settings = {"lr": 0.1, "momentum": 0.9, "damping": DAMPING, **kwargs}
    return PreconditionedOptimizer(
        model, TwoLevel(KFAC(), make()), loss_fn=problem.loss_fn, **settings
    )


@pytest.mark.parametrize(
    "space", ["nicolaides", "nicolaides_krylov", "spectral", "residual", "tselepidis"]
)
def test_checkpoint_resume_is_exact(space: str) -> None:
    problem = P.autoencoder_bce(n=8)
    batches = [(problem.x + 0.1 * i, problem.y) for i in range(8)]
    settings = {"t_cov": 2, "t_inv": 3, "warmup": 0, "mc_samples": 2}
    model = problem.model()
    full = train_steps(_make_optimizer(model, problem, space, **settings), model,
                       problem.loss_fn, batches)  # fmt: skip
    model = problem.model()
    opt = _make_optimizer(model, problem, space, **settings)
    first = train_steps(opt, model, problem.loss_fn, batches[:5])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model = problem.model()
    opt = _make_optimizer(model, problem, space, **settings)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    second = train_steps(opt, model, problem.loss_fn, batches[5:])
    assert first + second == full


@pytest.mark.parametrize("space", ["nicolaides", "spectral", "residual", "tselepidis"])
def test_optimizer_trains_and_reports_the_coarse_level(space: str) -> None:
    problem = P.cnn_ce(n=16)
    model = problem.model()
    opt = _make_optimizer(model, problem, space, fisher_type="exact", kl_clip=1e-1, lr=0.3,
                          momentum=0.0, damping=1e-3, **FRESH)  # fmt: skip
    losses = train_steps(opt, model, problem.loss_fn, [(problem.x, problem.y)] * 20)
    assert losses[-1] < 0.02 * losses[0], losses
    diagnostics = opt.last_stats["diagnostics"]["default"]
    assert diagnostics["coarse_error_change"] <= 0.0
    assert diagnostics["coarse_condition"] >= 1.0 and diagnostics["coarse_size"] >= 2
    assert diagnostics["coarse_damping"] >= 0.0 and 0.0 <= diagnostics["coarse_scale"] <= 1.0


def test_each_group_has_its_own_two_level_correction() -> None:
    problem = P.mlp_ce(n=16)
    model = problem.model()
    opt = PreconditionedOptimizer(
        model, TwoLevel(KFAC(), Nicolaides()), loss_fn=problem.loss_fn, lr=0.5, damping=DAMPING,
        kl_clip=1e-1, fisher_type="exact", **FRESH, groups=[
            {"layers": ["2", "4"], "approx": TwoLevel(KPSVD(), Spectral(), form="additive"),
             "name": "top"},
        ],
    )  # fmt: skip
    losses = train_steps(opt, model, problem.loss_fn, [(problem.x, problem.y)] * 15)
    assert losses[-1] < 0.9 * losses[0], losses
    diagnostics = opt.last_stats["diagnostics"]
    assert set(diagnostics) == {"default", "top"}
    assert diagnostics["default"]["coarse_size"] == 1  # one layer left in the default group
    assert diagnostics["top"]["coarse_size"] == 2
    assert "coarse_error_change" not in diagnostics["top"]  # additive, not asked to report
    for group in diagnostics.values():  # each group's own safeguard reports
        assert group["coarse_damping"] >= 0.0 and 0.0 <= group["coarse_scale"] <= 1.0
