r"""The curvature as an operator: trace, log-determinant, inverse, condition and sampling.

Every approximation of ``cases.APPROXIMATIONS`` on every problem of ``cases.PROBLEMS``
(float64) is checked against dense matrices computed independently of the method
under test: the damped operator each method documents, written out from its
formula in ``tests/approx/damping.py`` (from the stored factors, or ``to_dense``
plus the damping term) and factorised with ``torch.linalg``, and for the natural
gradient the dense Fisher of ``tests/oracle.py``.

**Sampling tolerances.** For $n$ zero-mean Gaussian draws with covariance
$\Sigma$ (``P x P``) the sample covariance $\hat\Sigma = \frac1n\sum_s x_s x_s^\top$
has $\mathbb E\|\hat\Sigma - \Sigma\|_F^2 = (\|\Sigma\|_F^2 + (\operatorname{tr}
\Sigma)^2)/n$, the sample mean $\mathbb E\|\bar x\|^2 = \operatorname{tr}\Sigma / n$,
and the whitened covariance $L^\top \hat\Sigma L$ (with $\Sigma^{-1} = LL^\top$)
$\mathbb E\|L^\top\hat\Sigma L - I\|_F^2 = (P + P^2)/n$. The tests allow
``SAMPLE_SLACK`` times each root-mean-square error with ``NUM_DRAWS`` draws: the
whitened check weighs every direction equally, so a wrong variance in a
low-curvature direction cannot hide behind the large ones. The generators are
seeded, so the tests are deterministic; the slack keeps them valid for other seeds
(each squared error concentrates around its mean, which the slack exceeds 16-fold).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from curvlib.approx import base
from curvlib.approx.base import (
    BlockDiagonalPreconditioner,
    LayerBlock,
    LayerInverse,
    LayerwiseApprox,
)
from curvlib.approx.diagonal import Diagonal
from curvlib.approx.ekfac import EKFAC
from curvlib.approx.kfac import KFAC, KFACDamping
from curvlib.approx.natural_gradient import ALL_LAYERS, ExactNaturalGradient
from curvlib.core import CurvatureOperator, CurvatureStatistics, FisherType, LayerStatistics
from curvlib.core.checkpoint import RECORD_KEY, writer_record
from curvlib.extract import CurvatureExtractor
from tests import oracle
from tests.approx.cases import APPROXIMATIONS, PROBLEMS, ApproxCase, fit_statistics, perturbed
from tests.approx.damping import documented_damped, paper_pi
from tests.problems import Problem

RTOL = 1e-9
"""Relative tolerance of float64 identities (rounding only)."""

DAMPING = 1e-2

NUM_DRAWS = 20_000
"""Draws per sampling check: about 0.1 s per layer of the test problems."""

SAMPLE_SLACK = 4.0
"""Allowed multiple of the root-mean-square sampling error (module docstring)."""

EXACT_CONDITION = {"kfac_eigen", "ekfac", "diagonal"}
"""Cases whose condition number is documented as exact, not only a lower bound."""

LINEAR_NOISE = {
    "ekfac",
    "diagonal",
    "kfac_pi",
    "kfac_eigen",
    "kfac_sqrt_per_position",
    "kpsvd",
    "kpsvd_sqrt",
    "deflation",
    "kfac_corrected",
    "lanczos",
    "block_ng_exact",
    "block_ng_heuristic",
}
"""Cases whose draws are documented as a linear map of ``randn((S, out, in))``."""

CASES = [
    pytest.param(case, index, id=f"{case.name}-{problem.name}")
    for case in APPROXIMATIONS
    for index, problem in enumerate(PROBLEMS)
]


@functools.cache
def _fitted_cached(name: str, index: int) -> LayerwiseApprox:
    case = next(c for c in APPROXIMATIONS if c.name == name)
    problem = PROBLEMS[index]
    approx = case.make()
    approx.update(fit_statistics(problem, approx))
    approx.update(fit_statistics(perturbed(problem), approx))
    return approx


def _fitted(case: ApproxCase, index: int) -> LayerwiseApprox:
    """A fitted approximation (two updates), shared by the tests: none of them mutates it."""
    return _fitted_cached(case.name, index)


@functools.cache
def _reference_cached(name: str, index: int, layer: str) -> Tensor:
    return documented_damped(name, _fitted_cached(name, index), layer, DAMPING)


def _reference(case: ApproxCase, index: int, layer: str) -> Tensor:
    """The documented damped operator of ``layer`` at ``DAMPING``, built in the test."""
    return _reference_cached(case.name, index, layer)


def _eye(size: int) -> Tensor:
    return torch.eye(size, dtype=torch.float64)


def _close(actual: Tensor, expected: Tensor, what: str, rtol: float = RTOL) -> None:
    err = float((actual - expected).abs().max())
    scale = float(expected.abs().max())
    assert err <= rtol * max(scale, 1e-30), f"{what}: max error {err:.3e}, scale {scale:.3e}"


def _close_scalar(
    actual: Tensor | float, expected: Tensor | float, scale: float, what: str
) -> None:
    err = abs(float(actual) - float(expected))
    assert err <= RTOL * scale, f"{what}: {float(actual)!r} vs {float(expected)!r}"


def _condition(dense: Tensor) -> float:
    values = torch.linalg.eigvalsh(dense)
    return float(values[-1] / values[0])


# -- trace and log-determinant -------------------------------------------------------


@pytest.mark.parametrize(("case", "index"), CASES)
def test_trace_equals_the_dense_trace(case: ApproxCase, index: int) -> None:
    approx = _fitted(case, index)
    total = 0.0
    for name in approx.blocks:
        dense = approx.to_dense(name)
        expected = torch.trace(dense)
        _close_scalar(approx.trace(name), expected, float(dense.diagonal().abs().sum()), name)
        total += float(expected)
    _close_scalar(approx.trace(), total, abs(total), "trace over layers")


@pytest.mark.parametrize(("case", "index"), CASES)
def test_logdet_equals_slogdet_of_the_damped_operator(case: ApproxCase, index: int) -> None:
    approx = _fitted(case, index)
    total = 0.0
    for name, block in approx.blocks.items():
        sign, expected = torch.linalg.slogdet(_reference(case, index, name))
        assert float(sign) == 1.0, f"damped {name} is not positive definite"
        scale = max(abs(float(expected)), float(block.num_params))
        _close_scalar(approx.logdet(DAMPING, name), expected, scale, f"logdet of {name}")
        total += float(expected)
    _close_scalar(approx.logdet(DAMPING), total, abs(total), "logdet over layers")


@pytest.mark.parametrize(("case", "index"), CASES)
def test_damped_operator_is_the_documented_rule(case: ApproxCase, index: int) -> None:
    approx = _fitted(case, index)
    for name in approx.blocks:
        expected = _reference(case, index, name)
        _close(approx.damped_to_dense(name, DAMPING), expected, f"damped {name}", rtol=1e-9)


@pytest.mark.parametrize("index", range(len(PROBLEMS)), ids=[p.name for p in PROBLEMS])
def test_the_factored_rule_is_tested_where_pi_is_far_from_one(index: int) -> None:
    """Guards the tests above: a pi fixed at 1, or inverted, gives another operator."""
    approx = _fitted_cached("kfac_pi", index)
    far = [
        name
        for name, block in approx.blocks.items()
        if abs(math.log(paper_pi(block.state_dict()["A"], block.state_dict()["G"]))) > 0.5
    ]
    assert far, "every layer has pi near 1: the factored-damping checks would not discriminate"


def test_kfac_logdet_is_that_of_the_pi_damped_product() -> None:
    """The documented operator: (G + gamma_G I) x (A + gamma_A I), not G x A + lambda I."""
    approx = _fitted_cached("kfac_pi", 0)
    assert isinstance(approx, KFAC) and approx.damping_mode is KFACDamping.PI
    name = next(iter(approx.blocks))
    tikhonov = approx.to_dense(name) + DAMPING * _eye(approx.blocks[name].num_params)
    gap = float(approx.logdet(DAMPING, name) - torch.linalg.slogdet(tikhonov)[1])
    assert gap > 1.0  # the pi cross terms add curvature: log-determinant well above


# -- the inverse operator --------------------------------------------------------------


@pytest.mark.parametrize(("case", "index"), CASES)
def test_inverse_operator_matches_the_dense_inverse(case: ApproxCase, index: int) -> None:
    approx = _fitted(case, index)
    inverse = approx.inverse(DAMPING)
    gen = torch.Generator().manual_seed(3)
    vectors = {
        name: torch.randn(2, b.out_dim, b.in_dim, generator=gen, dtype=torch.float64)
        for name, b in approx.blocks.items()
    }
    products = inverse.matvec(vectors)
    applied = inverse.apply(vectors)
    for name, mats in vectors.items():
        damped = _reference(case, index, name)
        dense_inverse = torch.linalg.inv(damped)
        _close(inverse.to_dense(name), dense_inverse, f"to_dense of {name}", rtol=1e-8)
        expected = torch.linalg.solve(damped, mats.flatten(1).T).T.reshape(mats.shape)
        _close(products[name], expected, f"matvec of {name}", rtol=1e-8)
        assert torch.equal(products[name], applied[name])


@pytest.mark.parametrize(("case", "index"), CASES)
def test_condition_estimates_bound_the_true_condition_number(case: ApproxCase, index: int) -> None:
    approx = _fitted(case, index)
    estimates = approx.inverse(DAMPING).condition_numbers
    assert set(estimates) == set(approx.blocks)
    for name, block in approx.blocks.items():
        true = _condition(_reference(case, index, name))
        estimate = estimates[name]
        assert 1.0 <= estimate <= true * (1 + 1e-8), f"{name}: {estimate} vs {true}"
        assert math.isclose(block.condition_number(DAMPING), estimate, rel_tol=1e-12)
        if case.name in EXACT_CONDITION:
            assert math.isclose(estimate, true, rel_tol=1e-8), f"{name}: {estimate} vs {true}"


def _random_factor(size: int, gen: torch.Generator, scale: float) -> Tensor:
    root = torch.randn(size, size + 1, generator=gen, dtype=torch.float64)
    return scale * root @ root.T / size


def _loaded(case: str, out_dim: int, in_dim: int, seed: int, ratio: float) -> LayerwiseApprox:
    """A one-layer approximation with random factors, ``tr A / tr G`` near ``ratio``."""
    gen = torch.Generator().manual_seed(seed)
    A, G = _random_factor(in_dim, gen, ratio), _random_factor(out_dim, gen, 1.0)
    state: dict[str, object]
    if case == "diagonal":
        approx: LayerwiseApprox = Diagonal()
        state = {"diagonal": torch.rand(out_dim, in_dim, generator=gen, dtype=torch.float64)}
    elif case == "ekfac":
        approx = EKFAC()
        scalings = ratio * torch.rand(out_dim, in_dim, generator=gen, dtype=torch.float64)
        state = {
            "A": A, "G": G, "basis_a": torch.linalg.eigh(A).eigenvectors,
            "basis_g": torch.linalg.eigh(G).eigenvectors, "scalings": scalings,
            "pending": None, "stale": False,
        }  # fmt: skip
    else:
        mode = KFACDamping.PI if case == "kfac_pi" else KFACDamping.EIGEN
        approx, state = KFAC(mode), {"A": A, "G": G}
    block = {"shape": [out_dim, in_dim], "state": state}
    approx.load_state_dict(
        {RECORD_KEY: writer_record(approx), "num_updates": 1, "blocks": {"w": block}}
    )
    return approx


@settings(max_examples=30, deadline=None)
@given(
    case=st.sampled_from(["kfac_pi", "kfac_eigen", "ekfac", "diagonal"]),
    out_dim=st.integers(1, 5),
    in_dim=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    log_ratio=st.floats(-4.0, 4.0),
    log_damping=st.floats(-6.0, 1.0),
)
def test_damping_and_condition_of_random_blocks(
    case: str, out_dim: int, in_dim: int, seed: int, log_ratio: float, log_damping: float
) -> None:
    """The documented damped operator and condition number, on random factors of any scale."""
    damping = 10.0**log_damping
    approx = _loaded(case, out_dim, in_dim, seed, 10.0**log_ratio)
    expected = documented_damped(case, approx, "w", damping)
    _close(approx.damped_to_dense("w", damping), expected, "damped operator", rtol=1e-9)
    true = _condition(expected)
    estimate = approx.blocks["w"].condition_number(damping)
    if case in EXACT_CONDITION:
        assert math.isclose(estimate, true, rel_tol=1e-7), (estimate, true)
    else:
        assert 1.0 <= estimate <= true * (1 + 1e-7), (estimate, true)


# -- sampling --------------------------------------------------------------------------


def _check_gaussian(draws: Tensor, covariance: Tensor, precision: Tensor, what: str) -> None:
    """Sample mean, covariance and whitened covariance within ``SAMPLE_SLACK`` RMS errors."""
    n, size = draws.shape
    trace = float(covariance.trace())
    mean_err = float(draws.mean(0).norm())
    assert mean_err <= SAMPLE_SLACK * math.sqrt(trace / n), f"{what}: mean {mean_err:.3e}"
    sample_cov = draws.T @ draws / n
    rms = math.sqrt((float(covariance.norm()) ** 2 + trace**2) / n)
    cov_err = float((sample_cov - covariance).norm())
    assert cov_err <= SAMPLE_SLACK * rms, f"{what}: covariance error {cov_err:.3e} > {rms:.3e}"
    chol = torch.linalg.cholesky(precision)
    white = chol.T @ sample_cov @ chol
    white_err = float((white - torch.eye(size, dtype=white.dtype)).norm())
    white_rms = math.sqrt((size + size**2) / n)
    assert white_err <= SAMPLE_SLACK * white_rms, f"{what}: whitened error {white_err:.3e}"


@pytest.mark.parametrize(("case", "index"), CASES)
def test_samples_have_the_inverse_damped_operator_as_covariance(
    case: ApproxCase, index: int
) -> None:
    approx = _fitted(case, index)
    gen = torch.Generator().manual_seed(1234)
    draws = approx.sample(DAMPING, NUM_DRAWS, generator=gen)
    assert set(draws) == set(approx.blocks)
    for name, block in approx.blocks.items():
        assert draws[name].shape == (NUM_DRAWS, block.out_dim, block.in_dim)
        assert draws[name].dtype == torch.float64
        damped = _reference(case, index, name)
        _check_gaussian(draws[name].flatten(1), torch.linalg.inv(damped), damped, name)


@pytest.mark.parametrize(("case", "index"), [c for c in CASES if c.values[0].name in LINEAR_NOISE])
def test_draws_are_an_exact_square_root_of_the_inverse(case: ApproxCase, index: int) -> None:
    r"""Noise-free check: the draws are $T z$ with $TT^\top = D^{-1}$ exactly."""
    approx = _fitted(case, index)
    for name, block in approx.blocks.items():
        size = block.num_params
        count = 2 * size
        drawn = block.sample(DAMPING, count, torch.Generator().manual_seed(7))
        noise = torch.randn(
            (count, block.out_dim, block.in_dim),
            generator=torch.Generator().manual_seed(7),
            dtype=torch.float64,
        )
        x, z = drawn.reshape(count, size).T, noise.reshape(count, size).T
        transform = torch.linalg.lstsq(z.T, x.T).solution.T  # x = T z
        _close(transform @ z, x, f"draws of {name} are linear in the noise", rtol=1e-8)
        expected = torch.linalg.inv(_reference(case, index, name))
        _close(transform @ transform.T, expected, f"T T^T of {name}", rtol=1e-8)


@pytest.mark.parametrize("case", APPROXIMATIONS, ids=lambda c: c.name)
def test_sampling_is_reproducible_with_a_seeded_generator(case: ApproxCase) -> None:
    approx = _fitted(case, 0)
    first = approx.sample(DAMPING, 3, generator=torch.Generator().manual_seed(5))
    again = approx.sample(DAMPING, 3, generator=torch.Generator().manual_seed(5))
    other = approx.sample(DAMPING, 3, generator=torch.Generator().manual_seed(6))
    for name in approx.blocks:
        assert torch.equal(first[name], again[name])
        assert not torch.equal(first[name], other[name])


# -- protocol and bad input --------------------------------------------------------------


@pytest.mark.parametrize("case", APPROXIMATIONS, ids=lambda c: c.name)
def test_every_approximation_is_a_curvature_operator(case: ApproxCase) -> None:
    approx = _fitted(case, 0)
    assert isinstance(approx, CurvatureOperator)
    assert isinstance(ExactNaturalGradient(), CurvatureOperator)


@pytest.mark.parametrize("case", APPROXIMATIONS, ids=lambda c: c.name)
def test_bad_arguments_are_rejected(case: ApproxCase) -> None:
    approx = _fitted(case, 0)
    for damping in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="damping must be positive"):
            approx.logdet(damping)
        with pytest.raises(ValueError, match="damping must be positive"):
            approx.sample(damping)
    for count in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="num_samples must be a positive int"):
            approx.sample(DAMPING, count)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        approx.sample(DAMPING, generator=5)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="update\\(\\) first"):
        approx.trace("no-such-layer")
    with pytest.raises(KeyError, match="update\\(\\) first"):
        approx.inverse(DAMPING).to_dense("no-such-layer")
    fresh = case.make()
    for call in (fresh.trace, lambda: fresh.logdet(DAMPING), lambda: fresh.sample(DAMPING)):
        with pytest.raises(RuntimeError, match="update\\(\\) first"):
            call()


# -- dense fallbacks of LayerBlock and lazy condition estimates --------------------------


class _DenseBlock(LayerBlock):
    """A block that implements only the abstract methods: everything else is the fallback."""

    def __init__(self, out_dim: int, in_dim: int) -> None:
        super().__init__(out_dim, in_dim, torch.float64)
        self.matrix: Tensor | None = None

    def update(self, stats: LayerStatistics, rho: float) -> None:
        raise NotImplementedError  # set through load_state_dict in these tests

    def matvec(self, mat: Tensor) -> Tensor:
        assert self.matrix is not None
        flat = mat.reshape(*mat.shape[:-2], -1) @ self.matrix.T
        return flat.reshape(mat.shape)

    def inverse(self, damping: float) -> LayerInverse:
        damped = self.damped_to_dense(damping)

        def apply(mat: Tensor) -> Tensor:
            flat = torch.linalg.solve(damped, mat.reshape(-1, damped.shape[0]).T).T
            return flat.reshape(mat.shape)

        return apply

    def state_dict(self) -> dict[str, Tensor]:
        assert self.matrix is not None
        return {"matrix": self.matrix.clone()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.matrix = state["matrix"].clone()


class _DenseApprox(LayerwiseApprox):
    required_stats = frozenset()

    def _make_block(self, out_dim: int, in_dim: int) -> LayerBlock:
        return _DenseBlock(out_dim, in_dim)


def _dense_approx(seed: int) -> _DenseApprox:
    gen = torch.Generator().manual_seed(seed)
    root = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    approx = _DenseApprox()
    approx.load_state_dict(
        {
            RECORD_KEY: writer_record(approx),
            "num_updates": 1,
            "blocks": {"w": {"shape": [2, 3], "state": {"matrix": root @ root.T}}},
        }
    )
    return approx


def test_dense_fallbacks_of_layer_block() -> None:
    approx = _dense_approx(0)
    matrix = approx.to_dense("w")
    damped = matrix + DAMPING * _eye(6)
    _close_scalar(approx.trace(), torch.trace(matrix), float(matrix.trace()), "trace")
    _close_scalar(approx.logdet(DAMPING), torch.linalg.slogdet(damped)[1], 10.0, "logdet")
    inverse = approx.inverse(DAMPING)
    assert math.isclose(inverse.condition_numbers["w"], _condition(damped), rel_tol=1e-10)
    draws = approx.sample(DAMPING, NUM_DRAWS, generator=torch.Generator().manual_seed(0))["w"]
    _check_gaussian(draws.flatten(1), torch.linalg.inv(damped), damped, "dense fallback")


def test_condition_estimates_without_an_attribute_are_lazy_and_describe_the_built_inverse() -> None:
    approx = _dense_approx(0)
    expected = _condition(approx.to_dense("w") + DAMPING * _eye(6))
    calls: list[str] = []
    block = approx.blocks["w"]
    original = block.condition_number

    def counting(damping: float) -> float:
        calls.append("w")
        return original(damping)

    block.condition_number = counting  # type: ignore[method-assign]
    inverse = approx.inverse(DAMPING)
    assert calls == []  # nothing computed while building
    approx.load_state_dict(_dense_approx(1).state_dict())  # the estimate moves on
    assert math.isclose(inverse.condition_numbers["w"], expected, rel_tol=1e-10)
    assert calls == ["w"]
    inverse.condition_numbers  # noqa: B018  (computed once)
    assert calls == ["w"]


def test_cheap_condition_estimates_are_computed_when_the_inverse_is_built() -> None:
    approx = _dense_approx(0)
    block = approx.blocks["w"]
    expected = _condition(approx.to_dense("w") + DAMPING * _eye(6))
    calls: list[float] = []
    original = block.condition_number

    def counting(damping: float) -> float:
        calls.append(damping)
        return original(damping)

    block.condition_number = counting  # type: ignore[method-assign]
    block.cheap_condition = True  # type: ignore[misc]
    inverse = approx.inverse(DAMPING)
    assert calls == [DAMPING]  # computed while building, on the block itself
    approx.load_state_dict(_dense_approx(1).state_dict())
    assert math.isclose(inverse.condition_numbers["w"], expected, rel_tol=1e-10)
    assert calls == [DAMPING]


def test_dense_condition_fallback_is_skipped_for_large_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    approx = _dense_approx(0)
    monkeypatch.setattr(base, "DENSE_CONDITION_LIMIT", 5)  # the block has 6 parameters
    assert math.isnan(approx.inverse(DAMPING).condition_numbers["w"])
    monkeypatch.setattr(base, "DENSE_CONDITION_LIMIT", 6)
    assert math.isclose(
        approx.inverse(DAMPING).condition_numbers["w"],
        _condition(approx.to_dense("w") + DAMPING * _eye(6)),
        rel_tol=1e-10,
    )


def test_preconditioner_without_shapes_explains_to_dense() -> None:
    precond = BlockDiagonalPreconditioner({"w": lambda mat: mat})
    assert precond.condition_numbers == {}
    with pytest.raises(ValueError, match="shapes="):
        precond.to_dense("w")


# -- exact natural gradient: the full Fisher, checked against the oracle -----------------


def _exact_ng(index: int) -> tuple[ExactNaturalGradient, Tensor, dict[str, slice]]:
    problem: Problem = PROBLEMS[index]
    model = problem.model()
    approx = ExactNaturalGradient()
    extractor = CurvatureExtractor(
        model, problem.loss_fn, stats=approx.required_stats, fisher_type=FisherType.EXACT
    )
    with extractor.collect():
        problem.loss_fn(model(problem.x), problem.y).backward()
    stats: CurvatureStatistics = extractor.statistics()
    approx.update(stats)
    dense = oracle.dense_ggn(model, problem.loss_fn, problem.x, problem.y)
    return approx, dense, oracle.layer_slices(model)


@pytest.mark.parametrize("index", range(len(PROBLEMS)), ids=[p.name for p in PROBLEMS])
def test_exact_natural_gradient_operator_matches_the_oracle_fisher(index: int) -> None:
    approx, fisher, slices = _exact_ng(index)
    size = fisher.shape[0]
    damped = fisher + DAMPING * _eye(size)
    _close_scalar(approx.trace(), torch.trace(fisher), float(fisher.trace()), "trace")
    _close_scalar(approx.logdet(DAMPING), torch.linalg.slogdet(damped)[1], float(size), "logdet")
    for name, sl in slices.items():
        block = fisher[sl, sl]
        _close_scalar(approx.trace(name), torch.trace(block), float(block.trace()), name)
        layer_damped = block + DAMPING * _eye(block.shape[0])
        expected = torch.linalg.slogdet(layer_damped)[1]
        _close_scalar(approx.logdet(DAMPING, name), expected, float(block.shape[0]), name)

    inverse = approx.inverse(DAMPING)
    dense_inverse = torch.linalg.inv(damped)
    _close(inverse.to_dense_full(), dense_inverse, "to_dense_full", rtol=1e-8)
    for name, sl in slices.items():
        _close(inverse.to_dense(name), dense_inverse[sl, sl], f"to_dense({name})", rtol=1e-8)
    gen = torch.Generator().manual_seed(2)
    vectors = {
        name: torch.randn(sl.stop - sl.start, generator=gen, dtype=torch.float64)
        for name, sl in slices.items()
    }
    shapes = {name: draws.shape[1:] for name, draws in approx.sample(DAMPING).items()}
    products = inverse.matvec({n: v.reshape(shapes[n]) for n, v in vectors.items()})
    expected = dense_inverse @ torch.cat([vectors[name] for name in slices])
    for name, sl in slices.items():
        _close(products[name].flatten(), expected[sl], f"matvec of {name}", rtol=1e-8)
    estimate = inverse.condition_numbers[ALL_LAYERS]
    assert set(inverse.condition_numbers) == {ALL_LAYERS}
    assert 1.0 <= estimate <= _condition(damped) * (1 + 1e-8)

    draws = approx.sample(DAMPING, NUM_DRAWS, generator=torch.Generator().manual_seed(11))
    joint = torch.cat([draws[name].flatten(1) for name in slices], dim=1)
    _check_gaussian(joint, dense_inverse, damped, "exact natural gradient")
    again = approx.sample(DAMPING, NUM_DRAWS, generator=torch.Generator().manual_seed(11))
    assert all(torch.equal(draws[name], again[name]) for name in slices)


def test_exact_natural_gradient_operator_rejects_bad_input() -> None:
    approx = ExactNaturalGradient()
    with pytest.raises(RuntimeError, match="update\\(\\) first"):
        approx.trace()
    approx, _, slices = _exact_ng(0)
    with pytest.raises(KeyError, match="update\\(\\) first"):
        approx.logdet(DAMPING, "no-such-layer")
    with pytest.raises(ValueError, match="damping must be positive"):
        approx.sample(0.0)
    with pytest.raises(ValueError, match="num_samples"):
        approx.sample(DAMPING, 0)
    with pytest.raises(KeyError, match="Unknown layer"):
        approx.inverse(DAMPING).to_dense("no-such-layer")
    with pytest.raises(KeyError, match="couples all layers"):
        approx.inverse(DAMPING).matvec({next(iter(slices)): torch.ones(1)})
