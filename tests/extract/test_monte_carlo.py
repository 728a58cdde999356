r"""Monte-Carlo statistics: their expectation, their scale and their draws.

``FisherType.MC`` draws $K$ columns $s_{nk}$ per sample with
$\mathbb E[s_{nk}s_{nk}^\top] = H_n / K$, so every statistic is a sum over $k$ of
$K$ independent per-draw statistics, each $1/K$ of an unbiased estimate of the
``EXACT`` one (``EXACT`` is checked against the ``torch.func`` oracle in
``test_oracle.py``). The tests here

* check exactly that the Kronecker factor ``G``, the per-sample gradients and the
  diagonal are those sums over the draws of ``PER_SAMPLE_IO`` (so one statistical
  check of the draws covers every statistic);
* test the expectation with a z-test: with $v_k = K\,\phi(G_k)$ for a linear
  functional $\phi$ (the trace, and $u^\top G u$ for a fixed random $u$), the
  mean $\bar v$ of $K$ independent draws has standard error
  $\hat\sigma_v/\sqrt K$, and $|\bar v - \phi(G_\text{exact})|$ must stay below
  ``Z_MAX`` standard errors. ``K`` is chosen so that the standard error of the
  trace is at most ``BIAS / (2 Z_MAX)`` of its value (asserted): a bias of
  ``BIAS`` (2%) moves $\bar v$ by at least ``2 Z_MAX`` standard errors and fails;
* for ``MSELoss``, where the draws are Gaussian with the closed-form covariance
  $2c/K\, I$ ($c = 1/D$ for ``mean``, 1 for ``sum``), check the draws themselves:
  they are the seeded generator's standard normal noise times exactly
  $\sqrt{2c/K}$; and, independently of how they are drawn, the trace of their
  sample covariance $\hat\Sigma$ over $n$ draws is within ``Z_MAX`` standard
  deviations $\sqrt{2/n}\,\|\Sigma\|_F$ of $\operatorname{tr}\Sigma$ (sized to
  detect a 2% error of the scale) and $\hat\Sigma$ within ``Z_MAX`` times the
  Wishart error $\mathbb E\|\hat\Sigma - \Sigma\|_F^2 = (\|\Sigma\|_F^2 +
  (\operatorname{tr}\Sigma)^2)/n$ of $\Sigma$.

The generators are seeded, so every test is deterministic; the tolerances keep
them valid for other seeds.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from curvlib.core import FisherType, StatKind
from curvlib.extract import Backend
from tests import problems as P
from tests.extract.test_oracle import assert_close, every_layer, extract
from tests.problems import Problem

Z_MAX = 4.5
"""Largest accepted |z|: a false alarm has probability below 1e-5 per functional."""

BIAS = 0.02
"""Smallest relative bias of the MC expectation that the z-tests are sized to detect."""

ALL_STATS = (
    StatKind.KRONECKER,
    StatKind.PER_SAMPLE_IO,
    StatKind.PER_SAMPLE_GRAD,
    StatKind.DIAGONAL,
)


def per_draw_g(output_grads: Tensor) -> Tensor:
    r"""$G_k = \frac1{NT}\sum_{n,t} g_{knt}g_{knt}^\top$, ``[K, out, out]``."""
    _, n, t = output_grads.shape[:3]
    return torch.einsum("knto,kntp->kop", output_grads, output_grads) / (n * t)


# -- every statistic is the sum of its draws ----------------------------------------------


LINK_CASES = [
    pytest.param(p, b, id=f"{p.name}-{b.value}")
    for p, b in [
        (P.mlp_ce(), Backend.BACKPACK),
        (P.mlp_mse("sum"), Backend.AUTOGRAD),
        (P.autoencoder_bce(), Backend.BACKPACK),
        (P.cnn_ce(), Backend.BACKPACK),
        (P.tconv_unflatten_bce(), Backend.AUTOGRAD),
        (P.autoencoder_sigmoid_bce(), Backend.AUTOGRAD),
    ]
]


@pytest.mark.parametrize(("problem", "backend"), LINK_CASES)
def test_mc_statistics_are_sums_over_their_draws(problem: Problem, backend: Backend) -> None:
    model = problem.model()
    k = 7
    stats = extract(problem, model, backend, FisherType.MC, ALL_STATS, mc_samples=k, seed=4)
    for name, layer in every_layer(stats, model):
        assert layer.io is not None and layer.kronecker is not None
        assert layer.grads is not None and layer.diagonal is not None
        inputs, output_grads = layer.io.inputs, layer.io.output_grads
        assert output_grads.shape[:2] == (k, problem.n)
        # W_kn = sum_t g_knt a_nt^T, written out.
        grads = torch.einsum("knto,nti->knoi", output_grads, inputs)
        assert_close(layer.kronecker.G, per_draw_g(output_grads).sum(0), what=f"G of {name!r}")
        assert_close(layer.grads.grads, grads, what=f"per-sample grads of {name!r}")
        diagonal = grads.square().sum((0, 1)) / problem.n
        assert_close(layer.diagonal, diagonal, what=f"diagonal of {name!r}")
        # Seven different draws, not one draw repeated.
        per_draw = per_draw_g(output_grads)
        assert float((per_draw[0] - per_draw[1]).abs().max()) > 0.0


# -- the expectation: a z-test over many independent draws ---------------------------------


Z_CASES = [
    pytest.param(p, b, k, id=f"{p.name}-{b.value}")
    for p, b, k in [
        (P.mlp_ce(n=64), Backend.BACKPACK, 32_000),
        (P.mlp_mse("mean", n=64), Backend.BACKPACK, 12_000),
        (P.autoencoder_bce(n=64), Backend.BACKPACK, 12_000),
        (P.cnn_ce(n=16), Backend.BACKPACK, 2_000),
        (P.segmentation_ce(n=8), Backend.AUTOGRAD, 1_000),
        (P.tconv_unflatten_bce(n=8), Backend.AUTOGRAD, 12_000),
        (P.autoencoder_sigmoid_bce(n=64), Backend.BACKPACK, 12_000),
    ]
]


def _z(values: Tensor, expected: float) -> tuple[float, float]:
    """The z-score of ``expected`` against the mean of iid ``values``, and the standard error."""
    se = float(values.std()) / math.sqrt(values.numel())
    return (float(values.mean()) - expected) / se, se


@pytest.mark.slow
@pytest.mark.parametrize(("problem", "backend", "draws"), Z_CASES)
def test_mc_factor_is_unbiased_to_within_its_standard_error(
    problem: Problem, backend: Backend, draws: int
) -> None:
    model = problem.model()
    kron = [StatKind.KRONECKER]
    exact = extract(problem, model, backend, FisherType.EXACT, stats=kron)
    mc = extract(
        problem, model, backend, FisherType.MC, [StatKind.PER_SAMPLE_IO], mc_samples=draws, seed=0
    )
    gen = torch.Generator().manual_seed(0)
    for name, layer in every_layer(mc, model):
        io, reference = layer.io, exact[name].kronecker
        assert io is not None and reference is not None
        # Each draw's G_k carries 1/K (the columns carry sqrt(1/K)): K G_k is unbiased.
        samples = draws * per_draw_g(io.output_grads)
        u = torch.randn(reference.G.shape[0], generator=gen, dtype=reference.G.dtype)
        functionals = {
            "trace": (samples.diagonal(dim1=1, dim2=2).sum(1), float(reference.G.trace())),
            "u^T G u": (samples @ u @ u, float(u @ reference.G @ u)),
        }
        for what, (values, expected) in functionals.items():
            z, se = _z(values, expected)
            assert abs(z) <= Z_MAX, f"{name!r} {what}: z = {z:.2f} (se {se:.2e}, {expected:.4e})"
            if what == "trace":
                # Power: a bias of BIAS would sit at least 2 Z_MAX standard errors out.
                assert se <= BIAS * abs(expected) / (2 * Z_MAX), f"{name!r}: se {se:.2e}"


# -- MSE: the draws in closed form -------------------------------------------------------------


MSE_CASES = [
    pytest.param(reduction, backend, id=f"{reduction}-{backend.value}")
    for reduction in ("mean", "sum")
    for backend in (Backend.BACKPACK, Backend.AUTOGRAD)
]


@pytest.mark.parametrize(("reduction", "backend"), MSE_CASES)
def test_mse_draws_are_the_seeded_noise_times_the_exact_scale(
    reduction: str, backend: Backend
) -> None:
    r"""$s_{nk} = \sqrt{2c/K}\, z_{nk}$, $z$ the seeded generator's ``randn((K, N, D))``.

    The network ends in a Linear layer, so its output gradients are the draws.
    """
    problem = P.mlp_mse(reduction)
    model = problem.model()
    k, seed = 5, 11
    stats = extract(
        problem, model, backend, FisherType.MC, [StatKind.PER_SAMPLE_IO], mc_samples=k, seed=seed
    )
    io = every_layer(stats, model)[-1][1].io
    assert io is not None
    c = 1.0 / problem.entries if reduction == "mean" else 1.0
    noise = torch.randn(
        (k, problem.n, problem.entries),
        generator=torch.Generator().manual_seed(seed),
        dtype=torch.float64,
    )
    assert_close(io.output_grads[:, :, 0], math.sqrt(2.0 * c / k) * noise, what="draws")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_draws_have_the_closed_form_covariance(reduction: str) -> None:
    """Sample mean and covariance of many draws within the Gaussian RMS errors."""
    problem = P.mlp_mse(reduction, n=50)
    model = problem.model()
    k, d = 4000, problem.entries
    stats = extract(
        problem,
        model,
        Backend.BACKPACK,
        FisherType.MC,
        [StatKind.PER_SAMPLE_IO],
        mc_samples=k,
        seed=2,
    )
    io = every_layer(stats, model)[-1][1].io
    assert io is not None
    c = 1.0 / d if reduction == "mean" else 1.0
    draws = io.output_grads.reshape(-1, d)  # n = K N draws
    n = draws.shape[0]
    covariance = 2.0 * c / k * torch.eye(d, dtype=torch.float64)
    trace = float(covariance.trace())
    mean_err = float(draws.mean(0).norm())
    assert mean_err <= Z_MAX * math.sqrt(trace / n), f"mean {mean_err:.3e}"
    sample_cov = draws.T @ draws / n
    # The scale: tr(sample_cov) has variance 2 ||Sigma||_F^2 / n for Gaussian draws.
    trace_sd = math.sqrt(2.0 / n) * float(covariance.norm())
    z = (float(sample_cov.trace()) - trace) / trace_sd
    assert abs(z) <= Z_MAX, f"trace of the sample covariance: z = {z:.2f}"
    assert trace_sd <= BIAS * trace / (2 * Z_MAX)  # a 2% error in the scale fails
    # The shape: isotropic, no correlation between outputs.
    rms = math.sqrt((float(covariance.norm()) ** 2 + trace**2) / n)
    cov_err = float((sample_cov - covariance).norm())
    assert cov_err <= Z_MAX * rms, f"covariance error {cov_err:.3e} > {Z_MAX} x {rms:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_categorical_draws_follow_the_softmax(dtype: torch.dtype) -> None:
    """Cross-entropy draws: class frequencies within their standard errors, none at p = 0.

    The one-hot draws are recovered from the columns ``sqrt(c / M) (p - e_y)``.
    A logit 200 below the others has probability exactly 0 after the softmax
    (float32 and float64 alike): it must never be drawn.
    """
    from torch import nn

    from curvlib.extract.losses import LossCurvature

    logits = torch.tensor([[2.0, 0.0, -1.0, -800.0, 1.0]], dtype=dtype).repeat(400, 1)
    probs = logits.softmax(1)[0]
    assert float(probs[3]) == 0.0
    m = 50
    columns = LossCurvature(nn.CrossEntropyLoss(reduction="sum"))._sampled(
        logits, m, torch.Generator().manual_seed(3), 1.0
    )
    recovered = probs - columns * math.sqrt(m)  # [M, N, C]
    onehot = recovered.round()
    assert float((recovered - onehot).abs().max()) < 1e-5, "draws are not one-hot"
    assert torch.equal(onehot.sum(-1), torch.ones_like(onehot[..., 0]))
    counts = onehot.sum((0, 1))
    n = m * logits.shape[0]
    assert float(counts[3]) == 0.0, "a class of probability 0 was drawn"
    drawn = probs > 0
    z = (counts / n - probs)[drawn] / (probs * (1 - probs) / n)[drawn].sqrt()
    assert float(z.abs().max()) <= Z_MAX, f"frequencies off by z = {z.tolist()}"
