"""Exact and block-diagonal natural gradient against dense solves and the oracle (float64).

The generic checks of ``test_generic.py`` also run ``BlockNaturalGradient`` (both damping
modes, registered in ``cases.py``); this module adds what is specific to the Woodbury
solves: agreement with ``torch.linalg.solve`` on the dense damped Fisher of the oracle,
the full (cross-layer) Fisher, and the memory structure (an ``m x m`` kernel, no
``P x P`` tensor).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from curvlib.approx import KFAC, Diagonal, TwoLevel, UnitWiseNaturalGradient
from curvlib.approx.base import NonFiniteStatisticsError, OwnerFailedError
from curvlib.approx.natural_gradient import (
    BlockNaturalGradient,
    ExactNaturalGradient,
    NGDamping,
    WoodburyLayerInverse,
)
from curvlib.approx.wide import BlockTridiagonalNaturalGradient
from curvlib.core import CurvatureApprox, CurvatureStatistics, FisherType, Preconditioner, StatKind
from curvlib.extract import CurvatureExtractor, UnsupportedPolicy
from curvlib.linalg.factors import FactorizationError
from curvlib.linalg.woodbury import (
    DenseRows,
    FactoredRows,
    RowsWithGram,
    WoodburyInverse,
    damped_cholesky,
    dense_gram_matvec,
    layer_rows,
    woodbury_solve,
)
from tests import oracle
from tests import problems as P
from tests.approx.cases import perturbed
from tests.problems import Problem

RTOL = 1e-9
"""Relative tolerance for float64 identities, also against the oracle (rounding only)."""

DAMPING = 1e-2

PROBLEMS = [P.mlp_ce(), P.cnn_ce(), P.tconv_bce()]
PROBLEM_IDS = [p.name for p in PROBLEMS]
MODES = [NGDamping.EXACT, NGDamping.HEURISTIC]


def _close(actual: Tensor, expected: Tensor, what: str, rtol: float = RTOL) -> None:
    err = float((actual - expected).abs().max())
    scale = float(expected.abs().max())
    assert err <= rtol * max(scale, 1e-30), f"{what}: max error {err:.3e}, scale {scale:.3e}"


def _statistics(
    problem: Problem,
    kinds: Iterable[StatKind] = (StatKind.PER_SAMPLE_IO,),
    fisher: FisherType = FisherType.EXACT,
) -> CurvatureStatistics:
    model = problem.model()
    ex = CurvatureExtractor(
        model,
        problem.loss_fn,
        stats=set(kinds),
        fisher_type=fisher,
        unsupported=UnsupportedPolicy.IGNORE,
    )
    with ex.collect():
        problem.loss_fn(model(problem.x), problem.y).backward()
    return ex.statistics()


@functools.cache
def _fixture(index: int) -> tuple[CurvatureStatistics, Tensor, dict[str, slice]]:
    """Statistics, the oracle's dense GGN and the layer slices of ``PROBLEMS[index]``."""
    problem = PROBLEMS[index]
    model = problem.model()
    dense = oracle.dense_ggn(model, problem.loss_fn, problem.x, problem.y)
    return _statistics(problem), dense, oracle.layer_slices(model)


def _random_vectors(
    stats: CurvatureStatistics, seed: int = 0, lead: tuple[int, ...] = ()
) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(
            *lead, s.layer.out_dim, s.layer.in_dim_aug, generator=gen, dtype=torch.float64
        )
        for name, s in stats.layers.items()
    }


def _flat(vectors: dict[str, Tensor], order: Iterable[str]) -> Tensor:
    return torch.cat([vectors[name].flatten(-2) for name in order], dim=-1)


def _exact(stats: CurvatureStatistics) -> ExactNaturalGradient:
    approx = ExactNaturalGradient()
    approx.update(stats)
    return approx


def _block(stats: CurvatureStatistics, mode: NGDamping) -> BlockNaturalGradient:
    approx = BlockNaturalGradient(mode)
    approx.update(stats)
    return approx


# -- linalg.woodbury -------------------------------------------------------------


@pytest.mark.parametrize(("m", "p"), [(5, 40), (40, 7)], ids=["m<P", "m>P"])
def test_woodbury_solve_equals_dense_solve(m: int, p: int) -> None:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(m, p, generator=gen, dtype=torch.float64) / math.sqrt(m)
    vectors = torch.randn(3, p, generator=gen, dtype=torch.float64)
    dense = rows.T @ rows + DAMPING * torch.eye(p, dtype=torch.float64)
    expected = torch.linalg.solve(dense, vectors.T).T
    _close(woodbury_solve(rows, vectors, DAMPING), expected, "woodbury_solve")
    _close(dense_gram_matvec(rows, vectors), vectors @ (rows.T @ rows), "dense_gram_matvec")


