r"""The extractor's statistics against dense ``torch.func`` references (``tests/oracle.py``).

Everything is float64, so deterministic quantities must agree to rounding
(``EXACT_RTOL``); Monte-Carlo factors are checked for convergence
(``MC_RTOL``; their expectation is z-tested in ``test_monte_carlo.py``).
Every test checks that the statistics cover exactly the oracle's curvature
layers (``every_layer``). Scaling and layout are those of
``curvlib.core.conventions``:

* per-sample gradients are those of $\ell_n$, the loss module applied to
  sample $n$ alone (a ``mean`` keeps the $1/D$ of one sample);
* the exact layer block is
  $\frac1N\sum_{k,n}\operatorname{vec}(\bar W_{kn})\operatorname{vec}(\bar W_{kn})^\top$
  with $\bar W = [W \mid b]$ vectorised row-major;
* $A = \frac1N\sum_n\sum_t \bar a_{nt}\bar a_{nt}^\top$ (sum over positions),
  $G = \frac1N\sum_{k,n}\frac1T\sum_t g_{knt}g_{knt}^\top$ (average over positions).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from curvlib.core import CurvatureStatistics, FisherType, LayerStatistics, StatKind
from curvlib.extract import Backend, CurvatureExtractor, UnsupportedPolicy
from curvlib.linalg import factors as linalg_factors

with warnings.catch_warnings():
    # linear_operator (a curvlinops dependency) scripts functions at import time.
    warnings.filterwarnings("ignore", message=".*torch.jit.script", category=FutureWarning)
    from curvlinops import GGNLinearOperator, KFACLinearOperator

from tests import oracle
from tests import problems as P
from tests.problems import Problem

EXACT_RTOL = 1e-10
"""Relative tolerance for deterministic float64 quantities (rounding only)."""

MC_RTOL = 0.05
"""Largest relative Frobenius error of a 2000-sample Monte-Carlo ``G`` against ``EXACT``.

A convergence check (the errors measured here are 0.01 to 0.035); the expectation
and the scale of the MC statistics are tested to 2% in ``test_monte_carlo.py``.
"""

DIFFERENT = 1e-3
"""Smallest relative difference for "these must differ" checks (discriminating tests)."""

ALL_STATS = (StatKind.KRONECKER, StatKind.PER_SAMPLE_IO, StatKind.PER_SAMPLE_GRAD)


# -- helpers -------------------------------------------------------------------


def assert_close(
    actual: Tensor, expected: Tensor, rtol: float = EXACT_RTOL, what: str = ""
) -> None:
    """``|actual - expected| <= rtol * max|expected|`` entry-wise (and equal shapes)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    actual, expected = actual.detach(), expected.detach()
    scale = max(float(expected.abs().max()), 1e-300)
    err = float((actual - expected).abs().max())
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:.0e} * {scale:.3e}"


def every_layer(stats: CurvatureStatistics, model: nn.Module) -> list[tuple[str, LayerStatistics]]:
    """The per-layer statistics, asserted to cover exactly the oracle's curvature layers."""
    expected = oracle.curvature_layer_names(model)
    assert sorted(stats.layers) == sorted(expected), f"layers {sorted(stats.layers)} != {expected}"
    return [(name, stats.layers[name]) for name in expected]


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """Relative Frobenius error."""
    return float((actual.detach() - expected.detach()).norm() / expected.detach().norm())


def extract(
    problem: Problem,
    model: nn.Module,
    backend: Backend,
    fisher: FisherType,
    stats: Iterable[StatKind] = ALL_STATS,
    **kwargs: object,
) -> CurvatureStatistics:
    """One ``collect()`` block on the problem's batch."""
    ex = CurvatureExtractor(
        model,
        problem.loss_fn,
        stats=stats,
        fisher_type=fisher,
        backend=backend,
        unsupported=UnsupportedPolicy.IGNORE,
        **kwargs,  # type: ignore[arg-type]
    )
    with ex.collect():
        loss = problem.loss_fn(model(problem.x), problem.y)
        loss.backward()
    return ex.statistics()


