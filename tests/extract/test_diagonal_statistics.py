r"""``StatKind.DIAGONAL`` against independent dense references.

References, all float64:

* ``tests/oracle.py`` (``torch.func`` on an un-hooked copy): the diagonal of the
  dense GGN and of the dense empirical Fisher of the curvature layers;
* a dense GGN over *every* trainable parameter, written below with
  ``torch.func`` (the oracle module covers only Linear/Conv layers), for the
  affine parameters of eval-mode BatchNorm;
* BackPACK's own ``DiagGGNExact`` and ``SumGradSquared`` extensions, on the
  losses they support (scaled to curvlib's per-sample average: ``SumGradSquared``
  sums the squared gradients of the batch loss, i.e. of $\ell_n / N$).

Layout: a diagonal is the layer's $[W \mid b]$ matrix, so its row-major flatten
is the diagonal of the layer's dense block.
"""

from __future__ import annotations

import copy

import pytest
import torch
from backpack import backpack, extend
from backpack.extensions import DiagGGNExact, SumGradSquared
from torch import Tensor, nn

from curvlib.core import FisherType, LayerKind, StatKind
from curvlib.extract import Backend, CurvatureExtractor, UnsupportedPolicy
from tests import oracle
from tests import problems as P
from tests.extract.test_oracle import MC_RTOL, assert_close, rel_err
from tests.problems import Problem

WITH_BN = frozenset(LayerKind) | {LayerKind.BATCHNORM}

PROBLEMS = [
    P.mlp_ce(),
    P.mlp_mse("sum"),
    P.cnn_ce(),
    P.tconv_bce(),
    P.autoencoder_bce(),
    P.segmentation_ce(),
]


def _backends(problem: Problem) -> list[Backend]:
    return [Backend.BACKPACK, Backend.AUTOGRAD] if problem.backpack else [Backend.AUTOGRAD]


def _cases() -> list[tuple[Problem, Backend]]:
    return [(p, b) for p in PROBLEMS for b in _backends(p)]


def _diagonals(
    problem: Problem,
    model: nn.Module,
    fisher: FisherType,
    backend: Backend = Backend.AUTO,
    **kwargs: object,
) -> dict[str, Tensor]:
    ex = CurvatureExtractor(
        model,
        problem.loss_fn,
        stats={StatKind.DIAGONAL},
        fisher_type=fisher,
        backend=backend,
        unsupported=UnsupportedPolicy.IGNORE,
        **kwargs,  # type: ignore[arg-type]
    )
    with ex.collect():
        problem.loss_fn(model(problem.x), problem.y).backward()
    model.zero_grad()
    result = {}
    for name, stats in ex.statistics().layers.items():
        assert stats.diagonal is not None
        assert stats.kronecker is None and stats.io is None and stats.grads is None
        result[name] = stats.diagonal
    return result


@pytest.mark.parametrize(("problem", "backend"), _cases(), ids=lambda v: getattr(v, "name", v))
def test_exact_diagonal_is_the_ggn_diagonal(problem: Problem, backend: Backend) -> None:
    model = problem.model()
    diags = _diagonals(problem, model, FisherType.EXACT, backend)
    dense = oracle.dense_ggn(model, problem.loss_fn, problem.x, problem.y)
    for name, sl in oracle.layer_slices(model).items():
        assert_close(diags[name].flatten(), torch.diagonal(dense[sl, sl]), what=name)


@pytest.mark.parametrize(("problem", "backend"), _cases(), ids=lambda v: getattr(v, "name", v))
def test_empirical_diagonal_is_the_mean_squared_gradient(
    problem: Problem, backend: Backend
) -> None:
    model = problem.model()
    diags = _diagonals(problem, model, FisherType.EMPIRICAL, backend)
    dense = oracle.dense_empirical_fisher(model, problem.loss_fn, problem.x, problem.y)
    for name, sl in oracle.layer_slices(model).items():
        assert_close(diags[name].flatten(), torch.diagonal(dense[sl, sl]), what=name)


def test_mc_diagonal_converges_to_the_exact_one() -> None:
    problem = P.cnn_ce()
    model = problem.model()
    exact = _diagonals(problem, model, FisherType.EXACT)
    mc = _diagonals(problem, model, FisherType.MC, mc_samples=4000, seed=3)
    few = _diagonals(problem, model, FisherType.MC, mc_samples=1, seed=3)
    assert set(exact) == set(mc) == set(oracle.curvature_layer_names(model))
    for name in exact:
        assert rel_err(mc[name], exact[name]) < MC_RTOL, name
        assert rel_err(few[name], exact[name]) > 1e-3, name  # a real draw, not EXACT


def test_subsampled_diagonal_uses_the_drawn_rows() -> None:
    problem = P.mlp_ce(n=8)
    model = problem.model()
    diags = _diagonals(problem, model, FisherType.EXACT, stats_fraction=0.5, seed=5)
    # The same draw on a fresh extractor with the same seed picks the same rows.
    gen = torch.Generator().manual_seed(5)
    rows = sorted(torch.randperm(problem.n, generator=gen)[:4].tolist())
    sub = problem.subset(rows)
    dense = oracle.dense_ggn(model, sub.loss_fn, sub.x, sub.y)
    for name, sl in oracle.layer_slices(model).items():
        assert_close(diags[name].flatten(), torch.diagonal(dense[sl, sl]), what=name)


# -- BatchNorm affine parameters -------------------------------------------------------