def test_factored_rows_equal_dense_rows() -> None:
    """One output position: the rank-one factored rows act like their dense matrices."""
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(4, 1, 6, generator=gen, dtype=torch.float64)
    grads = torch.randn(3, 4, 1, 5, generator=gen, dtype=torch.float64)
    factored = layer_rows(inputs, grads, scale=0.5)
    assert isinstance(factored, FactoredRows)
    assert factored.shape == (12, 5, 6)
    expected = torch.einsum("kno,ni->knoi", grads[:, :, 0], inputs[:, 0]).reshape(12, 5, 6)
    dense = DenseRows(expected, scale=0.5)
    _close(factored.dense(), dense.dense(), "rows")
    _close(factored.gram(), dense.gram(), "gram")
    mats = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    _close(factored.project(mats), dense.project(mats), "project")
    coeffs = torch.randn(2, 12, generator=gen, dtype=torch.float64)
    _close(factored.expand(coeffs), dense.expand(coeffs), "expand")
    # Several output positions: the per-sample gradients are formed.
    assert isinstance(layer_rows(inputs.expand(4, 3, 6), grads.expand(3, 4, 3, 5)), DenseRows)


def test_woodbury_inverse_rejects_bad_input() -> None:
    rows = DenseRows(torch.ones(3, 2, 2, dtype=torch.float64))
    for damping in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damping must be positive"):
            WoodburyInverse([rows], damping)
    with pytest.raises(ValueError, match="same number of rows"):
        WoodburyInverse([rows, DenseRows(torch.ones(4, 2, 2, dtype=torch.float64))], 1.0)
    with pytest.raises(FactorizationError):
        damped_cholesky(torch.full((3, 3), float("nan"), dtype=torch.float64), 1.0)


# -- the full Fisher -------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(PROBLEMS)), ids=PROBLEM_IDS)
def test_full_fisher_equals_oracle_ggn(index: int) -> None:
    stats, dense, _ = _fixture(index)
    approx = _exact(stats)
    assert list(approx.layers) == oracle.curvature_layer_names(PROBLEMS[index].model())
    _close(approx.to_dense_full(), dense, "full Fisher")


def test_full_fisher_equals_oracle_empirical_fisher() -> None:
    problem = PROBLEMS[0]
    approx = _exact(_statistics(problem, fisher=FisherType.EMPIRICAL))
    dense = oracle.dense_empirical_fisher(problem.model(), problem.loss_fn, problem.x, problem.y)
    _close(approx.to_dense_full(), dense, "empirical Fisher")


@pytest.mark.parametrize("index", range(len(PROBLEMS)), ids=PROBLEM_IDS)
def test_exact_inverse_equals_dense_solve(index: int) -> None:
    stats, dense, _ = _fixture(index)
    approx = _exact(stats)
    vectors = _random_vectors(stats, seed=1, lead=(2,))
    damped = dense + DAMPING * torch.eye(dense.shape[0], dtype=dense.dtype)
    expected = torch.linalg.solve(damped, _flat(vectors, approx.layers).T).T
    inverse = approx.inverse(DAMPING)
    assert isinstance(inverse, Preconditioner)
    applied = inverse.apply(vectors)
    assert list(applied) == list(vectors)
    _close(_flat(applied, approx.layers), expected, "full inverse")
    # Against curvlib's own dense form, to rounding only.
    own = approx.to_dense_full() + DAMPING * torch.eye(dense.shape[0], dtype=dense.dtype)
    _close(
        _flat(applied, approx.layers),
        torch.linalg.solve(own, _flat(vectors, approx.layers).T).T,
        "full inverse (own dense form)",
    )


@pytest.mark.parametrize("index", range(len(PROBLEMS)), ids=PROBLEM_IDS)
def test_exact_matvec_equals_dense_product(index: int) -> None:
    stats, dense, _ = _fixture(index)
    approx = _exact(stats)
    vectors = _random_vectors(stats, seed=2, lead=(3,))
    product = approx.matvec(vectors)
    _close(_flat(product, approx.layers), _flat(vectors, approx.layers) @ dense, "matvec")
    for name in approx.layers:
        dense_block = approx.to_dense(name)
        _close(dense_block, dense_block.T, f"symmetry of {name}")


