"""The wide-network family against dense float64 references from the oracle.

Block-tridiagonal natural gradient equals the dense damped solve with the oracle's GGN
restricted to neighbouring blocks; its singular cases are refused with a message that
says why. The function-space forms equal the parameter-space damped solves (and, at
damping 0, the minimum-norm solves): KFAC in each damping mode, unit-wise NG; the
residual helper reproduces autograd's gradient; at their optimal learning rates the
undamped forms reach the targets of a wide network in one step.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from torch import Tensor, nn

from curvlib import PreconditionedOptimizer
from curvlib.approx.kfac import KFAC, KFACDamping
from curvlib.approx.learning_rates import optimal_learning_rate
from curvlib.approx.natural_gradient import ExactNaturalGradient
from curvlib.approx.unitwise import UnitWiseNaturalGradient
from curvlib.approx.wide import (
    BlockTridiagonalNaturalGradient,
    FunctionSpaceForm,
    function_space_direction,
    sample_rows,
)
from curvlib.core import CurvatureApprox, CurvatureStatistics, FisherType, Preconditioner, StatKind
from curvlib.core.layout import NORM_KINDS
from curvlib.extract import CurvatureExtractor, UnsupportedPolicy
from curvlib.extract.residual import sample_space_residual
from curvlib.linalg.factors import FactorizationError
from curvlib.linalg.tridiagonal import TridiagonalKernel, pattern_matrix
from curvlib.linalg.woodbury import DenseRows
from tests import oracle
from tests import problems as P
from tests.approx.cases import fit_statistics
from tests.approx.test_natural_gradient import _close
from tests.extract.test_norm_layers import groupnorm_cnn, layernorm_mlp
from tests.problems import Problem

NORM_PROBLEMS = [layernorm_mlp(), groupnorm_cnn()]

DAMPING = 1e-2
PROBLEMS = [P.mlp_ce(), P.cnn_ce(), P.tconv_bce()]
PROBLEM_IDS = [p.name for p in PROBLEMS]


def _statistics(problem: Problem, model: nn.Module | None = None) -> CurvatureStatistics:
    model = problem.model() if model is None else model
    ex = CurvatureExtractor(
        model,
        problem.loss_fn,
        stats={StatKind.PER_SAMPLE_IO},
        fisher_type=FisherType.EXACT,
        unsupported=UnsupportedPolicy.IGNORE,
    )
    with ex.collect():
        problem.loss_fn(model(problem.x), problem.y).backward()
    return ex.statistics()


def _tridiagonal_mask(dense: Tensor, slices: dict[str, slice]) -> Tensor:
    """``dense`` with the blocks of non-neighbouring layers set to zero."""
    out = dense.clone()
    spans = list(slices.values())
    for i, rows in enumerate(spans):
        for j, cols in enumerate(spans):
            if abs(i - j) > 1:
                out[rows, cols] = 0.0
    return out


@functools.cache
def _fixture(index: int) -> tuple[CurvatureStatistics, Tensor]:
    """Statistics and the oracle's block-tridiagonal GGN of ``PROBLEMS[index]``."""
    problem = PROBLEMS[index]
    model = problem.model()
    dense = oracle.dense_ggn(model, problem.loss_fn, problem.x, problem.y)
    return _statistics(problem), _tridiagonal_mask(dense, oracle.layer_slices(model))


def _random(stats: CurvatureStatistics, seed: int, lead: tuple[int, ...] = ()) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(*lead, s.layer.out_dim, s.layer.in_dim_aug, generator=gen).double()
        for name, s in stats.layers.items()
    }


def _flat(vectors: dict[str, Tensor], order: tuple[str, ...]) -> Tensor:
    return torch.cat([vectors[name].flatten(-2) for name in order], dim=-1)


def _damped_solve(dense: Tensor, vectors: Tensor, damping: float = DAMPING) -> Tensor:
    """``(dense + damping I)^{-1}`` applied to the rows of ``vectors`` ``[..., P]``."""
    damped = dense + damping * torch.eye(dense.shape[0], dtype=dense.dtype)
    return torch.linalg.solve(damped, vectors.unsqueeze(-1)).squeeze(-1)


def _tridiagonal(stats: CurvatureStatistics) -> BlockTridiagonalNaturalGradient:
    approx = BlockTridiagonalNaturalGradient()
    approx.update(stats)
    return approx


# -- block-tridiagonal natural gradient --------------------------------------------------


@pytest.mark.parametrize("index", range(len(PROBLEMS)), ids=PROBLEM_IDS)
def test_tridiagonal_fisher_equals_oracle_neighbour_blocks(index: int) -> None:
    stats, dense = _fixture(index)
    approx = _tridiagonal(stats)
    assert isinstance(approx, CurvatureApprox)
    _close(approx.to_dense_full(), dense, "F_tri")
    vectors = _random(stats, seed=0, lead=(2,))
    product = approx.matvec(vectors)
    _close(_flat(product, approx.layers), _flat(vectors, approx.layers) @ dense, "matvec")