def sample_block(grads: Tensor) -> Tensor:
    r"""$\frac1N\sum_{k,n}\operatorname{vec}(\bar W_{kn})\operatorname{vec}(\bar W_{kn})^\top$."""
    k, n = grads.shape[:2]
    vec = grads.reshape(k, n, -1)
    return torch.einsum("knp,knq->pq", vec, vec) / n


def oracle_grad_matrices(problem: Problem, model: nn.Module) -> dict[str, Tensor]:
    """Per-sample ``[W | b]`` gradients of every curvature layer: ``{layer: [N, out, in_aug]}``."""
    grads = oracle.per_sample_grads(model, problem.loss_fn, problem.x, problem.y)
    result = {}
    for name in oracle.curvature_layer_names(model):
        module = model.get_submodule(name)
        prefix = f"{name}." if name else ""
        bias = grads.get(f"{prefix}bias") if module.bias is not None else None
        result[name] = oracle.layer_matrix(module, grads[f"{prefix}weight"], bias)
    return result


_CACHE: dict[tuple[str, int, str], Tensor] = {}


def cached(problem: Problem, what: str) -> Tensor:
    """Dense oracle matrices, computed once per problem (the oracle is the slow part)."""
    key = (problem.name, problem.n, what)
    if key not in _CACHE:
        model = problem.model()
        fn = {"ggn": oracle.dense_ggn, "ef": oracle.dense_empirical_fisher}[what]
        _CACHE[key] = fn(model, problem.loss_fn, problem.x, problem.y)
    return _CACHE[key]


def backends(problem: Problem) -> list[Backend]:
    """Both backends where BackPACK applies; else autograd and the AUTO fallback."""
    if problem.backpack:
        return [Backend.BACKPACK, Backend.AUTOGRAD]
    return [Backend.AUTOGRAD, Backend.AUTO]


def cases(problems: Iterable[Problem]) -> list[object]:
    return [pytest.param(p, b, id=f"{p.name}-{b.value}") for p in problems for b in backends(p)]


PROBLEMS = [
    P.mlp_ce(),
    P.mlp_ce().with_loss(nn.CrossEntropyLoss(reduction="sum")),
    P.mlp_mse("mean"),
    P.mlp_mse("sum"),
    P.autoencoder_bce(),
    P.autoencoder_bce().with_loss(nn.BCEWithLogitsLoss(reduction="sum")),
    P.cnn_ce(),
    P.cnn_ce(pool=nn.AvgPool2d).with_loss(nn.CrossEntropyLoss(reduction="sum")),
    P.segmentation_ce(),
    P.tconv_bce(),
    P.tconv_unflatten_bce(),
    P.bn_net(train=False),
]


# -- per-sample gradients and exact blocks -------------------------------------


@pytest.mark.parametrize(("problem", "backend"), cases(PROBLEMS))
def test_per_sample_grads_match_vmap_grad(problem: Problem, backend: Backend) -> None:
    model = problem.model()
    expected = oracle_grad_matrices(problem, model)
    stats = extract(problem, model, backend, FisherType.EMPIRICAL)
    assert stats.num_samples == problem.n
    for name, layer_stats in every_layer(stats, model):
        assert layer_stats.grads is not None and layer_stats.io is not None
        grads = layer_stats.grads.grads
        assert grads.shape[:2] == (1, problem.n)
        assert_close(grads[0], expected[name], what=f"per-sample grads of {name!r}")
        assert_close(layer_stats.io.grads(), grads, what=f"io.grads() of {name!r}")


@pytest.mark.parametrize("fisher", [FisherType.EXACT, FisherType.EMPIRICAL], ids=lambda f: f.value)
@pytest.mark.parametrize(("problem", "backend"), cases(PROBLEMS))
def test_layer_block_matches_dense_reference(
    problem: Problem, backend: Backend, fisher: FisherType
) -> None:
    model = problem.model()
    stats = extract(problem, model, backend, fisher)
    dense = cached(problem, "ggn" if fisher is FisherType.EXACT else "ef")
    d_out = math.prod(model(problem.x).shape[1:])
    for name, layer_stats in every_layer(stats, model):
        assert layer_stats.grads is not None
        grads = layer_stats.grads.grads
        # EXACT backpropagates one column per network output of a sample, EMPIRICAL one.
        assert grads.shape[0] == (d_out if fisher is FisherType.EXACT else 1)
        expected = oracle.block(dense, model, name)
        assert expected.abs().max() > 0
        assert_close(sample_block(grads), expected, what=f"block of {name!r}")


