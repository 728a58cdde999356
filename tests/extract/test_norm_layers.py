"""LayerNorm and GroupNorm affine parameters as curvature layers (``NORM_KINDS``).

Their per-sample gradients equal ``torch.func`` per-sample gradients (float64), for
normalised shapes of one and two dimensions, with and without bias, with token
positions; BackPACK has no derivatives for them, so ``Backend.AUTO`` uses autograd and
``Backend.BACKPACK`` refuses the network; approximations without a block for them
(KFAC) leave them to the fallback step as they do BatchNorm.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlib import PreconditionedOptimizer
from curvlib.approx import KFAC
from curvlib.core import CurvatureStatistics, FisherType, LayerKind, StatKind
from curvlib.core.layout import KRONECKER_KINDS, NORM_KINDS, ModelLayout
from curvlib.extract import Backend, CurvatureExtractor
from tests import oracle
from tests.extract.test_oracle import extract
from tests.problems import Problem

ALL_KINDS = KRONECKER_KINDS | NORM_KINDS


def _randomise_affine(model: nn.Module) -> nn.Module:
    """Non-trivial gamma and beta, so that a mix-up of the two columns shows."""
    gen = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm | nn.GroupNorm):
            with torch.no_grad():
                for p in module.parameters():
                    p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def layernorm_mlp() -> Problem:
    """A transformer-like MLP on 3 tokens: Linear, LayerNorm per token and over [S, h], MSE."""

    def make() -> nn.Module:
        return _randomise_affine(
            nn.Sequential(
                nn.Linear(6, 8),
                nn.LayerNorm(8),
                nn.Tanh(),
                nn.Linear(8, 5),
                nn.LayerNorm((3, 5), bias=False),
                nn.Flatten(),
                nn.Linear(15, 4),
            )
        ).double()

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 6, generator=gen).double()
    y = torch.randn(5, 4, generator=gen).double()
    return Problem("layernorm_mlp", make, nn.MSELoss(), x, y, backpack=False)


def groupnorm_cnn() -> Problem:
    """Conv-GroupNorm(2 groups)-ReLU-Conv-GroupNorm(one per channel)-Flatten-Linear, CE."""

    def make() -> nn.Module:
        return _randomise_affine(
            nn.Sequential(
                nn.Conv2d(2, 4, 3, padding=1),
                nn.GroupNorm(2, 4),
                nn.ReLU(),
                nn.Conv2d(4, 3, 3),
                nn.GroupNorm(3, 3, eps=1e-3),
                nn.Flatten(),
                nn.Linear(3 * 2 * 2, 3),
            )
        ).double()

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 2, 4, 4, generator=gen).double()
    y = torch.randint(0, 3, (4,), generator=gen)
    return Problem("groupnorm_cnn", make, nn.CrossEntropyLoss(), x, y, backpack=False)


PROBLEMS = [layernorm_mlp(), groupnorm_cnn()]
IDS = [p.name for p in PROBLEMS]


def _statistics(
    problem: Problem, model: nn.Module, fisher: FisherType, stats: set[StatKind]
) -> CurvatureStatistics:
    return extract(problem, model, Backend.AUTO, fisher, stats, kinds=ALL_KINDS)


def _norm_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm | nn.GroupNorm)]


def test_layout_has_one_row_per_normalised_feature() -> None:
    layout = ModelLayout.from_model(layernorm_mlp().model(), kinds=ALL_KINDS)
    kinds = {layer.name: (layer.kind, layer.out_dim, layer.in_dim_aug) for layer in layout}
    assert kinds["1"] == (LayerKind.LAYERNORM, 8, 2)
    assert kinds["4"] == (LayerKind.LAYERNORM, 15, 1)  # bias=False: gamma only
    layout = ModelLayout.from_model(groupnorm_cnn().model(), kinds=ALL_KINDS)
    assert {la.name: la.kind for la in layout if la.kind in NORM_KINDS} == {
        "1": LayerKind.GROUPNORM,
        "4": LayerKind.GROUPNORM,
    }
    layer = layout["1"]
    mat = layer.to_matrix(layer.weight, layer.bias)
    assert mat.shape == (4, 2)
    weight, bias = layer.from_matrix(mat)
    assert torch.equal(weight, layer.weight) and bias is not None and torch.equal(bias, layer.bias)
    # The default selection (Kronecker kinds) lists them without a block, as BatchNorm.
    default = ModelLayout.from_model(groupnorm_cnn().model())
    assert [u.name for u in default.unsupported] == ["1", "4"]
    assert all(u.reason == "no block in this approximation" for u in default.unsupported)


def test_layernorm_matrix_round_trip_of_two_dimensional_shapes() -> None:
    layer = ModelLayout.from_model(nn.Sequential(nn.LayerNorm((3, 5))), kinds=ALL_KINDS)["0"]
    gamma, beta = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mat = layer.to_matrix(gamma, beta)
    assert mat.shape == (2, 15, 2)
    assert torch.equal(mat[..., 0], gamma.flatten(1)) and torch.equal(mat[..., 1], beta.flatten(1))
    back_gamma, back_beta = layer.from_matrix(mat)
    assert torch.equal(back_gamma, gamma) and back_beta is not None
    assert torch.equal(back_beta, beta)


@pytest.mark.parametrize("problem", PROBLEMS, ids=IDS)
def test_per_sample_grads_equal_torch_func(problem: Problem) -> None:
    model = problem.model()
    grads = oracle.per_sample_grads(model, problem.loss_fn, problem.x, problem.y)
    stats = _statistics(problem, model, FisherType.EMPIRICAL, {StatKind.PER_SAMPLE_GRAD})
    for name in _norm_layers(model):
        layer = stats.layers[name].layer
        assert stats.layers[name].grads is not None
        per_sample = stats.layers[name].grads.grads  # type: ignore[union-attr]
        assert per_sample.shape == (1, problem.n, layer.out_dim, layer.in_dim_aug)
        gamma = grads[f"{name}.weight"]
        beta = grads.get(f"{name}.bias") if layer.has_bias else None
        expected = layer.to_matrix(gamma, beta)
        err = float((per_sample[0] - expected).abs().max())
        assert err <= 1e-12 * float(expected.abs().max()), (name, err)


@pytest.mark.parametrize("problem", PROBLEMS, ids=IDS)
def test_train_mode_gives_the_same_per_sample_grads(problem: Problem) -> None:
    """LayerNorm and GroupNorm normalise each sample alone: no coupling in train mode."""
    model = problem.model()
    kinds = {StatKind.PER_SAMPLE_IO}
    evaluated = _statistics(problem, model, FisherType.EXACT, kinds)
    trained = _statistics(problem, model.train(), FisherType.EXACT, kinds)
    for name in _norm_layers(model):
        a, b = evaluated.layers[name].grads, trained.layers[name].grads
        assert a is not None and b is not None and evaluated.layers[name].io is None
        assert torch.equal(a.grads, b.grads), name


@pytest.mark.parametrize("problem", PROBLEMS, ids=IDS)
def test_diagonal_equals_the_oracle_ggn_diagonal(problem: Problem) -> None:
    model = problem.model()
    ggn, slices = oracle.dense_ggn_all_params(model, problem.loss_fn, problem.x, problem.y)
    stats = _statistics(problem, model, FisherType.EXACT, {StatKind.DIAGONAL})
    for name in _norm_layers(model):
        layer = stats.layers[name].layer
        diag = ggn.diagonal()
        shape = layer.weight.shape
        gamma = diag[slices[f"{name}.weight"]].reshape(shape)
        beta = diag[slices[f"{name}.bias"]].reshape(shape) if layer.has_bias else None
        expected = layer.to_matrix(gamma, beta)
        actual = stats.layers[name].diagonal
        assert actual is not None
        assert float((actual - expected).abs().max()) <= 1e-12 * float(expected.abs().max())


def test_backends_auto_uses_autograd_and_backpack_refuses() -> None:
    problem = layernorm_mlp()
    model = problem.model()
    with pytest.raises(ValueError, match=r"no derivatives for: .*1 \(LayerNorm\)"):
        CurvatureExtractor(model, problem.loss_fn, stats={StatKind.PER_SAMPLE_GRAD},
                           kinds=ALL_KINDS, backend=Backend.BACKPACK)  # fmt: skip
    cnn = groupnorm_cnn()
    with pytest.raises(ValueError, match=r"1 \(GroupNorm\)"):
        CurvatureExtractor(cnn.model(), cnn.loss_fn, stats={StatKind.KRONECKER},
                           backend=Backend.BACKPACK, unsupported="ignore")  # fmt: skip
    # Kronecker statistics of the other layers under AUTO: autograd, no error.
    ex = CurvatureExtractor(model, problem.loss_fn, stats={StatKind.KRONECKER},
                            unsupported="ignore")  # fmt: skip
    with ex.collect():
        problem.loss_fn(model(problem.x), problem.y).backward()
    assert set(ex.statistics().layers) == {"0", "3", "6"}


def test_norm_layers_without_per_sample_statistics_are_refused() -> None:
    problem = groupnorm_cnn()
    with pytest.raises(ValueError, match=r"Normalisation layers \['1', '4'\].*GROUPNORM"):
        CurvatureExtractor(problem.model(), problem.loss_fn, stats={StatKind.KRONECKER},
                           kinds=ALL_KINDS)  # fmt: skip


def test_kfac_leaves_layernorm_to_the_fallback_step() -> None:
    problem = layernorm_mlp()
    model = problem.model()
    with pytest.warns(UserWarning, match=r"1 \(LayerNorm\)"):
        opt = PreconditionedOptimizer(model, KFAC(), loss_fn=problem.loss_fn)
    assert [layer.name for layer in opt.extractor.layout] == ["0", "3", "6"]
    assert "1 (LayerNorm): no block in this approximation" in opt.describe()
