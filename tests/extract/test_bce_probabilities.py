r"""``BCELoss`` on probabilities: the statistics against dense references.

The Hessian of ``BCELoss`` with respect to the probabilities $p$,
$y/p^2 + (1-y)/(1-p)^2$, is linear in the target $y$. Its expectation under
$y \sim \operatorname{Bernoulli}(p)$, the Fisher $1/(p(1-p))$ that ``EXACT``
and ``MC`` estimate, is therefore the Hessian at the soft target $y = p$: the
oracle's GGN with the targets replaced by the model's own outputs
(``fisher_targets``) is the Fisher, computed by ``torch.func`` through torch's
own double backward, independently of curvlib's formula. ``EMPIRICAL`` uses the
data targets and is checked against ``torch.func`` per-sample gradients.

At a saturated output ($p$ exactly 0 or 1) torch clamps the logarithms at $-100$
and divides its gradient by $\max(p(1-p), \epsilon)$; the columns must be
torch's gradient there and stay finite (``test_saturated_*``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.func import hessian

from curvlib.core import FisherType
from curvlib.extract import Backend, CurvatureExtractor
from curvlib.extract.losses import BCE_EPSILON, LossCurvature
from curvlib.extract.residual import sample_space_residual
from tests import oracle
from tests import problems as P
from tests.extract.test_oracle import (
    DIFFERENT,
    assert_close,
    every_layer,
    extract,
    oracle_grad_matrices,
    rel_err,
    sample_block,
)
from tests.problems import Problem

PROBLEMS = [
    P.autoencoder_sigmoid_bce(),
    P.autoencoder_sigmoid_bce().with_loss(nn.BCELoss(reduction="sum")),
]

CASES = [
    pytest.param(p, b, id=f"{p.name}-{b.value}")
    for p in PROBLEMS
    for b in (Backend.BACKPACK, Backend.AUTOGRAD)
]

BACKENDS = pytest.mark.parametrize(
    "backend", [Backend.BACKPACK, Backend.AUTOGRAD], ids=lambda b: b.value
)


def fisher_targets(problem: Problem, model: nn.Module) -> Tensor:
    """The model's own probabilities: targets at which the Hessian is the Fisher."""
    with torch.no_grad():
        return model(problem.x)


def _homogeneous(inputs: Tensor) -> Tensor:
    return torch.cat([inputs, torch.ones_like(inputs[:, :1])], dim=1)


@pytest.mark.parametrize(("problem", "backend"), CASES)
def test_exact_layer_blocks_are_the_bernoulli_fisher(problem: Problem, backend: Backend) -> None:
    model = problem.model()
    stats = extract(problem, model, backend, FisherType.EXACT)
    fisher = oracle.dense_ggn(model, problem.loss_fn, problem.x, fisher_targets(problem, model))
    # Discriminating: the GGN at the data targets is another matrix.
    data_ggn = oracle.dense_ggn(model, problem.loss_fn, problem.x, problem.y)
    assert rel_err(data_ggn, fisher) > DIFFERENT
    for name, layer in every_layer(stats, model):
        assert layer.grads is not None
        assert layer.grads.grads.shape[0] == problem.entries
        expected = oracle.block(fisher, model, name)
        assert_close(sample_block(layer.grads.grads), expected, what=f"block of {name!r}")


@pytest.mark.parametrize(("problem", "backend"), CASES)
def test_exact_kronecker_factors_match_the_oracle(problem: Problem, backend: Backend) -> None:
    model = problem.model()
    stats = extract(problem, model, backend, FisherType.EXACT)
    targets = fisher_targets(problem, model)
    inputs = oracle.layer_inputs(model, problem.x)
    for name, layer in every_layer(stats, model):
        assert layer.kronecker is not None
        a = _homogeneous(inputs[name])
        assert_close(layer.kronecker.A, a.T @ a / problem.n, what=f"A of {name!r}")
        blocks = oracle.layer_output_ggn(model, problem.loss_fn, problem.x, targets, name)
        g = blocks[:, 0, :, 0, :].mean(0)  # Linear layers: one position
        assert_close(layer.kronecker.G, g, what=f"G of {name!r}")


@pytest.mark.parametrize(("problem", "backend"), CASES)
def test_empirical_statistics_are_the_per_sample_gradients(
    problem: Problem, backend: Backend
) -> None:
    model = problem.model()
    stats = extract(problem, model, backend, FisherType.EMPIRICAL)
    expected = oracle_grad_matrices(problem, model)
    dense = oracle.dense_empirical_fisher(model, problem.loss_fn, problem.x, problem.y)
    for name, layer in every_layer(stats, model):
        assert layer.grads is not None
        assert_close(layer.grads.grads[0], expected[name], what=f"per-sample grads of {name!r}")
        assert_close(sample_block(layer.grads.grads), oracle.block(dense, model, name), what=name)


# -- saturated outputs: torch's clamp ----------------------------------------------------


