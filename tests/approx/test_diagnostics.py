"""The diagnostics measure what they say: exact blocks and errors against dense references."""

from __future__ import annotations

import pytest
import torch

from curvlib.approx.diagnostics import approximation_errors, block_error, exact_block
from curvlib.approx.kfac import KFAC
from curvlib.core import FisherType, StatKind
from curvlib.extract import CurvatureExtractor
from tests import oracle
from tests import problems as P


def test_exact_block_equals_the_dense_oracle() -> None:
    problem = P.cnn_ce()
    model = problem.model()
    ex = CurvatureExtractor(
        model, problem.loss_fn, stats={StatKind.PER_SAMPLE_IO}, fisher_type=FisherType.EXACT
    )
    with ex.collect():
        problem.loss_fn(model(problem.x), problem.y).backward()
    dense = oracle.dense_ggn(problem.model(), problem.loss_fn, problem.x, problem.y)
    for name, stats in ex.statistics().layers.items():
        expected = oracle.block(dense, problem.model(), name)
        torch.testing.assert_close(exact_block(stats), expected, rtol=1e-10, atol=1e-12)


def test_block_error_values() -> None:
    exact = torch.diag(torch.tensor([4.0, 3.0], dtype=torch.float64))
    rotated = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    err = block_error(exact, rotated)
    assert err.frobenius == pytest.approx(2**0.5 / 5)
    assert err.spectrum == pytest.approx(0.0, abs=1e-15)  # same eigenvalues
    assert block_error(exact, exact).frobenius == 0.0


def _kfac_errors(n: int) -> float:
    problem = P.mlp_ce(n=n)
    model = problem.model()
    ex = CurvatureExtractor(
        model,
        problem.loss_fn,
        stats={StatKind.KRONECKER, StatKind.PER_SAMPLE_IO},
        fisher_type=FisherType.EXACT,
    )
    with ex.collect():
        problem.loss_fn(model(problem.x), problem.y).backward()
    approx = KFAC()
    approx.update(ex.statistics())
    errors = approximation_errors(approx, ex.statistics())
    assert set(errors) == {"0", "2", "4"}
    return max(e.frobenius for e in errors.values())


def test_kfac_is_exact_for_one_sample_and_inexact_for_many() -> None:
    assert _kfac_errors(1) < 1e-12
    assert _kfac_errors(6) > 1e-3
