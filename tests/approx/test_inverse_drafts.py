"""Inverses built with one host read equal those built block by block with their checks.

``LayerwiseApprox.inverse`` takes each block's ``draft_inverse`` (and EKFAC's
``refresh`` each block's ``draft_refresh``), reads the numbers of all of them
at once and finishes them; a block's checked ``inverse`` (``refresh``) reads
its numbers one at a time. Where the first factorisation succeeds, the two must
agree to the bit; where it fails, the checked path must take over.
"""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch

from curvlib.approx import EKFAC, KFAC, KPSVD, Diagonal
from curvlib.approx import base as base_module
from curvlib.approx import ekfac as ekfac_module
from curvlib.approx import kfac as kfac_module
from curvlib.approx.base import LayerwiseApprox
from curvlib.approx.kfac import KFACDamping
from curvlib.core import RefreshableApprox
from curvlib.linalg import factors as linalg_factors
from tests.approx.cases import PROBLEMS, fit_statistics, perturbed
from tests.dead_units import decoupled_from_the_first_dead_row

DAMPING = 1e-3
APPROXES: dict[str, Callable[[torch.dtype], LayerwiseApprox]] = {
    "kfac-pi": lambda dtype: KFAC(dtype=dtype),
    "kfac-sqrt": lambda dtype: KFAC(damping_mode=KFACDamping.SQRT, dtype=dtype),
    "kpsvd": lambda dtype: KPSVD(dtype=dtype),
    "ekfac": lambda dtype: EKFAC(dtype=dtype),
    "diagonal": lambda dtype: Diagonal(dtype=dtype),
}


def _fitted(name: str, problem_index: int, dtype: torch.dtype) -> LayerwiseApprox:
    problem = PROBLEMS[problem_index]
    approx = APPROXES[name](dtype)
    approx.update(fit_statistics(problem, approx))
    if isinstance(approx, RefreshableApprox):
        approx.refresh()
    approx.update(fit_statistics(perturbed(problem), approx))
    return approx


def _ekfac_with_two_updates(problem: int = 0, dtype: torch.dtype | None = None) -> EKFAC:
    """EKFAC after two updates (its factors changed since the first basis: a refresh is due)."""
    approx = EKFAC(dtype=dtype)
    approx.update(fit_statistics(PROBLEMS[problem], approx))
    approx.update(fit_statistics(perturbed(PROBLEMS[problem]), approx))
    return approx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("problem", range(len(PROBLEMS)), ids=[p.name for p in PROBLEMS])
@pytest.mark.parametrize("name", APPROXES)
def test_the_drafted_preconditioner_equals_the_checked_blocks(
    name: str, problem: int, dtype: torch.dtype
) -> None:
    approx = _fitted(name, problem, dtype)
    precond = approx.inverse(DAMPING)
    gen = torch.Generator().manual_seed(0)
    for layer, block in approx._blocks.items():
        checked = block.inverse(DAMPING)
        mat = torch.randn(block.out_dim, block.in_dim, generator=gen, dtype=dtype)
        assert torch.equal(precond.apply({layer: mat})[layer], checked(mat)), layer
        assert precond.condition_numbers[layer] == block.condition_number(DAMPING), layer


@pytest.mark.parametrize("problem", range(len(PROBLEMS)), ids=[p.name for p in PROBLEMS])
def test_the_drafted_ekfac_refresh_equals_the_checked_one(problem: int) -> None:
    approx = _ekfac_with_two_updates(problem, torch.float32)
    checked = copy.deepcopy(approx)
    approx.refresh()  # drafted: one read for every layer
    for block in checked._blocks.values():
        block.refresh()  # type: ignore[attr-defined]
    for layer, block in approx._blocks.items():
        other = checked._blocks[layer]
        assert block.pending is not None and other.pending is not None  # type: ignore[attr-defined]
        for mine, theirs in zip(block.pending, other.pending, strict=True):  # type: ignore[attr-defined]
            assert torch.equal(mine, theirs), layer