# -- where Kronecker factors are exact ---------------------------------------


ONE_SAMPLE = [
    P.mlp_ce(n=1),
    P.autoencoder_bce(n=1),
    P.deep_linear_mse(),
    P.conv_single_position(),
]


@pytest.mark.parametrize(("problem", "backend"), cases(ONE_SAMPLE))
def test_kronecker_is_exact_for_one_sample_and_one_position(
    problem: Problem, backend: Backend
) -> None:
    assert problem.n == 1
    model = problem.model()
    stats = extract(problem, model, backend, FisherType.EXACT, stats=[StatKind.KRONECKER])
    dense = oracle.dense_ggn(model, problem.loss_fn, problem.x, problem.y)
    for name, layer_stats in every_layer(stats, model):
        assert layer_stats.kronecker is not None
        kron = torch.kron(layer_stats.kronecker.G, layer_stats.kronecker.A)
        assert_close(kron, oracle.block(dense, model, name), what=f"G ⊗ A of {name!r}")


def test_kronecker_is_not_exact_for_several_samples() -> None:
    """Guards the test above against being vacuous: with N > 1, G ⊗ A is an approximation."""
    problem = P.mlp_ce(n=6)
    model = problem.model()
    stats = extract(problem, model, Backend.BACKPACK, FisherType.EXACT, stats=[StatKind.KRONECKER])
    dense = cached(problem, "ggn")
    for name, layer_stats in every_layer(stats, model):
        assert layer_stats.kronecker is not None
        kron = torch.kron(layer_stats.kronecker.G, layer_stats.kronecker.A)
        assert rel_err(kron, oracle.block(dense, model, name)) > DIFFERENT


KFC_LAYERS = [
    (P.cnn_ce(), "0"),
    (P.segmentation_ce(), "0"),
    (P.segmentation_ce(), "2"),
    (P.tconv_bce(), "0"),
    (P.tconv_bce(), "2"),
    (P.tconv_unflatten_bce(), "2"),
    (P.tconv_unflatten_bce(), "4"),
]


@pytest.mark.parametrize(
    ("problem", "layer", "backend"),
    [
        pytest.param(p, name, b, id=f"{p.name}-{name}-{b.value}")
        for p, name in KFC_LAYERS
        for b in backends(p)
    ],
)
def test_kfc_factors_of_convolutions(problem: Problem, layer: str, backend: Backend) -> None:
    r"""$A$ sums, $G$ averages over the output positions (KFC / KFAC-expand)."""
    model = problem.model()
    module = model.get_submodule(layer)
    u = oracle.layer_inputs(model, problem.x)[layer]
    a_bar = oracle.unfolded_inputs(module, u)  # [N, T, in_aug], via d z / d [W|b]
    n, t = a_bar.shape[:2]
    assert t > 1
    if isinstance(module, nn.Conv2d):
        # The Jacobian-based unfolding is F.unfold with a trailing one.
        cols = F.unfold(
            u, module.kernel_size, module.dilation, module.padding, module.stride
        ).transpose(1, 2)
        if module.bias is not None:
            cols = torch.cat([cols, cols.new_ones(n, t, 1)], dim=-1)
        assert_close(a_bar, cols, what="oracle unfolding vs F.unfold")
    A = torch.einsum("nti,ntj->ij", a_bar, a_bar) / n
    jhj = oracle.layer_output_ggn(model, problem.loss_fn, problem.x, problem.y, layer)
    G = torch.einsum("ntotp->op", jhj) / (n * t)

    stats = extract(problem, model, backend, FisherType.EXACT)[layer]
    assert stats.kronecker is not None and stats.io is not None
    assert_close(stats.io.inputs, a_bar, what="unfolded inputs")
    assert_close(stats.kronecker.A, A, what="A")
    assert_close(stats.kronecker.G, G, what="G")
    # The average over positions is what the conventions say; the sum would be T times larger.
    assert rel_err(stats.kronecker.G, G * t) > DIFFERENT