@pytest.mark.parametrize("index", range(len(PROBLEMS)), ids=PROBLEM_IDS)
def test_tridiagonal_inverse_equals_dense_damped_solve(index: int) -> None:
    stats, dense = _fixture(index)
    approx = _tridiagonal(stats)
    vectors = _random(stats, seed=1, lead=(3,))
    inverse = approx.inverse(DAMPING)
    assert isinstance(inverse, Preconditioner)
    applied = inverse.apply(vectors)
    assert list(applied) == list(vectors) and inverse.condition_numbers == {}
    expected = _damped_solve(dense, _flat(vectors, approx.layers))
    _close(_flat(applied, approx.layers), expected, "tridiagonal inverse", rtol=1e-8)


def test_tridiagonal_fisher_is_indefinite_and_a_singular_damping_is_refused() -> None:
    """F_tri of three layers has a negative eigenvalue; damping by minus it is singular."""
    stats, dense = _fixture(0)
    values = torch.linalg.eigvalsh(dense)
    assert float(values[0]) < -1e-6 * float(values[-1])
    approx = _tridiagonal(stats)
    with pytest.raises(FactorizationError, match="indefinite"):
        approx.inverse(-float(values[0]))
    approx.inverse(-float(values[0]) * 1.5)  # a regular damping nearby is accepted


def test_undamped_tridiagonal_system_of_two_layers_is_refused_naming_the_pattern() -> None:
    gen = torch.Generator().manual_seed(0)
    blocks = [DenseRows(torch.randn(4, 3, 5, generator=gen).double()) for _ in range(2)]
    with pytest.raises(FactorizationError, match="L \\+ 1 is a multiple of 3"):
        TridiagonalKernel(blocks, 0.0)
    # Three layers: T is regular, and so is the undamped system.
    TridiagonalKernel([*blocks, DenseRows(torch.randn(4, 2, 7, generator=gen).double())], 0.0)


def test_tridiagonal_of_two_layers_is_the_exact_natural_gradient() -> None:
    problem = P.mlp_ce()
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    stats = _statistics(problem, model)
    exact = ExactNaturalGradient()
    exact.update(stats)
    vectors = _random(stats, seed=2)
    tri = _tridiagonal(stats).inverse(DAMPING).apply(vectors)
    full = exact.inverse(DAMPING).apply(vectors)
    for name in vectors:
        _close(tri[name], full[name], f"two layers: {name}")


def test_tridiagonal_refuses_bad_input() -> None:
    stats, _ = _fixture(0)
    approx = _tridiagonal(stats)
    for damping in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="damping must be positive"):
            approx.inverse(damping)
    vectors = _random(stats, seed=0)
    vectors.pop(next(iter(vectors)))
    with pytest.raises(KeyError, match="couples all layers"):
        approx.inverse(DAMPING).apply(vectors)
    with pytest.raises(TypeError, match="indefinite"):
        approx.sample(DAMPING)
    with pytest.raises(TypeError, match="indefinite"):
        approx.logdet(DAMPING)


def test_tridiagonal_steps_the_optimizer_by_its_damped_inverse() -> None:
    """One step of PreconditionedOptimizer moves by -lr (F_tri + damping I)^{-1} g."""
    problem = P.mlp_mse()
    model = problem.model()
    opt = PreconditionedOptimizer(
        model,
        approx=BlockTridiagonalNaturalGradient(),
        loss_fn=problem.loss_fn,
        fisher_type=FisherType.EXACT,
        lr=0.1,
        damping=0.1,
        t_cov=1,
        t_inv=1,
        kl_clip=None,
        momentum=0.0,
        stats_fraction=1.0,
    )
    layers = {layer.name: layer for layer in opt.group_layers[0]}
    before = {n: layer.to_matrix(*layer.parameters).detach().clone() for n, layer in layers.items()}
    opt.zero_grad()
    with opt.record():
        loss = problem.loss_fn(model(problem.x), problem.y)
        loss.backward()
    grads = {name: layer.grad_matrix() for name, layer in layers.items()}
    opt.step()
    assert opt.skipped_steps == 0
    expected = _tridiagonal(_statistics(problem)).inverse(0.1).apply(grads)
    for name, layer in layers.items():
        moved = layer.to_matrix(*layer.parameters).detach() - before[name]
        _close(moved, -0.1 * expected[name], f"optimizer step of {name}", rtol=1e-8)
    with torch.no_grad():
        assert float(problem.loss_fn(model(problem.x), problem.y)) < float(loss)