SATURATED = torch.tensor(
    [[0.0, 1.0, 1e-13, 0.3], [1.0 - 1e-13, 0.7, 0.0, 1.0]], dtype=torch.float64
)
"""Probabilities at and next to the clamp of torch's backward."""


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_saturated_empirical_columns_are_torchs_gradient(
    reduction: str, dtype: torch.dtype
) -> None:
    probs = SATURATED.to(dtype)
    target = torch.tensor([[1.0, 0.0, 1.0, 0.2], [0.0, 0.5, 0.0, 1.0]], dtype=dtype)
    loss_fn = nn.BCELoss(reduction=reduction)
    leaf = probs.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(leaf, target), leaf)
    curvature = LossCurvature(loss_fn)
    cols = curvature.hessian_columns(probs, target, FisherType.EMPIRICAL)
    expected = grad * curvature.batch_to_sample(probs.shape[0])
    assert bool(cols.isfinite().all())
    # Entry-wise: the clamped entries are 1e12 times larger than the others.
    rtol = 1e-6 if dtype is torch.float32 else 1e-14
    torch.testing.assert_close(cols[0], expected, rtol=rtol, atol=0.0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_saturated_exact_and_mc_columns_are_finite_and_clamped(reduction: str) -> None:
    loss_fn = nn.BCELoss(reduction=reduction)
    curvature = LossCurvature(loss_fn)
    c = curvature.sample_scale(SATURATED)
    var = (SATURATED * (1 - SATURATED)).clamp(min=BCE_EPSILON)
    exact = curvature.hessian_columns(SATURATED, SATURATED, FisherType.EXACT)
    assert exact.shape == (4, *SATURATED.shape)
    diagonal = exact.diagonal(dim1=0, dim2=2)  # [N, D]: entry k of column k
    torch.testing.assert_close(diagonal, (c / var).sqrt(), rtol=1e-14, atol=0.0)
    assert float(exact.square().sum()) == pytest.approx(float((c / var).sum()), rel=1e-12)
    gen = torch.Generator().manual_seed(0)
    mc = curvature.hessian_columns(
        SATURATED, SATURATED, FisherType.MC, mc_samples=50, generator=gen
    )
    assert bool(mc.isfinite().all())
    # p exactly 0 or 1: the draw equals p, so the sampled loss has zero gradient.
    exactly = (SATURATED == 0) | (SATURATED == 1)
    assert bool((mc[:, exactly] == 0).all())
    # Elsewhere the column is (p - y~) / v times sqrt(c / K), with y~ in {0, 1}.
    scaled = mc * math.sqrt(50 / c) * var
    draws = SATURATED - scaled
    assert bool(((draws - draws.round()).abs() < 1e-9).all())


@BACKENDS
def test_saturated_outputs_give_finite_statistics(backend: Backend) -> None:
    problem = P.autoencoder_sigmoid_bce()
    model = problem.model()
    with torch.no_grad():  # saturate four outputs: sigmoid(+-1000) is exactly 1 and 0
        model[4].bias[:4] = torch.tensor([1000.0, -1000.0, 1000.0, -1000.0])
    assert bool((model(problem.x)[:, :4] == torch.tensor([1.0, 0.0, 1.0, 0.0])).all())
    saturated = problem.with_loss(problem.loss_fn, problem.y.clone())
    saturated.y[:, :4] = torch.tensor([0.0, 1.0, 0.3, 0.9])
    for fisher in FisherType:
        stats = extract(saturated, model, backend, fisher, mc_samples=3)
        for name, layer in every_layer(stats, model):
            assert layer.kronecker is not None and layer.grads is not None
            assert bool(layer.kronecker.G.isfinite().all()), f"{fisher} G of {name!r}"
            assert bool(layer.grads.grads.isfinite().all()), f"{fisher} grads of {name!r}"
    stats = extract(saturated, model, backend, FisherType.EMPIRICAL)
    expected = oracle_grad_matrices(saturated, model)
    for name, layer in every_layer(stats, model):
        assert layer.grads is not None
        assert_close(layer.grads.grads[0], expected[name], what=f"grads of {name!r}")


# -- the exact GGN products and the residual -------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batch_hessian_form_is_torchs_hessian(reduction: str) -> None:
    loss_fn = nn.BCELoss(reduction=reduction)
    gen = torch.Generator().manual_seed(3)
    target = torch.rand(SATURATED.shape, generator=gen, dtype=torch.float64)
    u, v = torch.randn((2, *SATURATED.shape), generator=gen, dtype=torch.float64)
    dense = hessian(lambda p: loss_fn(p, target))(SATURATED).reshape(8, 8)
    expected = u.reshape(-1) @ dense @ v.reshape(-1)
    actual = LossCurvature(loss_fn).batch_hessian_form(SATURATED, target, u, v)
    assert float(actual) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_residual_reproduces_the_output_gradient(reduction: str) -> None:
    r"""$\sum_k r_{kn} s_{nk}$ is $\nabla_{f_n} L$ up to the $\sqrt N$ of the rows."""
    loss_fn = nn.BCELoss(reduction=reduction)
    target = torch.tensor([[1.0, 0.0, 1.0, 0.2], [0.0, 0.5, 0.0, 1.0]], dtype=torch.float64)
    n = SATURATED.shape[0]
    residual = sample_space_residual(loss_fn, SATURATED, target).residual  # [K, N]
    cols = LossCurvature(loss_fn).hessian_columns(SATURATED, target, FisherType.EXACT)
    leaf = SATURATED.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(leaf, target), leaf)
    combined = torch.einsum("kn,knd->nd", residual, cols) / math.sqrt(n)
    assert_close(combined, grad, rtol=1e-12, what="U^T r at the output")


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss", "match"),
    [
        (nn.BCELoss(weight=torch.ones(12)), "BCELoss with weight"),
        (nn.BCELoss(reduction="none"), "reduction='none'"),
    ],
)
def test_unsupported_options_are_rejected(loss: nn.Module, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CurvatureExtractor(P.autoencoder_sigmoid_bce().model(), loss)


def test_target_shape_must_match() -> None:
    with pytest.raises(ValueError, match="target shape"):
        LossCurvature(nn.BCELoss()).check_shapes(SATURATED, SATURATED[:, :3])
