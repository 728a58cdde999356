r"""KFAC's ``SQRT`` damping and the per-position damping of convolutions, by formula.

``SQRT`` damps both factors by $\sqrt\lambda$: $(G + \sqrt\lambda I)\otimes(A +
\sqrt\lambda I)$. ``ConvDamping.PER_POSITION`` is the KPSVD papers' K-FAC code:
the input factor averaged over the $T$ output positions, $\lambda/T$ split as
$\sqrt{\lambda/T}$ on each factor, the preconditioned gradient divided by $T$.
The generic checks (``cases.py``) cover the rest of the operator (log-determinant,
sampling, condition number) against ``tests/approx/damping.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from curvlib.approx.kfac import KFAC, ConvDamping, KFACDamping
from curvlib.core.stats import merge_statistics
from tests import problems as P
from tests.approx.cases import fit_statistics

DAMPING = 3e-2
RTOL = 1e-10
"""float64: rounding only."""


def _eye(size: int) -> Tensor:
    return torch.eye(size, dtype=torch.float64)


def _fitted(problem: P.Problem, approx: KFAC) -> KFAC:
    approx.update(fit_statistics(problem, approx))
    return approx


def _close(actual: Tensor, expected: Tensor) -> None:
    err = float((actual - expected).abs().max())
    assert err <= RTOL * float(expected.abs().max()), f"max error {err:.3e}"


def test_sqrt_inverse_is_that_of_both_factors_shifted_by_the_root_of_the_damping() -> None:
    approx = _fitted(P.mlp_ce(), KFAC(KFACDamping.SQRT))
    inverse = approx.inverse(DAMPING)
    root = math.sqrt(DAMPING)
    gen = torch.Generator().manual_seed(0)
    for name, block in approx.blocks.items():
        state = block.state_dict()
        A, G = state["A"], state["G"]
        assert A.dtype == torch.float64
        damped = torch.kron(G + root * _eye(len(G)), A + root * _eye(len(A)))
        _close(approx.damped_to_dense(name, DAMPING), damped)
        mat = torch.randn(block.out_dim, block.in_dim, generator=gen, dtype=torch.float64)
        expected = torch.linalg.solve(damped, mat.reshape(-1)).reshape(mat.shape)
        _close(inverse.apply({name: mat})[name], expected)
        # The unsplit rule differs from the pi-split one wherever pi is not 1.
        pi_damped = KFAC(KFACDamping.PI)
        pi_damped.load_state_dict(approx.state_dict())
        assert not torch.allclose(pi_damped.damped_to_dense(name, DAMPING), damped)


def test_per_position_damping_of_a_convolution_is_the_papers_code() -> None:
    problem = P.cnn_ce()  # Conv2d 7x7 -> 4x4 (T = 16), then a Linear layer (T = 1)
    approx = _fitted(problem, KFAC(KFACDamping.SQRT, conv_damping=ConvDamping.PER_POSITION))
    conv, linear = approx.blocks["0"], approx.blocks["4"]
    assert (conv.positions, linear.positions) == (16, 1)  # type: ignore[attr-defined]
    inverse = approx.inverse(DAMPING)
    gen = torch.Generator().manual_seed(1)
    for name, t in (("0", 16), ("4", 1)):
        state = approx.blocks[name].state_dict()
        A, G = state["A"], state["G"]
        # The reference code: mean input factor, lambda / T on each factor's root,
        # preconditioned gradient divided by T.
        mean_a = A / t
        shift = math.sqrt(DAMPING / t)
        mat = torch.randn(len(G), len(A), generator=gen, dtype=torch.float64)
        g_inv = torch.linalg.inv(G + shift * _eye(len(G)))
        a_inv = torch.linalg.inv(mean_a + shift * _eye(len(A)))
        _close(inverse.apply({name: mat})[name], g_inv @ mat @ a_inv / t)
        # ... which is (G + sqrt(lambda / T) I) x (A + sqrt(lambda T) I) in curvlib's A.
        damped = torch.kron(
            G + math.sqrt(DAMPING / t) * _eye(len(G)), A + math.sqrt(DAMPING * t) * _eye(len(A))
        )
        _close(approx.damped_to_dense(name, DAMPING), damped)
    uniform = KFAC(KFACDamping.SQRT)
    uniform.load_state_dict(approx.state_dict())
    _close(approx.damped_to_dense("4", DAMPING), uniform.damped_to_dense("4", DAMPING))
    assert not torch.allclose(
        approx.damped_to_dense("0", DAMPING), uniform.damped_to_dense("0", DAMPING)
    )


@pytest.mark.parametrize("mode", [KFACDamping.PI, KFACDamping.EIGEN])
def test_per_position_damping_changes_nothing_under_pi_and_eigen(mode: KFACDamping) -> None:
    """As documented: the trace-norm pi and exact damping absorb the 1/T."""
    problem = P.cnn_ce()
    approx = _fitted(problem, KFAC(mode, conv_damping=ConvDamping.PER_POSITION))
    uniform = KFAC(mode)
    uniform.load_state_dict(approx.state_dict())
    state = approx.blocks["0"].state_dict()
    A, G, t = state["A"], state["G"], 16
    if mode is KFACDamping.PI:  # the reference code's pi on (G, A / T) with lambda / T
        pi = math.sqrt((float(torch.trace(A / t)) / len(A)) / (float(torch.trace(G)) / len(G)))
        shift = math.sqrt(DAMPING / t)
        ref = t * torch.kron(G + shift / pi * _eye(len(G)), A / t + pi * shift * _eye(len(A)))
    else:
        ref = t * (torch.kron(G, A / t) + DAMPING / t * _eye(len(G) * len(A)))
    for name in approx.blocks:
        _close(approx.damped_to_dense(name, DAMPING), uniform.damped_to_dense(name, DAMPING))
    _close(approx.damped_to_dense("0", DAMPING), ref)


def test_positions_are_saved_with_the_estimate() -> None:
    approx = _fitted(P.cnn_ce(), KFAC(KFACDamping.SQRT, conv_damping="per_position"))
    restored = KFAC(KFACDamping.SQRT, conv_damping="per_position")
    restored.load_state_dict(approx.state_dict())
    assert restored.blocks["0"].positions == 16  # type: ignore[attr-defined]
    _close(restored.damped_to_dense("0", DAMPING), approx.damped_to_dense("0", DAMPING))


def test_positions_survive_scaling_and_merging_of_statistics() -> None:
    stats = fit_statistics(P.cnn_ce(), KFAC())
    for derived in (stats, stats.scaled(2.0), merge_statistics([stats, stats])):
        kron = [derived[name].kronecker for name in ("0", "4")]
        assert [k.num_positions for k in kron if k is not None] == [16, 1]