def test_exact_natural_gradient_is_a_curvature_approx() -> None:
    stats, _, _ = _fixture(0)
    approx = _exact(stats)
    assert isinstance(approx, CurvatureApprox)
    assert approx.required_stats == frozenset({StatKind.PER_SAMPLE_IO})
    assert approx.num_rows == 3 * PROBLEMS[0].n  # K = 3 classes, EXACT


# -- the block-diagonal Fisher ---------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("index", range(len(PROBLEMS)), ids=PROBLEM_IDS)
def test_block_inverse_equals_dense_solve(index: int, mode: NGDamping) -> None:
    stats, dense, slices = _fixture(index)
    approx = _block(stats, mode)
    vectors = _random_vectors(stats, seed=3)
    applied = approx.inverse(DAMPING).apply(vectors)
    for name, sl in slices.items():
        lam = approx.layer_damping(name, DAMPING)
        block = dense[sl, sl] + lam * torch.eye(sl.stop - sl.start, dtype=dense.dtype)
        expected = torch.linalg.solve(block, vectors[name].flatten())
        _close(applied[name].flatten(), expected, f"block inverse of {name}")
        _close(approx.damped_to_dense(name, DAMPING), block, f"damped block {name}")


@pytest.mark.parametrize("index", range(len(PROBLEMS)), ids=PROBLEM_IDS)
def test_blocks_equal_the_diagonal_blocks_of_the_full_fisher(index: int) -> None:
    stats, dense, slices = _fixture(index)
    full, block = _exact(stats), _block(stats, NGDamping.EXACT)
    full_dense = full.to_dense_full()
    for name, sl in slices.items():
        _close(block.to_dense(name), full_dense[sl, sl], f"block {name}")
        _close(full.to_dense(name), full_dense[sl, sl], f"diagonal block {name}")
        _close(block.to_dense(name), dense[sl, sl], f"oracle block {name}")


@pytest.mark.parametrize("index", range(len(PROBLEMS)), ids=PROBLEM_IDS)
def test_heuristic_damping_uses_the_kfac_factors(index: int) -> None:
    r"""$\lambda_l = \lambda + \sqrt\lambda(\|A\|_2 + \|G\|_2)$ with the extractor's own factors."""
    kron = _statistics(PROBLEMS[index], kinds={StatKind.KRONECKER})
    stats, _, _ = _fixture(index)
    approx = _block(stats, NGDamping.HEURISTIC)
    exact = _block(stats, NGDamping.EXACT)
    for name, layer in kron.layers.items():
        assert layer.kronecker is not None
        norm_a = float(torch.linalg.eigvalsh(layer.kronecker.A)[-1])
        norm_g = float(torch.linalg.eigvalsh(layer.kronecker.G)[-1])
        expected = DAMPING + math.sqrt(DAMPING) * (norm_a + norm_g)
        assert approx.layer_damping(name, DAMPING) == pytest.approx(expected, rel=RTOL)
        assert approx.layer_damping(name, DAMPING) >= DAMPING
        assert exact.layer_damping(name, DAMPING) == DAMPING


# -- state, errors ---------------------------------------------------------------


def test_exact_state_dict_round_trip() -> None:
    problem = PROBLEMS[1]
    stats, _, _ = _fixture(1)
    approx = _exact(stats)
    buffer = io.BytesIO()
    torch.save(approx.state_dict(), buffer)
    buffer.seek(0)
    restored = ExactNaturalGradient()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.num_updates == approx.num_updates == 1
    assert restored.layers == approx.layers
    assert torch.equal(restored.to_dense_full(), approx.to_dense_full())
    vectors = _random_vectors(stats)
    before, after = approx.inverse(DAMPING).apply(vectors), restored.inverse(DAMPING).apply(vectors)
    for name in vectors:
        assert torch.equal(before[name], after[name])
    new = _statistics(perturbed(problem))
    approx.update(new)
    restored.update(new)
    assert restored.num_updates == 2
    assert torch.equal(restored.to_dense_full(), approx.to_dense_full())


def test_update_replaces_the_estimate() -> None:
    """Latest batch only: after two updates the estimate is that of the second batch."""
    problem = PROBLEMS[0]
    stats, _, _ = _fixture(0)
    second = _statistics(perturbed(problem))
    approx = _exact(stats)
    approx.update(second)
    assert torch.equal(approx.to_dense_full(), _exact(second).to_dense_full())
    block = _block(stats, NGDamping.EXACT)
    block.update(second)
    for name in block.blocks:
        assert torch.equal(block.to_dense(name), _block(second, NGDamping.EXACT).to_dense(name))