# -- function-space forms ----------------------------------------------------------------


def _tanh_net(widths: tuple[int, ...], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i + 2 < len(widths):
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).double()


def _small(name: str, loss_fn: nn.Module, y: Tensor) -> Problem:
    """A Tanh MLP 4-9-8-3 on three samples: more parameters per layer than rows."""
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).double()
    y = y.double() if y.is_floating_point() else y
    return Problem(name, lambda: _tanh_net((4, 9, 8, 3)), loss_fn, x, y)


SMALL = {
    "mse": _small(
        "small_mse", nn.MSELoss(), torch.randn(3, 3, generator=torch.Generator().manual_seed(2))
    ),
    "ce": _small("small_ce", nn.CrossEntropyLoss(reduction="sum"), torch.tensor([0, 2, 1])),
    "bce": _small(
        "small_bce",
        nn.BCEWithLogitsLoss(),
        torch.rand(3, 3, generator=torch.Generator().manual_seed(2)),
    ),
    "cnn_ce": P.cnn_ce(),
}


NGD_FORMS = [
    FunctionSpaceForm.EXACT,
    FunctionSpaceForm.BLOCK_DIAGONAL,
    FunctionSpaceForm.BLOCK_TRIDIAGONAL,
]
"""The forms that invert (a block pattern of) the Fisher itself."""


def _dense_form(dense: Tensor, slices: dict[str, slice], form: FunctionSpaceForm) -> Tensor:
    if form is FunctionSpaceForm.EXACT:
        return dense
    if form is FunctionSpaceForm.BLOCK_TRIDIAGONAL:
        return _tridiagonal_mask(dense, slices)
    out = torch.zeros_like(dense)
    for span in slices.values():
        out[span, span] = dense[span, span]
    return out


@pytest.mark.parametrize("loss", list(SMALL))
def test_residual_reproduces_the_gradient(loss: str) -> None:
    problem = SMALL[loss]
    model = problem.model()
    output = model(problem.x)
    residual = sample_space_residual(problem.loss_fn, output, problem.y)
    stats = _statistics(problem, model)
    model.zero_grad()
    problem.loss_fn(model(problem.x), problem.y).backward()
    for name, rows in sample_rows(stats).items():
        grad = stats.layers[name].layer.grad_matrix()
        _close(rows.expand(residual.residual.reshape(-1)), grad, f"g = U^T r, {name}")
        if residual.null_space is not None:
            null = residual.null_space.reshape(-1)
            assert float(rows.expand(null).abs().max()) < 1e-12 * float(rows.dense().abs().max())


@pytest.mark.parametrize("loss", list(SMALL))
@pytest.mark.parametrize("form", NGD_FORMS, ids=lambda f: f.value)
@pytest.mark.parametrize("damping", [DAMPING, 0.0], ids=["damped", "undamped"])
def test_function_space_equals_parameter_space_solve(
    loss: str, form: FunctionSpaceForm, damping: float
) -> None:
    problem = SMALL[loss]
    model = problem.model()
    residual = sample_space_residual(problem.loss_fn, model(problem.x), problem.y)
    stats = _statistics(problem, model)
    if form is FunctionSpaceForm.BLOCK_TRIDIAGONAL and damping == 0.0 and len(stats.layers) == 2:
        with pytest.raises(FactorizationError, match="multiple of 3"):
            function_space_direction(stats, residual.residual, 0.0, form, residual.null_space)
        return
    direction = function_space_direction(
        stats, residual.residual, damping, form, null_space=residual.null_space
    )
    dense = oracle.dense_ggn(model, problem.loss_fn, problem.x, problem.y)
    slices = oracle.layer_slices(model)
    fisher = _dense_form(dense, slices, form)
    order = tuple(stats.layers)
    grad = _flat({n: s.layer.grad_matrix() for n, s in stats.layers.items()}, order)
    if damping > 0:
        expected = _damped_solve(fisher, grad, damping)
    else:
        expected = torch.linalg.pinv(fisher) @ grad
    _close(_flat(direction, order), expected, f"{form.value}, damping {damping}", rtol=1e-7)


def test_residual_refuses_what_has_no_residual() -> None:
    logits = torch.zeros(2, 3, 4).double()
    with pytest.raises(ValueError, match="no spatial dimensions"):
        sample_space_residual(nn.CrossEntropyLoss(), logits, torch.zeros(2, 4, dtype=torch.long))
    saturated = torch.tensor([[800.0, 0.0]]).double()
    with pytest.raises(ValueError, match="underflow"):
        sample_space_residual(nn.CrossEntropyLoss(), saturated, torch.tensor([0]))