@pytest.mark.parametrize(
    ("problem", "layer", "backend"),
    [
        pytest.param(p, name, b, id=f"{p.name}-{name}-{b.value}")
        for p, name in KFC_LAYERS[:2]
        for b in backends(p)
    ],
)
def test_factors_in_gram_blocks_match_the_oracle_and_are_symmetric(
    problem: Problem, layer: str, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Factors of large layers (here: every layer) are Gram matrices in blocks, symmetric."""
    monkeypatch.setattr(linalg_factors, "MIN_GRAM_BLOCK_ROWS", 1)
    monkeypatch.setattr(linalg_factors, "MIN_GRAM_BLOCK_COLS", 1)
    test_kfc_factors_of_convolutions(problem, layer, backend)
    stats = extract(problem, problem.model(), backend, FisherType.EXACT)[layer]
    assert stats.kronecker is not None
    assert stats.kronecker.A.shape[0] >= 4  # split into blocks
    for factor in (stats.kronecker.A, stats.kronecker.G):
        assert torch.equal(factor, factor.T) or factor.shape[0] < 4


# -- Monte Carlo ----------------------------------------------------------------


MC_CASES = [
    pytest.param(p, b, id=f"{p.name}-{b.value}")
    for p, b in [
        (P.mlp_ce(), Backend.BACKPACK),
        (P.mlp_mse("mean"), Backend.BACKPACK),
        (P.autoencoder_bce(), Backend.BACKPACK),
        (P.cnn_ce(), Backend.BACKPACK),
        (P.segmentation_ce(), Backend.AUTOGRAD),
        (P.tconv_unflatten_bce(), Backend.AUTOGRAD),
        (P.autoencoder_sigmoid_bce(), Backend.BACKPACK),
        (P.autoencoder_sigmoid_bce(), Backend.AUTOGRAD),
    ]
]


@pytest.mark.parametrize(("problem", "backend"), MC_CASES)
def test_mc_factors_converge_to_exact(problem: Problem, backend: Backend) -> None:
    kron = [StatKind.KRONECKER]
    exact = extract(problem, problem.model(), backend, FisherType.EXACT, stats=kron)
    few = extract(problem, problem.model(), backend, FisherType.MC, kron, mc_samples=5, seed=1)
    many = extract(problem, problem.model(), backend, FisherType.MC, kron, mc_samples=2000, seed=1)
    for name, ex_stats in every_layer(exact, problem.model()):
        ex, lo, hi = ex_stats.kronecker, few[name].kronecker, many[name].kronecker
        assert ex is not None and lo is not None and hi is not None
        # A does not depend on the flavour.
        assert_close(hi.A, ex.A, what=f"A of {name!r}")
        err_few, err_many = rel_err(lo.G, ex.G), rel_err(hi.G, ex.G)
        assert err_many < MC_RTOL, f"{name!r}: MC(2000) error {err_many:.3f}"
        assert err_many < err_few, f"{name!r}: MC(2000) {err_many:.3f} >= MC(5) {err_few:.3f}"


# -- ConvTranspose2d layout ----------------------------------------------------


@pytest.mark.parametrize(("problem", "backend"), cases([P.tconv_bce(), P.tconv_unflatten_bce()]))
def test_conv_transpose_grads_and_channel_swapped_layout(
    problem: Problem, backend: Backend
) -> None:
    model = problem.model()
    per_sample = oracle.per_sample_grads(model, problem.loss_fn, problem.x, problem.y)
    inputs = oracle.layer_inputs(model, problem.x)
    stats = extract(problem, model, backend, FisherType.EMPIRICAL)
    checked = discriminating = 0
    for name, layer_stats in every_layer(stats, model):
        module = model.get_submodule(name)
        if not isinstance(module, nn.ConvTranspose2d):
            continue
        checked += 1
        assert layer_stats.io is not None
        from_io = layer_stats.io.grads()[0]  # [N, C_out, C_in*kh*kw (+1)]
        prefix = f"{name}." if name else ""
        w_grad = per_sample[f"{prefix}weight"]  # [N, C_in, C_out, kh, kw] as torch stores it
        n, c_in, c_out = w_grad.shape[:3]
        swapped = w_grad.transpose(1, 2).reshape(n, c_out, -1)
        assert_close(from_io[..., : swapped.shape[-1]], swapped, what=f"weight grads {name!r}")
        if module.bias is not None:
            assert_close(from_io[..., -1], per_sample[f"{prefix}bias"], what=f"bias {name!r}")
        if min(c_in, c_out) > 1:
            # A plain reshape of the stored kernel is a different (wrong) matrix.
            plain = w_grad.reshape(n, c_out, -1)
            assert rel_err(from_io[..., : plain.shape[-1]], plain) > DIFFERENT
            discriminating += 1
        # Forward consistency: the layer computes z_nt = [W | b] a_nt on the unfolding.
        bias = module.bias.detach() if module.bias is not None else None
        w_bar = oracle.layer_matrix(module, module.weight.detach(), bias)
        z = module(inputs[name]).detach().flatten(2).transpose(1, 2)  # [N, T, C_out]
        z_from_io = torch.einsum("oi,nti->nto", w_bar, layer_stats.io.inputs)
        assert_close(z_from_io, z, what=f"W a of {name!r}")
    assert checked == 2 and discriminating >= 1


# -- curvlinops ------------------------------------------------------------------


def _curvlinops_permutation(model: nn.Module, layers: list[str]) -> Tensor:
    """Index map from curvlinops' ``[vec_row(W), b]`` per layer to our ``vec_row([W | b])``.

    Only for Linear and Conv2d (curvlinops' parameter order is that of torch's storage).
    """
    idx, offset = [], 0
    for name in layers:
        module = model.get_submodule(name)
        out = module.weight.shape[0]
        inn = module.weight[0].numel()
        w_idx = torch.arange(out * inn).reshape(out, inn) + offset
        if module.bias is None:
            idx.append(w_idx.flatten())
            offset += out * inn
            continue
        b_idx = torch.arange(out).reshape(out, 1) + offset + out * inn
        idx.append(torch.cat([w_idx, b_idx], dim=1).flatten())
        offset += out * inn + out
    return torch.cat(idx)


def _dense_operator(op: object, model: nn.Module, layers: list[str]) -> Tensor:
    num = sum(p.numel() for name in layers for p in model.get_submodule(name).parameters())
    dense = op @ torch.eye(num, dtype=P.DTYPE)  # type: ignore[operator]
    perm = _curvlinops_permutation(model, layers)
    return dense[perm][:, perm]


def _layer_params(model: nn.Module, layers: list[str]) -> list[nn.Parameter]:
    params = []
    for name in layers:
        module = model.get_submodule(name)
        params += [p for p in (module.weight, module.bias) if p is not None]
    return params


# curvlinops KFAC (fisher_type "type-2" = EXACT, "empirical"; joint [W|b] with
# separate_weight_and_bias=False) vs curvlib's G ⊗ A. Conversion factors:
# * reduction "sum": curvlinops approximates the GGN of the summed loss,
#   sum_n J_n^T H_n J_n, which is N times curvlib's per-sample average.
# * reduction "mean", type-2: both are (1/N) sum_n J_n^T H_n J_n; factor 1.
# * reduction "mean", empirical: curvlinops rescales the mean loss by sqrt(D)
#   (_maybe_adjust_loss_scale), so its empirical factor carries 1/D where
#   curvlib's carries 1/D^2 (conventions); factor D (D = 1 for flat CE).
# * Conv2d (KFAC-expand): curvlinops sums G and averages A over positions,
#   curvlib the reverse; the Kronecker product is the same, factor 1.
KFAC_CASES = [
    (P.mlp_ce(), FisherType.EXACT, "type-2", "1"),
    (P.mlp_ce().with_loss(nn.CrossEntropyLoss(reduction="sum")), FisherType.EXACT, "type-2", "N"),
    (P.mlp_mse("mean"), FisherType.EXACT, "type-2", "1"),
    (P.mlp_mse("sum"), FisherType.EXACT, "type-2", "N"),
    (P.mlp_ce(), FisherType.EMPIRICAL, "empirical", "1"),
    (P.mlp_mse("mean"), FisherType.EMPIRICAL, "empirical", "D"),
    (P.mlp_mse("sum"), FisherType.EMPIRICAL, "empirical", "N"),
    (P.cnn_ce(), FisherType.EXACT, "type-2", "1"),
]


@pytest.mark.parametrize(
    ("problem", "fisher", "cl_fisher", "factor"),
    [pytest.param(*c, id=f"{c[0].name}-{c[2]}-x{c[3]}") for c in KFAC_CASES],
)
def test_kronecker_factors_agree_with_curvlinops_kfac(
    problem: Problem, fisher: FisherType, cl_fisher: str, factor: str
) -> None:
    model = problem.model()
    layers = oracle.curvature_layer_names(model)
    stats = extract(problem, model, Backend.BACKPACK, fisher, stats=[StatKind.KRONECKER])
    op = KFACLinearOperator(
        model,
        problem.loss_fn,
        _layer_params(model, layers),
        [(problem.x, problem.y)],
        fisher_type=cl_fisher,
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    dense = _dense_operator(op, model, layers)
    scale = {"1": 1.0, "N": float(problem.n), "D": float(problem.entries)}[factor]
    for name, layer_stats in every_layer(stats, model):
        assert layer_stats.kronecker is not None
        kron = torch.kron(layer_stats.kronecker.G, layer_stats.kronecker.A)
        assert_close(scale * kron, oracle.block(dense, model, name), what=f"KFAC of {name!r}")


@pytest.mark.parametrize(
    ("problem", "factor"),
    [
        pytest.param(P.mlp_ce(), 1.0, id="mlp_ce"),
        pytest.param(P.mlp_mse("sum"), 6.0, id="mlp_mse_sum-xN"),
        pytest.param(P.segmentation_ce(), 1.0, id="segmentation_ce"),
    ],
)
def test_oracle_agrees_with_curvlinops_ggn(problem: Problem, factor: float) -> None:
    """Validates the oracle itself (incl. the 1/D of a spatial CE mean) independently."""
    model = problem.model()
    layers = oracle.curvature_layer_names(model)
    assert factor in (1.0, float(problem.n))
    op = GGNLinearOperator(
        model,
        problem.loss_fn,
        _layer_params(model, layers),
        [(problem.x, problem.y)],
        check_deterministic=False,
    )
    assert_close(factor * cached(problem, "ggn"), _dense_operator(op, model, layers))


# -- BatchNorm and Dropout ---------------------------------------------------------


def _record_dropout_masks(model: nn.Module) -> dict[str, Tensor]:
    """Forward hooks that store each train-mode Dropout's mask (incl. 1/(1-p))."""
    masks: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and module.training:

            def hook(m: nn.Module, i: tuple[Tensor, ...], o: Tensor, name: str = name) -> None:
                assert bool((i[0] != 0).all())
                masks[name] = (o / i[0]).detach()

            module.register_forward_hook(hook)
    return masks


@pytest.mark.parametrize("layer", ["0", "5", "8"])
def test_batchnorm_train_exact_factors_match_coupled_reference(layer: str) -> None:
    r"""Train-mode BatchNorm couples the samples; AUTO falls back to autograd.

    Per-sample statistics do not exist there; ``G`` pulls every column of every
    $H_n$ back on its own and collects all rows it reaches
    (``oracle.coupled_output_factor``), ``A`` averages the inputs of all rows.
    The Dropout mask of the run is frozen into the reference.
    """
    problem = P.bn_net(train=True)
    model = problem.model()
    reference = copy.deepcopy(model)
    masks = _record_dropout_masks(model)
    torch.manual_seed(0)
    stats = extract(problem, model, Backend.AUTO, FisherType.EXACT, stats=[StatKind.KRONECKER])
    assert set(masks) == {"3"}
    fixed = oracle.with_fixed_masks(reference, masks)
    kron = stats[layer].kronecker
    assert kron is not None
    expected_g = oracle.coupled_output_factor(fixed, problem.loss_fn, problem.x, problem.y, layer)
    assert_close(kron.G, expected_g, what=layer)
    module = fixed.get_submodule(layer)
    a = oracle.unfolded_inputs(module, oracle.layer_inputs(fixed, problem.x)[layer])
    a = a.flatten(0, 1)
    assert_close(kron.A, a.T @ a / problem.x.shape[0], what=layer)


def test_batchnorm_train_mc_factor_converges_to_exact() -> None:
    """Coupled MC columns are zero-mean draws, so pulling them back jointly is unbiased."""
    problem = P.bn_net(train=True)
    model = problem.model()
    model[3].eval()  # a fixed net: no dropout mask
    exact = extract(problem, model, Backend.AUTO, FisherType.EXACT, stats=[StatKind.KRONECKER])
    mc = extract(
        problem, model, Backend.AUTO, FisherType.MC, stats=[StatKind.KRONECKER], mc_samples=4000
    )
    for name in ("0", "5"):
        g_exact, g_mc = exact[name].kronecker.G, mc[name].kronecker.G  # type: ignore[union-attr]
        assert float((g_mc - g_exact).norm() / g_exact.norm()) < MC_RTOL


@pytest.mark.parametrize("backend", [Backend.BACKPACK, Backend.AUTOGRAD], ids=lambda b: b.value)
def test_train_mode_dropout_uses_the_forward_mask(backend: Backend) -> None:
    """Dropout in train mode (BatchNorm in eval mode): samples stay uncoupled."""
    problem = P.bn_net(train=False)
    model = problem.model()
    model[3].train()
    reference = copy.deepcopy(model)
    masks = _record_dropout_masks(model)
    torch.manual_seed(0)
    stats = extract(problem, model, backend, FisherType.EXACT, stats=[StatKind.PER_SAMPLE_GRAD])
    assert set(masks) == {"3"} and bool((masks["3"] == 0).any())
    fixed = oracle.with_fixed_masks(reference, masks)
    dense = oracle.dense_ggn_coupled(fixed, problem.loss_fn, problem.x, problem.y)
    for name, layer_stats in every_layer(stats, model):
        assert layer_stats.grads is not None
        assert_close(sample_block(layer_stats.grads.grads), oracle.block(dense, fixed, name))


# -- reductions ----------------------------------------------------------------------


REDUCTION_CASES = [
    (P.mlp_ce(), nn.CrossEntropyLoss, Backend.BACKPACK),
    (P.mlp_mse("mean"), nn.MSELoss, Backend.BACKPACK),
    (P.autoencoder_bce(), nn.BCEWithLogitsLoss, Backend.BACKPACK),
    (P.segmentation_ce(), nn.CrossEntropyLoss, Backend.BACKPACK),
    (P.tconv_unflatten_bce(), nn.BCEWithLogitsLoss, Backend.AUTOGRAD),
    (P.autoencoder_sigmoid_bce(), nn.BCELoss, Backend.BACKPACK),
]


@pytest.mark.parametrize(
    "fisher", [FisherType.EXACT, FisherType.MC, FisherType.EMPIRICAL], ids=lambda f: f.value
)
@pytest.mark.parametrize(
    ("problem", "loss_cls", "backend"),
    [pytest.param(*c, id=f"{c[0].name}-{c[2].value}") for c in REDUCTION_CASES],
)
def test_mean_and_sum_differ_by_one_over_d(
    problem: Problem, loss_cls: type[nn.Module], backend: Backend, fisher: FisherType
) -> None:
    mean = problem.with_loss(loss_cls(reduction="mean"))
    total = problem.with_loss(loss_cls(reduction="sum"))
    d = problem.entries
    s_mean = extract(
        mean, mean.model(), backend, fisher, mc_samples=3 if fisher is FisherType.MC else 1
    )
    s_sum = extract(
        total, total.model(), backend, fisher, mc_samples=3 if fisher is FisherType.MC else 1
    )
    # Columns s_nk carry sqrt(1/D) (EXACT, MC with the same draws); gradients carry 1/D.
    grad_scale = 1.0 / d if fisher is FisherType.EMPIRICAL else 1.0 / math.sqrt(d)
    for name, _ in every_layer(s_mean, mean.model()):
        assert set(s_sum.layers) == set(s_mean.layers)
        km, ks = s_mean[name].kronecker, s_sum[name].kronecker
        gm, gs = s_mean[name].grads, s_sum[name].grads
        assert km is not None and ks is not None and gm is not None and gs is not None
        assert_close(km.A, ks.A, what=f"A of {name!r}")
        assert_close(km.G, ks.G * grad_scale**2, what=f"G of {name!r}")
        assert_close(gm.grads, gs.grads * grad_scale, what=f"grads of {name!r}")


# -- sub-sampling ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("problem", "backend"),
    [
        pytest.param(P.mlp_ce(n=8), Backend.BACKPACK, id="mlp_ce-backpack"),
        pytest.param(P.mlp_ce(n=8), Backend.AUTOGRAD, id="mlp_ce-autograd"),
        pytest.param(P.tconv_unflatten_bce(n=6), Backend.AUTOGRAD, id="tconv_unflatten-autograd"),
    ],
)
@pytest.mark.parametrize("fisher", [FisherType.EXACT, FisherType.EMPIRICAL], ids=lambda f: f.value)
def test_stats_fraction_uses_exactly_half_the_batch(
    problem: Problem, backend: Backend, fisher: FisherType
) -> None:
    model = problem.model()
    stats = extract(problem, model, backend, fisher, stats_fraction=0.5, seed=3)
    m = problem.n // 2
    assert stats.num_samples == m
    first = stats[oracle.curvature_layer_names(model)[0]]
    assert first.io is not None
    # The first layer is Linear with bias: its unfolded input is [x_n, 1].
    seen = first.io.inputs[:, 0, :-1]
    dist = torch.cdist(seen, problem.x)
    rows = dist.argmin(dim=1)
    assert_close(seen, problem.x[rows], what="inputs are rows of the batch")
    assert len(set(rows.tolist())) == m
    sub = problem.subset(rows)

    direct = extract(sub, sub.model(), backend, fisher)
    if fisher is FisherType.EXACT:
        dense = oracle.dense_ggn(model, problem.loss_fn, sub.x, sub.y)
    else:
        # The per-sample gradients of the chosen rows (of ell_n, whatever the batch size).
        dense = oracle.dense_empirical_fisher(model, problem.loss_fn, sub.x, sub.y)
    for name, layer_stats in every_layer(stats, model):
        assert layer_stats.kronecker is not None and layer_stats.grads is not None
        ref = direct[name]
        assert ref.kronecker is not None
        assert_close(layer_stats.kronecker.A, ref.kronecker.A, what=f"A of {name!r}")
        assert_close(layer_stats.kronecker.G, ref.kronecker.G, what=f"G of {name!r}")
        block = sample_block(layer_stats.grads.grads)
        assert_close(block, oracle.block(dense, model, name), what=f"block of {name!r}")