def test_a_first_cholesky_that_fails_is_retried_with_jitter() -> None:
    approx = KFAC(damping_mode=KFACDamping.SQRT)
    approx.update(fit_statistics(PROBLEMS[0], approx))
    layer, block = next(iter(approx._blocks.items()))
    A = block.A  # type: ignore[attr-defined]
    assert A is not None and A.dtype == torch.float64
    m = A.shape[0]
    # Indefinite by 1e-13 of the mean eigenvalue: too much for the shift sqrt(1e-30)
    # alone, little enough for damped_cholesky's third jitter.
    lowest = torch.linalg.eigvalsh(A)[0]
    block.A = A - (lowest + 1e-13 * A.trace() / m) * torch.eye(m, dtype=A.dtype)  # type: ignore[attr-defined]
    draft = block.draft_inverse(1e-30)
    assert draft is not None and draft.read() is None
    precond = approx.inverse(1e-30)
    checked = block.inverse(1e-30)
    mat = torch.randn(block.out_dim, block.in_dim, dtype=A.dtype)
    assert torch.equal(precond.apply({layer: mat})[layer], checked(mat))
    assert precond.condition_numbers[layer] == checked.condition_number  # type: ignore[attr-defined]


def test_the_drafted_inverse_flushes_each_factor_at_its_own_limit() -> None:
    approx = KFAC(dtype=torch.float32)
    approx.update(fit_statistics(PROBLEMS[0], approx))
    layer, block = next(iter(approx._blocks.items()))
    G, A = block.G, block.A  # type: ignore[attr-defined]
    assert G is not None and A is not None
    # Off-diagonal entries of G' far below eps of its diagonal, and one pair far above:
    # G''s inverse has entries at or below its flush limit and one pair between that
    # limit and A''s (A is scaled by 1e-6, which lifts its inverse's limit far above).
    n = G.shape[0]
    coupling = 1e-9 * (1 - torch.eye(n))
    coupling[0, 1] = coupling[1, 0] = 1e-3
    block.G = torch.diag(G.diagonal() + 1.0) + coupling  # type: ignore[attr-defined]
    block.A = 1e-6 * A  # type: ignore[attr-defined]
    precond = approx.inverse(DAMPING)
    checked = block.inverse(DAMPING)
    drafted = precond._inverses[layer]
    assert int((checked.g_inv == 0).sum()) == n * (n - 1) - 2  # type: ignore[attr-defined]
    assert torch.equal(drafted.g_inv, checked.g_inv)  # type: ignore[attr-defined]
    assert torch.equal(drafted.a_inv, checked.a_inv)  # type: ignore[attr-defined]