def test_function_space_refuses_what_it_cannot_do() -> None:
    problem = SMALL["mse"]
    stats = _statistics(problem)
    with pytest.raises(ValueError, match="K \\* N"):
        function_space_direction(stats, torch.zeros(5).double())
    with pytest.raises(ValueError, match="non-negative"):
        function_space_direction(stats, torch.zeros(9).double(), damping=-1.0)
    # 10 parameters and 18 rows: the kernel is singular, damping 0 is refused.
    model = nn.Sequential(nn.Linear(4, 2)).double()
    x, y = problem.x.repeat(3, 1), torch.zeros(9, 2).double()
    many_rows = Problem("tiny", lambda: model, nn.MSELoss(), x, y)
    with pytest.raises(FactorizationError, match="damping > 0"):
        function_space_direction(_statistics(many_rows, model), torch.ones(18).double())


def test_optimal_learning_rates() -> None:
    assert optimal_learning_rate(FunctionSpaceForm.EXACT, 7) == 1.0
    assert optimal_learning_rate("block_diagonal", 4) == 0.25
    assert optimal_learning_rate(FunctionSpaceForm.BLOCK_TRIDIAGONAL, 3) == pytest.approx(1.0)
    assert optimal_learning_rate(FunctionSpaceForm.BLOCK_TRIDIAGONAL, 4) == pytest.approx(0.5)
    for layers in (1, 6, 7, 9):
        ones = torch.ones(layers).double()
        alpha = ones @ torch.linalg.solve(pattern_matrix(layers), ones)
        assert optimal_learning_rate("block_tridiagonal", layers) == pytest.approx(1 / alpha)
    with pytest.raises(ValueError, match="multiple of 3"):
        optimal_learning_rate(FunctionSpaceForm.BLOCK_TRIDIAGONAL, 5)
    with pytest.raises(ValueError, match="positive int"):
        optimal_learning_rate(FunctionSpaceForm.EXACT, 0)


def _wide_relu(width: int, seed: int = 0) -> nn.Module:
    """A 3-layer ReLU MLP at He initialisation (zero biases): outputs of order one."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2)
    ).double()
    for index, layer in enumerate([model[0], model[2], model[4]]):
        gain = 2.0 if index < 2 else 1.0
        nn.init.normal_(layer.weight, std=(gain / layer.in_features) ** 0.5)
        nn.init.zeros_(layer.bias)
    return model


def test_optimal_learning_rates_reach_the_targets_of_a_wide_network_in_one_step() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 8, generator=gen).double()
    x = x / x.norm(dim=1, keepdim=True) * 8**0.5
    y = torch.randn(8, 2, generator=gen).double()
    loss_fn = nn.MSELoss()
    reductions: dict[str, float] = {}
    for form in [*NGD_FORMS, 0.01, 0.1, 1.0]:
        model = _wide_relu(512)
        problem = Problem("wide", lambda model=model: model, loss_fn, x, y)
        before = float(loss_fn(model(x), y).detach())
        if isinstance(form, float):  # gradient descent at a few learning rates
            model.zero_grad()
            loss_fn(model(x), y).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= form * p.grad
        else:
            assert isinstance(form, FunctionSpaceForm)
            residual = sample_space_residual(loss_fn, model(x), y)
            stats = _statistics(problem, model)
            step = function_space_direction(stats, residual.residual, 0.0, form)
            lr = optimal_learning_rate(form, len(step))
            with torch.no_grad():
                for name, s in stats.layers.items():
                    weight, bias = s.layer.from_matrix(step[name])
                    s.layer.weight.sub_(lr * weight)
                    assert bias is not None and s.layer.bias is not None
                    s.layer.bias.sub_(lr * bias)
        reductions[str(form)] = before / float(loss_fn(model(x), y).detach())
    for form in NGD_FORMS:
        assert reductions[str(form)] >= 100.0, reductions
    assert all(reductions[str(lr)] < 100.0 for lr in (0.01, 0.1, 1.0)), reductions


# -- K-FAC in function space ------------------------------------------------------------


@pytest.mark.parametrize("loss", list(SMALL))
@pytest.mark.parametrize("damping", [DAMPING, 0.0], ids=["damped", "undamped"])
@pytest.mark.parametrize("mode", list(KFACDamping), ids=lambda m: m.value)
def test_kfac_function_space_equals_parameter_space_kfac(
    loss: str, damping: float, mode: KFACDamping
) -> None:
    """The KFAC form is KFAC(mode) on the same batch; at damping 0 it is G^+ grad A^+."""
    problem = SMALL[loss]
    model = problem.model()
    residual = sample_space_residual(problem.loss_fn, model(problem.x), problem.y)
    stats = _statistics(problem, model)
    grads = {name: s.layer.grad_matrix().clone() for name, s in stats.layers.items()}
    kfac = KFAC(damping_mode=mode)
    kfac.update(fit_statistics(problem, kfac, FisherType.EXACT, model=model))
    direction = function_space_direction(
        stats, residual.residual, damping, FunctionSpaceForm.KFAC, kfac_damping=mode
    )
    assert list(direction) == list(grads)
    for name, grad in grads.items():
        if damping > 0:
            expected = kfac.inverse(damping).apply({name: grad})[name]
            _close(direction[name], expected, f"KFAC form of {name}", rtol=1e-10)
        else:
            block = kfac.blocks[name].state_dict()
            expected = torch.linalg.pinv(block["G"]) @ grad @ torch.linalg.pinv(block["A"])
            # Pseudo-inverses of 3-sample kernels: their conditioning enters.
            _close(direction[name], expected, f"undamped KFAC form of {name}", rtol=1e-8)


def _wide_kfac_problem(width: int) -> tuple[nn.Module, Tensor, Tensor]:
    """20 samples of dimension 24 (more than N: the input kernel is regular), 2 outputs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 24, generator=gen).double()
    x = x / x.norm(dim=1, keepdim=True) * 24**0.5
    y = torch.randn(20, 2, generator=gen).double()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(24, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2)
    ).double()
    for index, layer in enumerate([model[0], model[2], model[4]]):
        nn.init.normal_(layer.weight, std=((2.0 if index < 2 else 1.0) / layer.in_features) ** 0.5)
        nn.init.zeros_(layer.bias)
    return model, x, y


