"""Checks every approximation must pass, on an MLP, a CNN and a transposed-conv net (float64)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import Tensor

from curvlib.approx.base import LayerwiseApprox, NonFiniteStatisticsError
from curvlib.core import CurvatureApprox, CurvatureStatistics, Preconditioner
from tests.approx.cases import APPROXIMATIONS, PROBLEMS, ApproxCase, fit_statistics, perturbed
from tests.problems import Problem

RTOL = 1e-9
"""Relative tolerance for float64 identities (rounding only)."""

DAMPING = 1e-2

CASES = [
    pytest.param(case, problem, id=f"{case.name}-{problem.name}")
    for case in APPROXIMATIONS
    for problem in PROBLEMS
]


def _fitted(case: ApproxCase, problem: Problem, steps: int = 2) -> LayerwiseApprox:
    approx = case.make()
    approx.update(fit_statistics(problem, approx))
    if steps > 1:
        approx.update(fit_statistics(perturbed(problem), approx))
    return approx


def _close(actual: Tensor, expected: Tensor, what: str) -> None:
    err = float((actual - expected).abs().max())
    scale = float(expected.abs().max())
    assert err <= RTOL * max(scale, 1e-30), f"{what}: max error {err:.3e}, scale {scale:.3e}"


def _random_matrices(approx: LayerwiseApprox, seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(block.out_dim, block.in_dim, generator=gen, dtype=torch.float64)
        for name, block in approx.blocks.items()
    }


@pytest.mark.parametrize(("case", "problem"), CASES)
def test_protocols(case: ApproxCase, problem: Problem) -> None:
    approx = _fitted(case, problem, steps=1)
    assert isinstance(approx, CurvatureApprox)
    assert isinstance(approx.inverse(DAMPING), Preconditioner)


@pytest.mark.parametrize(("case", "problem"), CASES)
def test_dense_form_is_symmetric_and_matches_matvec(case: ApproxCase, problem: Problem) -> None:
    approx = _fitted(case, problem)
    vectors = _random_matrices(approx)
    products = approx.matvec(vectors)
    for name, mat in vectors.items():
        dense = approx.to_dense(name)
        _close(dense, dense.T, f"symmetry of {name}")
        _close(products[name].flatten(), dense @ mat.flatten(), f"matvec of {name}")
        if case.psd:
            smallest = float(torch.linalg.eigvalsh(dense)[0])
            assert smallest >= -RTOL * float(dense.abs().max()), f"{name}: eigenvalue {smallest}"


@pytest.mark.parametrize(("case", "problem"), CASES)
def test_inverse_inverts_the_documented_damped_operator(case: ApproxCase, problem: Problem) -> None:
    approx = _fitted(case, problem)
    inverse = approx.inverse(DAMPING)
    vectors = _random_matrices(approx, seed=1)
    for name, mat in vectors.items():
        damped = approx.damped_to_dense(name, DAMPING)
        _close(damped, damped.T, f"symmetry of the damped {name}")
        assert float(torch.linalg.eigvalsh(damped)[0]) > 0.0, f"damped {name} is not PD"
        # The damped operator contains lambda * I: what remains is PSD.
        rest = damped - approx.to_dense(name) - DAMPING * torch.eye(damped.shape[0]).double()
        if case.psd:
            assert float(torch.linalg.eigvalsh(rest)[0]) >= -RTOL * float(damped.abs().max())
        applied = inverse.apply({name: (damped @ mat.flatten()).reshape(mat.shape)})[name]
        _close(applied, mat, f"inverse of {name}")


@pytest.mark.parametrize(("case", "problem"), CASES)
def test_state_dict_round_trip(case: ApproxCase, problem: Problem) -> None:
    approx = _fitted(case, problem)
    buffer = io.BytesIO()
    torch.save(approx.state_dict(), buffer)
    buffer.seek(0)
    restored = case.make()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.num_updates == approx.num_updates
    vectors = _random_matrices(approx)
    before = approx.inverse(DAMPING).apply(vectors)
    after = restored.inverse(DAMPING).apply(vectors)
    for name in vectors:
        assert torch.equal(approx.to_dense(name), restored.to_dense(name))
        assert torch.equal(before[name], after[name])
    # The restored estimate keeps averaging exactly like the original.
    stats = fit_statistics(perturbed(problem, 0.5), approx)
    approx.update(stats)
    restored.update(stats)
    for name in vectors:
        assert torch.equal(approx.to_dense(name), restored.to_dense(name))


@pytest.mark.parametrize(("case", "problem"), CASES)
def test_deterministic(case: ApproxCase, problem: Problem) -> None:
    first, second = _fitted(case, problem), _fitted(case, problem)
    for name in first.blocks:
        assert torch.equal(first.to_dense(name), second.to_dense(name))


@pytest.mark.parametrize("case", APPROXIMATIONS, ids=lambda c: c.name)
def test_non_finite_statistics_leave_the_estimate_unchanged(case: ApproxCase) -> None:
    problem = PROBLEMS[0]
    approx = _fitted(case, problem, steps=1)
    before = {name: approx.to_dense(name) for name in approx.blocks}
    stats = fit_statistics(problem, approx)
    name = next(iter(stats.layers))
    _poison(stats, name)
    with pytest.raises(NonFiniteStatisticsError):
        approx.update(stats)
    assert approx.num_updates == 1
    for layer, dense in before.items():
        assert torch.equal(approx.to_dense(layer), dense)


def _poison(stats: CurvatureStatistics, name: str) -> None:
    layer = stats.layers[name]
    for tensor in (
        layer.kronecker and layer.kronecker.G,
        layer.io and layer.io.output_grads,
        layer.grads and layer.grads.grads,
        layer.diagonal,
    ):
        if isinstance(tensor, Tensor):
            tensor.view(-1)[0] = float("nan")


@pytest.mark.parametrize("case", APPROXIMATIONS, ids=lambda c: c.name)
def test_running_average_refreshes_on_every_update(case: ApproxCase) -> None:
    """Regression test against curvature computed only once: every update moves the estimate."""
    problem = PROBLEMS[0]
    approx = case.make()
    previous = None
    for step in range(6):
        approx.update(fit_statistics(perturbed(problem, 0.2 * (step + 1)), approx))
        dense = approx.to_dense("0")
        if previous is not None:
            assert float((dense - previous).norm()) > 1e-6 * float(dense.norm()), step
        previous = dense
    assert approx.num_updates == 6


@pytest.mark.parametrize("case", APPROXIMATIONS, ids=lambda c: c.name)
def test_bad_damping_is_rejected(case: ApproxCase) -> None:
    approx = _fitted(case, PROBLEMS[0], steps=1)
    with pytest.raises(ValueError, match="damping must be positive"):
        approx.inverse(0.0)


@pytest.mark.parametrize("case", APPROXIMATIONS, ids=lambda c: c.name)
def test_a_failing_block_update_leaves_every_layer_unchanged(
    case: ApproxCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    problem = PROBLEMS[0]
    approx = _fitted(case, problem, steps=1)
    before = {name: approx.to_dense(name) for name in approx.blocks}
    stats = fit_statistics(perturbed(problem), approx)
    last = list(stats.layers)[-1]
    block = approx.blocks[last]

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("planted failure")

    monkeypatch.setattr(block, "update", broken)
    with pytest.raises(RuntimeError, match="planted failure"):
        approx.update(stats)
    assert approx.num_updates == 1
    for name, dense in before.items():  # the layers updated before the failure are restored
        assert torch.equal(approx.to_dense(name), dense), name


@pytest.mark.parametrize(("case", "problem"), CASES)
def test_snapshot_keeps_the_estimate_through_later_updates(
    case: ApproxCase, problem: Problem
) -> None:
    approx = _fitted(case, problem)
    expected = approx.state_dict()
    kept = approx.snapshot()
    approx.update(fit_statistics(perturbed(problem, 0.5), approx))
    refresh = getattr(approx, "refresh", None)
    if callable(refresh):
        refresh()
        approx.update(fit_statistics(perturbed(problem, 0.7), approx))
    restored = case.make()
    restored.load_state_dict(kept())
    original = case.make()
    original.load_state_dict(expected)
    assert restored.num_updates == original.num_updates
    for name in approx.blocks:
        assert torch.equal(restored.to_dense(name), original.to_dense(name)), name
        assert not torch.equal(approx.to_dense(name), original.to_dense(name)), name


@pytest.mark.parametrize(("case", "problem"), CASES)
def test_blocks_factorised_concurrently_give_the_sequential_inverse(
    case: ApproxCase, problem: Problem
) -> None:
    approx = _fitted(case, problem)
    vectors = _random_matrices(approx)
    approx.workers = 1
    sequential = approx.inverse(DAMPING).apply(vectors)
    approx.workers = 3
    concurrent = approx.inverse(DAMPING).apply(vectors)
    for name in vectors:
        _close(concurrent[name], sequential[name], name)