def test_a_drafted_eigenbasis_with_non_finite_eigenvalues_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    approx = _ekfac_with_two_updates()
    real = torch.linalg.eigh
    calls = {"n": 0}

    def first_nan(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, vectors = real(mat)
        calls["n"] += 1
        if calls["n"] == 1:  # one factor's first attempt: NaN eigenvalues, no error
            values = torch.full_like(values, torch.nan)
        return values, vectors

    monkeypatch.setattr(torch.linalg, "eigh", first_nan)
    approx.refresh()
    assert calls["n"] > 2 * len(approx._blocks)  # the failed draft was retried
    for layer, block in approx._blocks.items():
        assert block.pending is not None, layer  # type: ignore[attr-defined]
        assert all(bool(p.isfinite().all()) for p in block.pending), layer  # type: ignore[attr-defined]


def test_an_eigh_that_does_not_converge_is_retried_once_with_jitter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    approx = _ekfac_with_two_updates()
    checked = copy.deepcopy(approx)
    real = torch.linalg.eigh
    calls: list[int] = []
    fail = {"left": 0}

    def flaky(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(mat.shape[-1])
        if mat.shape[-1] == 3 and fail["left"]:  # the last layer's G: its first attempt
            fail["left"] -= 1
            raise torch.linalg.LinAlgError("planted: no convergence")
        return real(mat)  # type: ignore[no-any-return]

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    fail["left"] = 1
    approx.refresh()
    # One call per factor and one jittered retry: the failed attempt is not made twice.
    assert len(calls) == 2 * len(approx._blocks) + 1
    fail["left"] = 1
    for block in checked._blocks.values():
        block.refresh()  # type: ignore[attr-defined]
    for layer, block in approx._blocks.items():
        for mine, theirs in zip(block.pending, checked._blocks[layer].pending, strict=True):  # type: ignore[attr-defined]
            assert torch.equal(mine, theirs), layer


# -- inverses built ahead of their checks (``inverse_ahead``) -------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("problem", range(len(PROBLEMS)), ids=[p.name for p in PROBLEMS])
@pytest.mark.parametrize("name", APPROXES)
def test_the_preconditioner_built_ahead_equals_the_drafted_one(
    name: str, problem: int, dtype: torch.dtype
) -> None:
    approx = _fitted(name, problem, dtype)
    ahead = approx.inverse_ahead(DAMPING)
    assert ahead is not None
    assert ahead.numbers.dtype == torch.float64 and ahead.numbers.dim() == 1
    assert ahead.settle(ahead.numbers.tolist())
    precond = approx.inverse(DAMPING)
    gen = torch.Generator().manual_seed(0)
    for layer, block in approx._blocks.items():
        mat = torch.randn(block.out_dim, block.in_dim, generator=gen, dtype=dtype)
        expected = precond.apply({layer: mat})[layer]
        assert torch.equal(ahead.preconditioner.apply({layer: mat})[layer], expected), layer
    assert ahead.preconditioner.condition_numbers == precond.condition_numbers


def test_a_preconditioner_built_ahead_knows_no_condition_numbers_before_it_is_settled() -> None:
    approx = _fitted("kfac-pi", 0, torch.float64)
    ahead = approx.inverse_ahead(DAMPING)
    assert ahead is not None
    assert all(math.isnan(v) for v in ahead.preconditioner.condition_numbers.values())


def test_a_failed_cholesky_refuses_the_preconditioner_built_ahead() -> None:
    approx = KFAC(damping_mode=KFACDamping.SQRT)
    approx.update(fit_statistics(PROBLEMS[0], approx))
    _, block = next(iter(approx._blocks.items()))
    A = block.A  # type: ignore[attr-defined]
    m = A.shape[0]
    lowest = torch.linalg.eigvalsh(A)[0]
    block.A = A - (lowest + 1e-13 * A.trace() / m) * torch.eye(m, dtype=A.dtype)  # type: ignore[attr-defined]
    ahead = approx.inverse_ahead(1e-30)
    assert ahead is not None
    assert not ahead.settle(ahead.numbers.tolist())


def test_the_inverse_built_ahead_flushes_each_factor_at_its_own_limit() -> None:
    approx = KFAC(dtype=torch.float32)
    approx.update(fit_statistics(PROBLEMS[0], approx))
    layer, block = next(iter(approx._blocks.items()))
    G, A = block.G, block.A  # type: ignore[attr-defined]
    n = G.shape[0]
    coupling = 1e-9 * (1 - torch.eye(n))
    coupling[0, 1] = coupling[1, 0] = 1e-3
    block.G = torch.diag(G.diagonal() + 1.0) + coupling  # type: ignore[attr-defined]
    block.A = 1e-6 * A  # type: ignore[attr-defined]
    ahead = approx.inverse_ahead(DAMPING)
    assert ahead is not None and ahead.settle(ahead.numbers.tolist())
    checked = block.inverse(DAMPING)
    built = ahead.preconditioner._inverses[layer]
    assert int((built.g_inv == 0).sum()) == n * (n - 1) - 2  # type: ignore[attr-defined]
    assert torch.equal(built.g_inv, checked.g_inv)  # type: ignore[attr-defined]
    assert torch.equal(built.a_inv, checked.a_inv)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["kfac-pi", "ekfac"])
def test_an_apply_dtype_chosen_by_the_condition_number_is_not_built_ahead(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    approx = _fitted(name, 0, torch.float32)
    module = kfac_module if name == "kfac-pi" else ekfac_module
    monkeypatch.setattr(module, "resolve_apply_dtype", _bfloat16_below_1e3)
    for block in approx._blocks.values():
        block.apply_dtype = "auto"  # type: ignore[attr-defined]
    assert approx.inverse_ahead(DAMPING) is None
    for block in approx._blocks.values():
        block.apply_dtype = torch.bfloat16  # type: ignore[attr-defined]  # fixed: no dependence
    assert approx.inverse_ahead(DAMPING) is not None


def _bfloat16_below_1e3(
    choice: object,
    dtype: torch.dtype,
    device: torch.device,
    cost: float,
    *,
    condition: float,
    eigenbasis: bool = False,
) -> torch.dtype:
    if choice != "auto":
        assert isinstance(choice, torch.dtype)
        return choice
    return torch.bfloat16 if condition <= 1e3 else dtype


def _kill(mat: torch.Tensor, dead: list[int]) -> torch.Tensor:
    """A copy of ``mat`` with the rows and columns ``dead`` zero (dead units)."""
    mat = mat.clone()
    mat[dead] = 0.0
    mat[:, dead] = 0.0
    return mat


@pytest.mark.parametrize("name", ["kfac-pi", "kpsvd", "ekfac"])
def test_the_factorisations_are_scheduled_by_their_live_sizes(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block whose dead coordinates are decoupled costs the cube of its live ones.

    Scheduled by its shape instead, a layer with mostly dead inputs (a convolution
    over a small image, whose kernel reaches mostly padding) would get a thread of
    its own while a larger one ran alone on another.
    """
    approx = _fitted(name, 0, torch.float64)
    live_sizes = {}
    for layer, block in approx._blocks.items():
        block.A = _kill(block.A, [0, block.in_dim - 1])
        block.G = _kill(block.G, [1] if block.out_dim > 2 else [])
        live_sizes[layer] = [int(f.ne(0).any(-1).sum()) for f in (block.G, block.A)]
    scheduled: list[dict[str, float]] = []
    run_jobs = base_module.run_jobs

    def recorded(jobs: Any, costs: Any, workers: int) -> Any:
        scheduled.append(dict(costs))
        return run_jobs(jobs, costs, workers)

    monkeypatch.setattr(base_module, "run_jobs", recorded)
    with decoupled_from_the_first_dead_row():
        if isinstance(approx, RefreshableApprox):
            approx.refresh()
        approx.inverse(DAMPING)
    want = {layer: float(g**3 + a**3) for layer, (g, a) in live_sizes.items()}
    assert scheduled and all(costs == want for costs in scheduled), scheduled
    shapes = {layer: float(b.out_dim**3 + b.in_dim**3) for layer, b in approx._blocks.items()}
    assert all(want[layer] < shapes[layer] for layer in want)
    scheduled.clear()
    approx.inverse(DAMPING)  # the sizes' thresholds kept: small factors are factorised whole
    assert scheduled and all(costs == shapes for costs in scheduled)


def _dense_damped_solve(block: object, mat: torch.Tensor) -> torch.Tensor:
    r"""$(G + \gamma_G I)^{-1} X (A + \gamma_A I)^{-1}$ by dense solves, float64."""
    gamma_a, gamma_g = block._shifts(DAMPING)  # type: ignore[attr-defined]
    eye_g = torch.eye(mat.shape[0], dtype=torch.float64)
    eye_a = torch.eye(mat.shape[1], dtype=torch.float64)
    want = torch.linalg.solve(block.G + gamma_g * eye_g, mat)  # type: ignore[attr-defined]
    return torch.linalg.solve(block.A + gamma_a * eye_a, want.T).T  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["kfac-pi", "kfac-sqrt", "kpsvd"])
def test_dead_coordinates_are_factorised_apart_to_the_same_inverse(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Zero rows of a factor are decoupled: only the others are inverted.

    Drafted and checked inverses agree to the bit, and both are the dense damped
    Kronecker inverse.
    """
    approx = _fitted(name, 0, torch.float64)
    expected_sizes = []
    for block in approx._blocks.values():
        block.A = _kill(block.A, [0, block.in_dim - 1])  # e.g. a pixel and a dead unit
        block.G = _kill(block.G, [1] if block.out_dim > 2 else [])
        expected_sizes += [int(f.ne(0).any(-1).sum()) for f in (block.G, block.A)]
    sizes: list[int] = []
    inverse = kfac_module.cholesky_inverse

    def counted(chol: torch.Tensor) -> torch.Tensor:
        sizes.append(chol.shape[-1])
        return inverse(chol)

    monkeypatch.setattr(kfac_module, "cholesky_inverse", counted)
    with decoupled_from_the_first_dead_row():
        precond = approx.inverse(DAMPING)
        checked = {layer: block.inverse(DAMPING) for layer, block in approx._blocks.items()}
        assert sizes == 2 * expected_sizes  # the drafted inverses, then the checked ones
        conditions = {layer: b.condition_number(DAMPING) for layer, b in approx._blocks.items()}
    assert sum(expected_sizes) < sum(b.out_dim + b.in_dim for b in approx._blocks.values())
    gen = torch.Generator().manual_seed(0)
    for layer, block in approx._blocks.items():
        mat = torch.randn(block.out_dim, block.in_dim, generator=gen, dtype=torch.float64)
        got = precond.apply({layer: mat})[layer]
        assert torch.equal(got, checked[layer](mat)), layer
        torch.testing.assert_close(got, _dense_damped_solve(block, mat), rtol=1e-10, atol=1e-12)
        assert precond.condition_numbers[layer] == conditions[layer], layer


def _blocked_factor(size: int, seed: int) -> torch.Tensor:
    """A PSD ``[size, size]`` factor whose coordinates but the last form blocks of two or one."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for start in range(0, size - 1, 2):
        group = list(range(start, min(start + 2, size - 1)))
        x = torch.zeros(4, size, dtype=torch.float64)
        x[:, group] = torch.randn(4, len(group), generator=gen, dtype=torch.float64)
        x[:, -1] = 1.0
        rows.append(x)
    x = torch.cat(rows)
    return x.T @ x / len(x)


@pytest.mark.parametrize("name", ["kfac-pi", "kfac-sqrt", "kpsvd"])
def test_independent_blocks_of_the_input_factor_are_inverted_apart(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input factor block diagonal up to its last coordinate is inverted block by block.

    As a transposed convolution's is. Drafted and checked to the bit, both the dense
    damped Kronecker inverse, with the same condition numbers.
    """
    monkeypatch.setattr(linalg_factors, "MIN_BLOCKWISE_SIZE", 1)
    approx = _fitted(name, 0, torch.float64)
    for seed, block in enumerate(approx._blocks.values()):
        block.A = _blocked_factor(block.in_dim, seed)
    calls: list[int] = []
    blockwise = kfac_module.blockwise_damped_inverse

    def counted(mat: torch.Tensor, shift: object, blocks: list[torch.Tensor]) -> object:
        calls.append(mat.shape[-1])
        return blockwise(mat, shift, blocks)  # type: ignore[arg-type]

    monkeypatch.setattr(kfac_module, "blockwise_damped_inverse", counted)
    precond = approx.inverse(DAMPING)
    checked = {layer: block.inverse(DAMPING) for layer, block in approx._blocks.items()}
    assert calls == 2 * [b.in_dim for b in approx._blocks.values()]  # drafted, then checked
    gen = torch.Generator().manual_seed(0)
    for layer, block in approx._blocks.items():
        mat = torch.randn(block.out_dim, block.in_dim, generator=gen, dtype=torch.float64)
        got = precond.apply({layer: mat})[layer]
        assert torch.equal(got, checked[layer](mat)), layer
        assert precond.condition_numbers[layer] == block.condition_number(DAMPING), layer
        torch.testing.assert_close(got, _dense_damped_solve(block, mat), rtol=1e-10, atol=1e-12)


def test_a_failed_block_leaves_the_input_factor_to_the_dense_factorisation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(linalg_factors, "MIN_BLOCKWISE_SIZE", 1)
    approx = _fitted("kfac-pi", 0, torch.float64)
    for seed, block in enumerate(approx._blocks.values()):
        block.A = _blocked_factor(block.in_dim, seed)
    want = {layer: block.inverse(DAMPING) for layer, block in approx._blocks.items()}
    blockwise = kfac_module.blockwise_damped_inverse

    def failing(mat: torch.Tensor, shift: object, blocks: list[torch.Tensor]) -> object:
        inverse, least, _ = blockwise(mat, shift, blocks)  # type: ignore[arg-type]
        return inverse.fill_(float("nan")), least, torch.tensor(True)

    monkeypatch.setattr(kfac_module, "blockwise_damped_inverse", failing)
    precond = approx.inverse(DAMPING)
    gen = torch.Generator().manual_seed(1)
    for layer, block in approx._blocks.items():
        mat = torch.randn(block.out_dim, block.in_dim, generator=gen, dtype=torch.float64)
        got = precond.apply({layer: mat})[layer]
        assert bool(got.isfinite().all())
        torch.testing.assert_close(got, want[layer](mat), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["kfac-pi", "kpsvd"])
def test_a_fitted_approximation_pickles_after_its_inverse(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blocks' cache of ``A``'s groups (a weak reference) stays out of the pickle."""
    monkeypatch.setattr(linalg_factors, "MIN_BLOCKWISE_SIZE", 1)
    approx = _fitted(name, 0, torch.float64)
    for seed, block in enumerate(approx._blocks.values()):
        block.A = _blocked_factor(block.in_dim, seed)
    before = approx.inverse(DAMPING)
    loaded = pickle.loads(pickle.dumps(approx))
    after = loaded.inverse(DAMPING)
    gen = torch.Generator().manual_seed(2)
    for layer, block in approx._blocks.items():
        mat = torch.randn(block.out_dim, block.in_dim, generator=gen, dtype=torch.float64)
        assert torch.equal(after.apply({layer: mat})[layer], before.apply({layer: mat})[layer])