def _kfac_step(
    model: nn.Module, x: Tensor, y: Tensor
) -> tuple[CurvatureStatistics, dict[str, Tensor], Tensor]:
    loss_fn = nn.MSELoss()
    residual = sample_space_residual(loss_fn, model(x), y).residual
    stats = _statistics(Problem("wide_kfac", lambda: model, loss_fn, x, y), model)
    return stats, function_space_direction(stats, residual, 0.0, FunctionSpaceForm.KFAC), residual


def test_kfac_moves_the_linearised_outputs_isotropically() -> None:
    """U dtheta = (N (L - 1) + 1) r exactly, at a finite width with regular kernels."""
    model, x, y = _wide_kfac_problem(256)
    stats, step, residual = _kfac_step(model, x, y)
    rows = sample_rows(stats)
    moved = sum(rows[name].project(step[name]) for name in rows)
    rate = optimal_learning_rate(FunctionSpaceForm.KFAC, num_layers=3, num_samples=20)
    assert rate == 1 / 41
    _close(moved, residual.reshape(-1) / rate, "K-FAC's change of the outputs", rtol=1e-10)


def _best_factor(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    stats: CurvatureStatistics,
    step: dict[str, Tensor],
    rate: float,
) -> tuple[float, float]:
    """The factor in [0.5, 1.5] of ``rate`` whose step minimises the MSE, and the gain at ``rate``.

    The model is left at the step of the last factor tried.
    """
    layers = {name: s.layer for name, s in stats.layers.items()}
    deltas = {name: layers[name].from_matrix(step[name]) for name in layers}
    start = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in layers.items()}

    def loss_at(lr: float) -> float:
        with torch.no_grad():
            for name, layer in layers.items():
                (weight, bias), (w0, b0) = deltas[name], start[name]
                assert bias is not None and layer.bias is not None
                layer.weight.copy_(w0 - lr * weight)
                layer.bias.copy_(b0 - lr * bias)
            return float(nn.MSELoss()(model(x), y))

    initial = loss_at(0.0)
    factors = torch.linspace(0.5, 1.5, 51).tolist()
    losses = [loss_at(rate * f) for f in factors]
    best = factors[min(range(len(losses)), key=losses.__getitem__)]
    return best, initial / loss_at(rate)


def test_kfac_optimal_learning_rate_is_the_best_on_a_wide_network() -> None:
    """At width 2048 the loss-minimising learning rate of one step is within 10% of the helper's.

    The authors' code's 1/(NL) = 1/60 is 0.68 of the helper's 1/41, far outside it.
    """
    model, x, y = _wide_kfac_problem(2048)
    stats, step, _ = _kfac_step(model, x, y)
    rate = optimal_learning_rate("kfac", num_layers=len(step), num_samples=20)
    best, gain = _best_factor(model, x, y, stats, step, rate)
    assert abs(best - 1.0) <= 0.1, best
    assert gain >= 100.0, gain


def test_kfac_learning_rate_needs_the_batch_size() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        optimal_learning_rate(FunctionSpaceForm.KFAC, 3)
    assert optimal_learning_rate("kfac", 1, 7) == 1.0