# -- the batch gradient --------------------------------------------------------------


@pytest.mark.parametrize(("problem", "backend"), cases([*PROBLEMS, P.bn_net(train=True)]))
def test_per_sample_grads_sum_to_the_untouched_batch_gradient(
    problem: Problem, backend: Backend
) -> None:
    """``mean``: (1/N) Σ_n W_n = ∇L; ``sum``: Σ_n W_n = ∇L; and ∇L is as without curvlib.

    Coupled samples (train-mode BatchNorm) have no per-sample gradients: there
    only the untouched batch gradient is checked.
    """
    coupled = problem.name == "bn_net_train"
    plain = problem.model()
    torch.manual_seed(0)
    problem.loss_fn(plain(problem.x), problem.y).backward()
    model = problem.model()
    torch.manual_seed(0)
    kind = StatKind.KRONECKER if coupled else StatKind.PER_SAMPLE_GRAD
    stats = extract(problem, model, backend, FisherType.EMPIRICAL, stats=[kind])
    scale = 1.0 / problem.n if problem.loss_fn.reduction == "mean" else 1.0
    for name, layer_stats in every_layer(stats, model):
        ours, theirs = model.get_submodule(name), plain.get_submodule(name)
        for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
            assert p.grad is not None and q.grad is not None
            assert_close(p.grad, q.grad, what=f"gradient of {name!r}")
        if coupled:
            continue
        bias = ours.bias.grad if ours.bias is not None else None
        batch_grad = oracle.layer_matrix(ours, ours.weight.grad, bias)
        assert layer_stats.grads is not None
        summed = scale * layer_stats.grads.grads[0].sum(dim=0)
        assert_close(summed, batch_grad, what=f"sum of per-sample grads of {name!r}")