def test_non_finite_statistics_leave_the_estimate_unchanged() -> None:
    stats, _, _ = _fixture(0)
    approx = _exact(stats)
    before = approx.to_dense_full()
    poisoned = _statistics(perturbed(PROBLEMS[0]))
    layer_io = next(iter(poisoned.layers.values())).io
    assert layer_io is not None
    layer_io.output_grads.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteStatisticsError):
        approx.update(poisoned)
    assert approx.num_updates == 1
    assert torch.equal(approx.to_dense_full(), before)


@pytest.mark.parametrize("damping", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_damping_is_rejected(damping: float) -> None:
    stats, _, _ = _fixture(0)
    with pytest.raises(ValueError, match="damping must be positive"):
        _exact(stats).inverse(damping)
    with pytest.raises(ValueError, match="damping must be positive"):
        _block(stats, NGDamping.HEURISTIC).inverse(damping)


def test_usage_errors() -> None:
    stats, _, _ = _fixture(0)
    approx = ExactNaturalGradient()
    with pytest.raises(RuntimeError, match="update"):
        approx.inverse(DAMPING)
    with pytest.raises(ValueError, match="PER_SAMPLE_IO"):
        approx.update(_statistics(PROBLEMS[0], kinds={StatKind.KRONECKER}))
    approx.update(stats)
    vectors = _random_vectors(stats)
    first = next(iter(vectors))
    partial = {k: v for k, v in vectors.items() if k != first}
    with pytest.raises(KeyError, match="couples all layers"):
        approx.inverse(DAMPING).apply(partial)
    with pytest.raises(KeyError, match="couples all layers"):
        approx.matvec({**vectors, "nope": vectors[first]})
    with pytest.raises(KeyError):
        approx.to_dense("nope")


def test_dtype_and_batched_vectors() -> None:
    stats, _, _ = _fixture(1)
    approx = ExactNaturalGradient(dtype=torch.float32)
    approx.update(stats)
    assert approx.to_dense_full().dtype == torch.float32
    reference = _exact(stats)
    vectors = _random_vectors(stats, lead=(2,))
    batched = reference.inverse(DAMPING).apply(vectors)
    single = reference.inverse(DAMPING).apply({k: v[1] for k, v in vectors.items()})
    for name in vectors:
        _close(batched[name][1], single[name], f"batched apply of {name}")


# -- memory structure ------------------------------------------------------------


def _wide_mlp() -> Problem:
    def make() -> nn.Module:
        return nn.Sequential(
            nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 25), nn.Tanh(), nn.Linear(25, 10)
        )

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 20, generator=gen, dtype=torch.float64)
    y = torch.randint(10, (4,), generator=gen)
    return Problem("wide_mlp", make, nn.CrossEntropyLoss(), x, y)