def test_kfac_form_is_pi_damped_by_default_and_refuses_a_damping_mode_elsewhere() -> None:
    problem = SMALL["mse"]
    model = problem.model()
    residual = sample_space_residual(problem.loss_fn, model(problem.x), problem.y).residual
    stats = _statistics(problem, model)
    default = function_space_direction(stats, residual, DAMPING, FunctionSpaceForm.KFAC)
    pi = function_space_direction(stats, residual, DAMPING, "kfac", kfac_damping="pi")
    sqrt = function_space_direction(stats, residual, DAMPING, "kfac", kfac_damping="sqrt")
    for name in default:
        assert torch.equal(default[name], pi[name])
        assert not torch.allclose(default[name], sqrt[name], rtol=1e-6)
    with pytest.raises(ValueError, match=r"kfac_damping applies to form=FunctionSpaceForm\.KFAC"):
        function_space_direction(stats, residual, DAMPING, "exact", kfac_damping="pi")


# -- unit-wise natural gradient in function space ----------------------------------------


UNIT_PROBLEMS = [*SMALL.values(), *NORM_PROBLEMS]


@pytest.mark.parametrize("problem", UNIT_PROBLEMS, ids=lambda p: p.name)
@pytest.mark.parametrize("damping", [DAMPING, 0.0], ids=["damped", "undamped"])
def test_unit_wise_function_space_equals_parameter_space(problem: Problem, damping: float) -> None:
    """UNIT_WISE is UnitWiseNaturalGradient's damped step; at damping 0 each row is F_o^+ g_o.

    For Linear, Conv2d, LayerNorm and GroupNorm layers, under MSE, BCE and cross-entropy.
    """
    model = problem.model()
    residual = sample_space_residual(problem.loss_fn, model(problem.x), problem.y)
    approx = UnitWiseNaturalGradient()
    stats = fit_statistics(problem, approx, FisherType.EXACT, model=model)
    model.zero_grad()
    problem.loss_fn(model(problem.x), problem.y).backward()
    grads = {name: s.layer.grad_matrix().clone() for name, s in stats.layers.items()}
    approx.update(stats)
    direction = function_space_direction(
        stats, residual.residual, damping, FunctionSpaceForm.UNIT_WISE
    )
    assert list(direction) == list(grads)
    for name, grad in grads.items():
        if damping > 0:
            expected = approx.inverse(damping).apply({name: grad})[name]
            _close(direction[name], expected, f"unit-wise form of {name}", rtol=1e-10)
        else:
            blocks = approx.blocks[name].state_dict()["fisher"]
            expected = torch.einsum("oij,oj->oi", torch.linalg.pinv(blocks, hermitian=True), grad)
            _close(direction[name], expected, f"undamped unit-wise form of {name}", rtol=1e-8)