@pytest.mark.parametrize("backend", [Backend.BACKPACK, Backend.AUTOGRAD])
def test_batchnorm_affine_diagonal_in_eval_mode(backend: Backend) -> None:
    problem = P.bn_net(train=False)
    model = problem.model()
    for module in model.modules():  # an exact reference needs a deterministic net
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    diags = _diagonals(problem, model, FisherType.EXACT, backend, kinds=WITH_BN)
    ggn, slices = oracle.dense_ggn_all_params(model, problem.loss_fn, problem.x, problem.y)
    expected_layers = {"0", "1", "5", "6", "8"}
    assert set(diags) == expected_layers
    for name in expected_layers:
        module = model.get_submodule(name)
        weight = torch.diagonal(ggn[slices[f"{name}.weight"], slices[f"{name}.weight"]])
        bias = torch.diagonal(ggn[slices[f"{name}.bias"], slices[f"{name}.bias"]])
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            # [gamma | beta]: one row per channel.
            assert diags[name].shape == (module.num_features, 2)
            assert_close(diags[name], torch.stack([weight, bias], dim=-1), what=name)
        else:
            mat = oracle.layer_matrix(module, weight.reshape(module.weight.shape), bias)
            assert_close(diags[name], mat, what=name)


def test_batchnorm_in_train_mode_has_no_diagonal() -> None:
    problem = P.bn_net(train=True)
    model = problem.model()
    with pytest.raises(RuntimeError, match=r"couples the samples.*\(1, 6\)|\(1, 6\).*couples"):
        _diagonals(problem, model, FisherType.EXACT, kinds=WITH_BN)


def test_batchnorm_layers_only_have_diagonal_statistics() -> None:
    model = P.bn_net(train=False).model()
    with pytest.raises(ValueError, match=r"Normalisation layers \['1', '6'\].*KRONECKER"):
        CurvatureExtractor(model, nn.CrossEntropyLoss(), stats={StatKind.KRONECKER}, kinds=WITH_BN)
    # Without the kind the BatchNorm layers are left out, as before.
    ex = CurvatureExtractor(
        model, nn.CrossEntropyLoss(), stats={StatKind.KRONECKER}, unsupported="ignore"
    )
    assert [layer.name for layer in ex.layout] == ["0", "5", "8"]


# -- BackPACK's own diagonal extensions as a second oracle -----------------------------


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("problem", [P.mlp_ce(), P.cnn_ce(), P.mlp_mse()], ids=lambda p: p.name)
def test_against_backpack_diagonal_extensions(problem: Problem) -> None:
    model = problem.model()
    exact = _diagonals(problem, model, FisherType.EXACT)
    empirical = _diagonals(problem, model, FisherType.EMPIRICAL)
    reference = extend(copy.deepcopy(model))
    loss_fn = extend(copy.deepcopy(problem.loss_fn))
    with backpack(DiagGGNExact(), SumGradSquared()):
        loss_fn(reference(problem.x), problem.y).backward()
    # SumGradSquared squares the gradients of the batch loss: (1/N)^2 per term for a mean.
    scale = problem.n if problem.loss_fn.reduction == "mean" else 1.0 / problem.n
    for name in oracle.curvature_layer_names(model):
        module = reference.get_submodule(name)
        ggn = oracle.layer_matrix(module, module.weight.diag_ggn_exact, module.bias.diag_ggn_exact)
        sgs = oracle.layer_matrix(
            module, module.weight.sum_grad_squared, module.bias.sum_grad_squared
        )
        assert_close(exact[name], ggn, what=f"{name} DiagGGNExact")
        assert_close(empirical[name], sgs * scale, what=f"{name} SumGradSquared")


# -- curvlinops as a third oracle --------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("problem", [P.mlp_ce(), P.cnn_ce()], ids=lambda p: p.name)
def test_exact_diagonal_against_curvlinops_ggn(problem: Problem) -> None:
    from tests.extract.test_oracle import GGNLinearOperator, _dense_operator, _layer_params

    model = problem.model()
    diags = _diagonals(problem, model, FisherType.EXACT)
    layers = oracle.curvature_layer_names(model)
    op = GGNLinearOperator(
        model,
        problem.loss_fn,
        _layer_params(model, layers),
        [(problem.x, problem.y)],
        check_deterministic=False,
    )
    dense = _dense_operator(op, model, layers)  # per-sample average for reduction="mean"
    for name, sl in oracle.layer_slices(model, layers).items():
        assert_close(diags[name].flatten(), torch.diagonal(dense[sl, sl]), what=name)


@pytest.mark.parametrize("backend", [Backend.AUTO, Backend.AUTOGRAD])
def test_batchnorm3d_affine_diagonal(backend: Backend) -> None:
    def make() -> nn.Module:
        return nn.Sequential(
            nn.Linear(5, 24), nn.Unflatten(1, (3, 2, 2, 2)), nn.BatchNorm3d(3), nn.Tanh(),
            nn.Flatten(), nn.Linear(24, 3),
        )  # fmt: skip

    problem = Problem("bn3d", make, nn.CrossEntropyLoss(), P._data(30, 6, 5), P._classes(31, 3, 6))
    model = problem.model()
    diags = _diagonals(problem, model, FisherType.EXACT, backend, kinds=WITH_BN)
    ggn, slices = oracle.dense_ggn_all_params(model, problem.loss_fn, problem.x, problem.y)
    weight = torch.diagonal(ggn[slices["2.weight"], slices["2.weight"]])
    bias = torch.diagonal(ggn[slices["2.bias"], slices["2.bias"]])
    assert_close(diags["2"], torch.stack([weight, bias], dim=-1), what="BatchNorm3d")