class _LargestTensor(TorchFunctionMode):
    """Records the largest tensor any torch function returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, tuple | list) else (out,):
            if isinstance(item, Tensor):
                self.largest = max(self.largest, item.numel())
        return out


@pytest.mark.parametrize("problem", [_wide_mlp(), PROBLEMS[1]], ids=lambda p: p.name)
def test_no_parameter_sized_square_matrix_is_formed(problem: Problem) -> None:
    """The kernel is ``m x m``; update, inverse, apply and matvec never form a ``P_l x P_l``."""
    stats = _statistics(problem)
    sizes = [s.layer.num_params for s in stats.layers.values()]
    m = next(iter(stats.layers.values())).io.output_grads.shape[:2].numel()  # type: ignore[union-attr]
    bound = min(sizes) ** 2
    # Meaningful only if everything Woodbury needs is smaller than the smallest block.
    assert m * m < bound and m * max(sizes) < bound
    vectors = _random_vectors(stats)
    for approx in (ExactNaturalGradient(), BlockNaturalGradient(NGDamping.HEURISTIC)):
        with _LargestTensor() as mode:
            approx.update(stats)
            approx.inverse(DAMPING).apply(vectors)
            approx.matvec(vectors)
        assert 0 < mode.largest < bound, (type(approx).__name__, mode.largest, bound)
    with _LargestTensor() as control:  # the audit does see a dense block when one is formed
        _exact(stats).to_dense(next(iter(stats.layers)))
    assert control.largest >= bound
    exact = _exact(stats)
    assert exact.num_rows == m
    assert exact.inverse(DAMPING).woodbury.kernel_shape == (m, m)
    block = _block(stats, NGDamping.EXACT)
    for name in stats.layers:
        inverse = block.blocks[name].inverse(DAMPING)
        assert isinstance(inverse, WoodburyLayerInverse)
        assert inverse.woodbury.kernel_shape == (m, m)


def test_linear_layers_keep_factored_rows() -> None:
    """``Linear`` layers never materialise the ``N x out x in`` per-sample gradients."""
    stats, _, _ = _fixture(0)
    approx = _exact(stats)
    inverse = approx.inverse(DAMPING)
    assert all(isinstance(block, FactoredRows) for block in inverse.woodbury.blocks)


# -- kernel blocks computed elsewhere (data-parallel training) ---------------------


@pytest.mark.parametrize("tridiagonal", [False, True], ids=["exact", "tridiagonal"])
@pytest.mark.parametrize("index", range(len(PROBLEMS)), ids=PROBLEM_IDS)
def test_an_inverse_from_given_kernel_blocks_is_the_same_to_the_bit(
    index: int, tridiagonal: bool
) -> None:
    stats = _fixture(index)[0]
    approx = BlockTridiagonalNaturalGradient() if tridiagonal else ExactNaturalGradient()
    approx.update(stats)
    names = list(approx.layers)
    # As two ranks would: each computes the blocks of its layers; every rank gets all.
    grams = {**approx.grams(names[::2]), **approx.grams(names[1::2])}
    assert set(grams) == set(names)
    m = approx.num_rows
    assert all(g.shape == (m, m) for g in grams.values())
    vectors = _random_vectors(stats, seed=3)
    expected = approx.inverse(DAMPING).apply(vectors)
    given = approx.inverse(DAMPING, grams=grams)
    actual = given.apply(vectors)
    for name in names:
        assert torch.equal(actual[name], expected[name]), name
    # Built from the given blocks: a changed block changes the inverse.
    changed = {**grams, names[0]: 2.0 * grams[names[0]]}
    moved = approx.inverse(DAMPING, grams=changed).apply(vectors)
    assert not torch.equal(moved[names[0]], expected[names[0]])


def test_kernel_blocks_that_are_missing_misshapen_or_not_finite_are_refused() -> None:
    approx = _exact(_fixture(0)[0])
    grams = approx.grams(approx.layers)
    first, *_ = approx.layers
    with pytest.raises(ValueError, match="exactly the layers"):
        approx.inverse(DAMPING, grams={first: grams[first]})
    with pytest.raises(ValueError, match="wrong size"):
        approx.inverse(DAMPING, grams={**grams, first: grams[first][1:]})
    with pytest.raises(OwnerFailedError, match=rf"\['{first}'\] are not finite"):
        approx.inverse(DAMPING, grams={**grams, first: torch.full_like(grams[first], math.nan)})
    with pytest.raises(KeyError, match="no-such-layer"):
        approx.grams(["no-such-layer"])
    with pytest.raises(RuntimeError, match="update"):
        ExactNaturalGradient().gram_templates()
    with pytest.raises(ValueError, match=r"kernel block, got \(3, 3\)"):
        RowsWithGram(approx.inverse(DAMPING).woodbury.blocks[0], torch.zeros(3, 3))


def test_work_costs_follow_where_each_approximation_spends_its_time() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 5))
    conv, linear = CurvatureExtractor(model, nn.MSELoss()).layout.layers
    assert (conv.in_dim_aug, linear.in_dim_aug) == (19, 13)
    exact = ExactNaturalGradient()
    # Kernel blocks: factored rows for Linear (out + in), per-sample gradients otherwise.
    assert exact.work_cost(linear) == 5 + 13 and exact.work_cost(conv) == 3 * 19
    assert KFAC().work_cost(linear) == 5.0**3 + 13.0**3 == linear.kronecker_cost
    assert Diagonal().work_cost(conv) == 3 * 19
    assert UnitWiseNaturalGradient().work_cost(linear) == 5 * 13.0**3, "a Cholesky per unit"
    assert TwoLevel(Diagonal()).work_cost(conv) == 3 * 19, "the fine level's cost"
    block = BlockNaturalGradient()
    assert block.work_cost(linear) == 5 + 13, "no rows yet"
    x, loss_fn = torch.randn(7, 2, 4, 4), nn.MSELoss()
    extractor = CurvatureExtractor(
        model, loss_fn, stats=block.required_stats, fisher_type=FisherType.EMPIRICAL
    )
    with extractor.collect():
        loss_fn(model(x), torch.zeros(7, 5)).backward()
    block.update(extractor.statistics())
    # Each layer's block and its own m x m Cholesky factor (m = 7 rows), in units of m^2.
    assert block.work_cost(linear) == 5 + 13 + 7 and block.work_cost(conv) == 3 * 19 + 7