def _wide_unit_problem(
    width: int, outputs: int = 1, activation: type[nn.Module] = nn.ReLU
) -> tuple[nn.Module, Tensor, Tensor]:
    """20 samples of dimension 24 (regular input kernel), a 3-layer MLP, ``outputs`` outputs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 24, generator=gen).double()
    x = x / x.norm(dim=1, keepdim=True) * 24**0.5
    y = torch.randn(20, outputs, generator=gen).double()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(24, width), activation(), nn.Linear(width, width), activation(),
        nn.Linear(width, outputs),
    ).double()  # fmt: skip
    for index, layer in enumerate([model[0], model[2], model[4]]):
        nn.init.normal_(layer.weight, std=((2.0 if index < 2 else 1.0) / layer.in_features) ** 0.5)
        nn.init.zeros_(layer.bias)
    return model, x, y


def _unit_wise_step(
    model: nn.Module, x: Tensor, y: Tensor, damping: float = 0.0
) -> tuple[CurvatureStatistics, dict[str, Tensor], Tensor]:
    loss_fn = nn.MSELoss()
    residual = sample_space_residual(loss_fn, model(x), y).residual
    stats = _statistics(Problem("wide_unit", lambda: model, loss_fn, x, y), model)
    step = function_space_direction(stats, residual, damping, FunctionSpaceForm.UNIT_WISE)
    return stats, step, residual.reshape(-1)


def _moved(stats: CurvatureStatistics, step: dict[str, Tensor]) -> Tensor:
    """The change of the linearised outputs, U dtheta."""
    rows = sample_rows(stats)
    return torch.stack([rows[name].project(step[name]) for name in rows]).sum(0)


def test_unit_wise_moves_the_outputs_of_a_tanh_network_by_the_number_of_units() -> None:
    """One output, tanh units (no zero derivative): U dtheta = ((L - 1) M + 1) r exactly."""
    model, x, y = _wide_unit_problem(64, activation=nn.Tanh)
    stats, step, residual = _unit_wise_step(model, x, y)
    rate = optimal_learning_rate(FunctionSpaceForm.UNIT_WISE, num_layers=3, width=64)
    assert rate == 1 / 129
    _close(_moved(stats, step), residual / rate, "unit-wise change of the outputs", rtol=1e-8)


def test_unit_wise_moves_each_output_by_one_plus_its_active_relu_units() -> None:
    """One output, ReLU: sample n moves by 1 + (hidden units active on n), about M + 1."""
    model, x, y = _wide_unit_problem(256)
    stats, step, residual = _unit_wise_step(model, x, y)
    hidden = list(stats.layers.values())[:-1]
    active = sum((s.io.output_grads[0, :, 0] != 0).sum(-1) for s in hidden if s.io is not None)
    alpha = 1.0 + torch.as_tensor(active, dtype=torch.float64)
    _close(_moved(stats, step), alpha * residual, "per-sample unit counts", rtol=1e-8)
    predicted = 1 / optimal_learning_rate("unit_wise", 3, width=256, active_fraction=0.5)
    assert abs(float(alpha.mean()) / predicted - 1.0) < 0.1, (alpha, predicted)


@pytest.mark.parametrize("outputs", [1, 2])
def test_unit_wise_optimal_learning_rate_is_the_best_on_a_wide_relu_network(outputs: int) -> None:
    """Width 2048: the loss-minimising learning rate of one step is within 10% of the helper's.

    With a damping of 1e-6 (about 3e-4 of the first layer's kernels' scale): undamped,
    the few units whose derivative to the output nearly vanishes get steps that the
    linearisation does not follow (measured: best factor at the scan's end, 0.5).
    """
    model, x, y = _wide_unit_problem(2048, outputs)
    stats, step, _ = _unit_wise_step(model, x, y, damping=1e-6)
    rate = optimal_learning_rate(
        "unit_wise", len(step), width=2048, active_fraction=0.5, num_outputs=outputs
    )
    best, gain = _best_factor(model, x, y, stats, step, rate)
    assert abs(best - 1.0) <= 0.1, best
    assert gain >= 100.0, gain


def test_unit_wise_learning_rate_needs_the_width() -> None:
    with pytest.raises(ValueError, match="width"):
        optimal_learning_rate(FunctionSpaceForm.UNIT_WISE, 3)
    with pytest.raises(ValueError, match="active_fraction"):
        optimal_learning_rate("unit_wise", 3, width=8, active_fraction=0.0)
    with pytest.raises(ValueError, match="num_outputs"):
        optimal_learning_rate("unit_wise", 3, width=8, num_outputs=0)
    assert optimal_learning_rate("unit_wise", 1, width=8) == 1.0


# -- unit-wise natural gradient ----------------------------------------------------------


@pytest.mark.parametrize("index", range(len(PROBLEMS)), ids=PROBLEM_IDS)
@pytest.mark.parametrize("fisher", [FisherType.EXACT, FisherType.EMPIRICAL], ids=lambda f: f.value)
def test_unit_blocks_equal_the_dense_per_unit_fisher_blocks(index: int, fisher: FisherType) -> None:
    """Each unit's block is the oracle's block of that row of [W | b], for every layer kind."""
    problem = PROBLEMS[index]
    model = problem.model()
    if fisher is FisherType.EXACT:
        dense = oracle.dense_ggn(model, problem.loss_fn, problem.x, problem.y)
    else:
        dense = oracle.dense_empirical_fisher(model, problem.loss_fn, problem.x, problem.y)
    approx = UnitWiseNaturalGradient()
    stats = fit_statistics(problem, approx, fisher, model=model)
    approx.update(stats)
    for name, span in oracle.layer_slices(model).items():
        block = approx.blocks[name]
        layer_dense = dense[span, span]
        width = block.in_dim
        expected = torch.zeros_like(layer_dense)
        for unit in range(block.out_dim):
            rows = slice(unit * width, (unit + 1) * width)
            expected[rows, rows] = layer_dense[rows, rows]
        _close(approx.to_dense(name), expected, f"unit blocks of {name}")
        vectors = _random(stats, seed=3, lead=(2,))
        applied = approx.inverse(DAMPING).apply({name: vectors[name]})[name]
        solved = _damped_solve(expected, vectors[name].flatten(-2))
        _close(applied.flatten(-2), solved, f"unit-wise inverse of {name}")


def test_unit_wise_covers_eval_batchnorm_with_its_per_channel_blocks() -> None:
    """BatchNorm's [gamma_c | beta_c] blocks equal the oracle's, and the optimizer steps them."""
    problem = P.bn_net(train=False)
    model = problem.model()  # in eval mode: Dropout is the identity
    opt = PreconditionedOptimizer(
        model,
        UnitWiseNaturalGradient(),
        loss_fn=problem.loss_fn,
        fisher_type=FisherType.EXACT,
        lr=0.5,
        damping=DAMPING,
        kl_clip=None,
        max_move=None,
        momentum=0.0,
        t_cov=1,
        t_inv=1,
        stats_fraction=1.0,
    )
    assert [layer.name for layer in opt.extractor.layout] == ["0", "1", "5", "6", "8"]
    ggn, slices = oracle.dense_ggn_all_params(model, problem.loss_fn, problem.x, problem.y)
    gammas = {bn: model.get_parameter(f"{bn}.weight") for bn in ("1", "6")}
    before = {bn: gamma.detach().clone() for bn, gamma in gammas.items()}
    with opt.record():
        problem.loss_fn(model(problem.x), problem.y).backward()
    grads = dict(model.named_parameters())
    rhs = {
        bn: torch.stack([grads[f"{bn}.weight"].grad, grads[f"{bn}.bias"].grad], dim=-1)  # type: ignore[list-item]
        for bn in gammas
    }
    opt.step()
    approx = opt.engine.approx
    assert isinstance(approx, UnitWiseNaturalGradient)
    for bn in ("1", "6"):
        gamma, beta = slices[f"{bn}.weight"], slices[f"{bn}.bias"]
        channels = gamma.stop - gamma.start
        expected = torch.zeros(channels, 2, 2, dtype=torch.float64)
        for c in range(channels):
            idx = [gamma.start + c, beta.start + c]
            expected[c] = ggn[idx][:, idx]
        blocks = approx.blocks[bn].state_dict()["fisher"]
        _close(blocks, expected, f"BatchNorm {bn} blocks")
        step = _damped_solve(torch.block_diag(*expected), rhs[bn].flatten()).reshape(-1, 2)
        moved = gammas[bn].detach() - before[bn]
        _close(moved, -0.5 * step[:, 0], f"BatchNorm {bn} step")


@pytest.mark.parametrize("problem", NORM_PROBLEMS, ids=lambda p: p.name)
def test_unit_wise_blocks_of_layernorm_and_groupnorm_equal_the_oracle(problem: Problem) -> None:
    """Each feature's [gamma_e | beta_e] block is the oracle's; the step solves with them."""
    model = problem.model()
    opt = PreconditionedOptimizer(
        model, UnitWiseNaturalGradient(), loss_fn=problem.loss_fn, fisher_type=FisherType.EXACT,
        lr=0.5, damping=DAMPING, kl_clip=None, max_move=None, momentum=0.0, t_cov=1, t_inv=1,
        stats_fraction=1.0, unsupported="raise",
    )  # fmt: skip
    norms = {la.name: la for la in opt.extractor.layout if la.kind in NORM_KINDS}
    assert len(norms) == 2
    ggn, slices = oracle.dense_ggn_all_params(model, problem.loss_fn, problem.x, problem.y)
    before = {name: la.to_matrix(*la.parameters).detach().clone() for name, la in norms.items()}
    with opt.record():
        problem.loss_fn(model(problem.x), problem.y).backward()
    rhs = {name: la.grad_matrix().clone() for name, la in norms.items()}
    opt.step()
    approx = opt.engine.approx
    assert isinstance(approx, UnitWiseNaturalGradient)
    for name, layer in norms.items():
        params = [f"{name}.weight"] + ([f"{name}.bias"] if layer.has_bias else [])
        width = len(params)
        expected = torch.zeros(layer.out_dim, width, width, dtype=torch.float64)
        for e in range(layer.out_dim):
            idx = [slices[p].start + e for p in params]
            expected[e] = ggn[idx][:, idx]
        _close(approx.blocks[name].state_dict()["fisher"], expected, f"unit blocks of {name}")
        step = _damped_solve(torch.block_diag(*expected), rhs[name].flatten()).reshape(-1, width)
        moved = layer.to_matrix(*layer.parameters).detach() - before[name]
        _close(moved, -0.5 * step, f"unit-wise step of {name}")


@pytest.mark.parametrize("problem", NORM_PROBLEMS, ids=lambda p: p.name)
def test_unit_wise_trains_networks_with_layernorm_and_groupnorm(problem: Problem) -> None:
    model = problem.model()
    opt = PreconditionedOptimizer(
        model, UnitWiseNaturalGradient(), loss_fn=problem.loss_fn, lr=0.3, damping=1e-1,
        unsupported="raise",
    )  # fmt: skip
    losses = []
    for _ in range(8):
        opt.zero_grad()
        with opt.record():
            loss = problem.loss_fn(model(problem.x), problem.y)
            loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert opt.skipped_steps == 0
    assert losses[-1] < 0.7 * losses[0], losses
