"""lr="auto" / momentum="auto": the kernel, the exact GGN Gram matrix, the optimizer."""

from __future__ import annotations

import copy
import io
import itertools
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian

from curvlib.approx.kfac import KFAC
from curvlib.extract import CurvatureExtractor
from curvlib.optim import LevenbergMarquardt
from curvlib.optim.adaptive import QuadraticModel, adaptive_coefficients
from curvlib.wiring import PreconditionedOptimizer
from tests import oracle
from tests import problems as P
from tests.hyper import FRESH, train_steps

DTYPE = torch.float64
EXACT = {"rtol": 1e-9, "atol": 1e-11}
"""float64 exactness: the Gram matrix and the minimiser against independent references."""


# -- helpers -------------------------------------------------------------------------


def _directions(extractor: CurvatureExtractor, k: int, seed: int = 0) -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            layer.name: torch.randn(layer.out_dim, layer.in_dim_aug, generator=gen, dtype=DTYPE)
            for layer in extractor.layout.layers
        }
        for _ in range(k)
    ]


def _flat(extractor: CurvatureExtractor, direction: dict[str, Tensor]) -> Tensor:
    return torch.cat([direction[layer.name].flatten() for layer in extractor.layout.layers])


def _captured(problem: P.Problem) -> tuple[nn.Module, CurvatureExtractor]:
    model = problem.model()
    extractor = CurvatureExtractor(model, problem.loss_fn, unsupported="ignore")
    with extractor.capture():
        problem.loss_fn(model(problem.x), problem.y).backward()
    return model, extractor


def _along(
    model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, dirs: list[Tensor], damping: float
) -> Callable[[Tensor], Tensor]:
    """phi(c) = L(theta + sum_i c_i d_i) + damping/2 |sum_i c_i d_i|^2 on an un-hooked copy."""
    net = copy.deepcopy(model)
    base = {k: v.detach() for k, v in net.named_parameters()}

    def phi(c: Tensor) -> Tensor:
        step = sum(ci * di for ci, di in zip(c, dirs, strict=True))
        assert isinstance(step, Tensor)
        params = {"weight": base["weight"] + step[:, :-1], "bias": base["bias"] + step[:, -1]}
        return loss_fn(functional_call(net, params, (x,)), y) + 0.5 * damping * (step**2).sum()

    return phi


# -- (a) the kernel minimises the true loss of a model linear in its parameters -----------


def _linear_problem() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(5, 3).to(DTYPE)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 5, generator=gen, dtype=DTYPE)
    y = torch.randn(16, 3, generator=gen, dtype=DTYPE)
    return model, nn.MSELoss(), x, y


def _linear_model_and_reference(
    damping: float, parallel: bool = False
) -> tuple[QuadraticModel, Callable[[Tensor], Tensor]]:
    model, loss_fn, x, y = _linear_problem()
    extractor = CurvatureExtractor(model, loss_fn)
    with extractor.capture():
        loss_fn(model(x), y).backward()
    big, small = _directions(extractor, 2, seed=3)
    if parallel:
        small = {name: 2.0 * d for name, d in big.items()}
    gram = extractor.ggn_gram([big, small])
    assert model.weight.grad is not None and model.bias.grad is not None
    g = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1)
    d1, d2 = big[""], small[""]
    b = (float((g * d1).sum()), float((g * d2).sum()))
    ridge = [[float((u * v).sum()) * damping for v in (d1, d2)] for u in (d1, d2)]
    a = gram + torch.tensor(ridge, dtype=DTYPE)
    quad = QuadraticModel(b, ((float(a[0, 0]), float(a[0, 1])), (float(a[1, 0]), float(a[1, 1]))))
    return quad, _along(model, loss_fn, x, y, [d1, d2], damping)


@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_both_coefficients_minimise_the_true_loss_on_the_span(damping: float) -> None:
    quad, phi = _linear_model_and_reference(damping)
    alpha, mu = adaptive_coefficients(quad, None, None)
    zero = torch.zeros(2, dtype=DTYPE)
    # phi is exactly quadratic: its minimiser from its own gradient and Hessian (torch.func).
    reference = -torch.linalg.solve(hessian(phi)(zero), grad(phi)(zero))
    torch.testing.assert_close(torch.tensor([alpha, mu], dtype=DTYPE), reference, **EXACT)
    best = phi(torch.tensor([alpha, mu], dtype=DTYPE))
    # The model predicts the true change, and no point of a grid around c* does better.
    assert quad(alpha, mu) == pytest.approx(float(best - phi(zero)), rel=1e-9)
    for da in (-1e-3, 0.0, 1e-3):
        for dm in (-1e-3, 0.0, 1e-3):
            assert phi(torch.tensor([alpha + da, mu + dm], dtype=DTYPE)) >= best - 1e-12


def test_fixed_momentum_gives_the_one_dimensional_minimiser() -> None:
    quad, phi = _linear_model_and_reference(1e-3)
    alpha, mu = adaptive_coefficients(quad, None, 0.7)
    assert mu == 0.7

    def line(a: Tensor) -> Tensor:
        return phi(torch.stack([a, torch.tensor(0.7, dtype=DTYPE)]))

    zero = torch.tensor(0.0, dtype=DTYPE)
    assert alpha == pytest.approx(float(-grad(line)(zero) / hessian(line)(zero)), rel=1e-9)
    fixed_lr = adaptive_coefficients(quad, 0.5, None)
    assert fixed_lr[0] == 0.5
    assert quad(*fixed_lr) <= quad(0.5, fixed_lr[1] + 1e-3)
    assert quad(*fixed_lr) <= quad(0.5, fixed_lr[1] - 1e-3)


def test_parallel_or_missing_momentum_falls_back_to_the_learning_rate_alone() -> None:
    quad, phi = _linear_model_and_reference(1e-3, parallel=True)
    alpha, mu = adaptive_coefficients(quad, None, None)
    assert mu == 0.0
    assert alpha == pytest.approx(-quad.b[0] / quad.a[0][0], rel=1e-12)
    zero = torch.tensor(0.0, dtype=DTYPE)

    def line(a: Tensor) -> Tensor:
        return phi(torch.stack([a, zero]))

    assert alpha == pytest.approx(float(-grad(line)(zero) / hessian(line)(zero)), rel=1e-9)
    no_delta = QuadraticModel((quad.b[0], 0.0), ((quad.a[0][0], 0.0), (0.0, 0.0)))
    assert adaptive_coefficients(no_delta, None, None) == (alpha, 0.0)
    broken = QuadraticModel((math.nan, 0.0), ((1.0, 0.0), (0.0, 1.0)))
    assert adaptive_coefficients(broken, None, None) == (0.0, 0.0)


# -- (b) the Gram matrix equals the dense GGN of the batch loss ---------------------------


PROBLEMS = [
    P.mlp_mse("mean"),
    P.mlp_mse("sum"),
    P.autoencoder_bce(),
    # BCELoss: the Hessian at the data targets, y/p^2 + (1-y)/(1-p)^2, not the Fisher.
    P.autoencoder_sigmoid_bce(),
    P.autoencoder_sigmoid_bce().with_loss(nn.BCELoss(reduction="sum")),
    P.mlp_ce(),
    P.cnn_ce(),
    P.segmentation_ce(),
    P.tconv_bce(),
    P.bn_net(train=False),
]


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_gram_equals_the_dense_ggn_of_the_batch_loss(problem: P.Problem) -> None:
    model, extractor = _captured(problem)
    directions = _directions(extractor, 3)
    gram = extractor.ggn_gram(directions)
    dense = oracle.dense_ggn(model, problem.loss_fn, problem.x, problem.y)
    # The oracle is the per-sample average; the batch loss with sum is N times it.
    dense = dense * (problem.n if problem.loss_fn.reduction == "sum" else 1)
    flat = torch.stack([_flat(extractor, d) for d in directions])
    torch.testing.assert_close(gram, flat @ dense @ flat.T, **EXACT)


@pytest.mark.parametrize(
    "problem", [P.mlp_mse(), P.mlp_mse("sum"), P.mlp_ce(), P.cnn_ce()], ids=lambda p: p.name
)
def test_gram_on_a_fraction_is_the_dense_ggn_of_the_first_samples(problem: P.Problem) -> None:
    model = problem.model()
    extractor = CurvatureExtractor(model, problem.loss_fn, unsupported="ignore", stats_fraction=0.5)
    with extractor.capture():
        problem.loss_fn(model(problem.x), problem.y).backward()
    directions = _directions(extractor, 2)
    gram = extractor.ggn_gram(directions)
    m = (problem.n + 1) // 2
    dense = oracle.dense_ggn(model, problem.loss_fn, problem.x[:m], problem.y[:m])
    # A sum over the batch is estimated from the m samples: N times their mean.
    dense = dense * (problem.n if problem.loss_fn.reduction == "sum" else 1)
    flat = torch.stack([_flat(extractor, d) for d in directions])
    torch.testing.assert_close(gram, flat @ dense @ flat.T, **EXACT)


def test_gram_with_coupled_samples_uses_batch_statistics_and_keeps_running_ones() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))
    model = model.to(DTYPE).train()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(7, 5, dtype=DTYPE), torch.randint(0, 3, (7,))
    extractor = CurvatureExtractor(model, loss_fn, unsupported="ignore")
    with extractor.capture():
        loss_fn(model(x), y).backward()
    running = model[1].running_mean.clone()  # type: ignore[union-attr]
    directions = _directions(extractor, 2)
    gram = extractor.ggn_gram(directions)
    torch.testing.assert_close(model[1].running_mean, running, rtol=0, atol=0)
    assert model[1].track_running_stats
    dense = oracle.dense_ggn_coupled(model, loss_fn, x, y)
    flat = torch.stack([_flat(extractor, d) for d in directions])
    torch.testing.assert_close(gram, flat @ dense @ flat.T, **EXACT)


def test_cross_entropy_ignore_index_matches_the_autograd_hessian() -> None:
    problem = P.segmentation_ce()
    y = problem.y.clone()
    y[0, 1, 2] = y[2, 0, 0] = -100
    loss_fn = nn.CrossEntropyLoss()
    model = problem.model()
    extractor = CurvatureExtractor(model, loss_fn)
    with extractor.capture():
        loss_fn(model(problem.x), y).backward()
    directions = _directions(extractor, 2)
    gram = extractor.ggn_gram(directions)
    out = model(problem.x).detach()
    h_out = hessian(lambda f: loss_fn(f, y))(out).reshape(out.numel(), out.numel())
    net = copy.deepcopy(model)
    params = {k: v.detach() for k, v in net.named_parameters()}
    jac = torch.func.jacrev(lambda p: functional_call(net, p, (problem.x,)))(params)
    j = oracle.vectorise(net, jac).reshape(out.numel(), -1)
    flat = torch.stack([_flat(extractor, d) for d in directions])
    torch.testing.assert_close(gram, flat @ j.T @ h_out @ j @ flat.T, **EXACT)


def test_gram_needs_a_captured_batch() -> None:
    problem = P.mlp_ce()
    extractor = CurvatureExtractor(problem.model(), problem.loss_fn)
    with pytest.raises(RuntimeError, match=r"inside `with opt\.record"):
        extractor.ggn_gram(_directions(extractor, 1))


# -- (c) the optimizer ---------------------------------------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _batches(steps: int = 8, n: int = 32) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=gen)
    y = (x[:, :3] @ torch.randn(3, 3, generator=gen)).argmax(1)
    return [(x, y)] * steps


_train = train_steps


def _auto(model: nn.Module, loss_fn: nn.Module, **kwargs: object) -> PreconditionedOptimizer:
    settings: dict[str, object] = {"lr": "auto", "momentum": "auto", "damping": 1e-2}
    settings.update(kwargs)
    return PreconditionedOptimizer(model, KFAC(), loss_fn=loss_fn, **settings)


def test_auto_trains_a_tiny_mlp_and_reports_alpha_and_mu() -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    log: list[dict[str, object]] = []
    # The quadratic model of the whole batch, no trust region: every step is its minimiser.
    opt = _auto(model, loss_fn, on_step=log.append, kl_clip=None, **FRESH)
    losses = _train(opt, model, loss_fn, _batches())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]
    assert all(later < earlier for earlier, later in itertools.pairwise(losses))
    assert log[0]["adaptive_momentum"] == 0.0  # no previous update on the first step
    for row in log:
        assert isinstance(row["adaptive_lr"], float) and row["adaptive_lr"] > 0.0
        assert isinstance(row["predicted_change"], float) and row["predicted_change"] < 0.0
        assert row["kl_clip_factor"] == 1.0 and "time_adaptive" in row
    assert any(row["adaptive_momentum"] != 0.0 for row in log[1:])
    assert all(p.isfinite().all() for p in model.parameters())


def test_the_step_is_the_chosen_combination_and_predicts_the_true_change() -> None:
    # A model linear in its parameters with MSE: the GGN is the Hessian, M is exact.
    model, loss_fn, x, y = _linear_problem()
    opt = PreconditionedOptimizer(
        model, KFAC(), loss_fn=loss_fn, lr="auto", momentum="auto", damping=1e-3, **FRESH
    )
    for _ in range(2):
        before = torch.cat([model.weight, model.bias[:, None]], 1).detach().clone()
        loss_before = loss_fn(model(x), y).item()
        _train(opt, model, loss_fn, [(x, y)])
        after = torch.cat([model.weight, model.bias[:, None]], 1).detach()
        update = after - before
        stored = torch.cat(
            [opt.state[model.weight]["previous_update"],
             opt.state[model.bias]["previous_update"][:, None]], 1
        )  # fmt: skip
        torch.testing.assert_close(stored, update, **EXACT)
        true_change = loss_fn(model(x), y).item() - loss_before
        predicted = opt.last_stats["predicted_change"] - 0.5 * 1e-3 * float((update**2).sum())
        assert true_change == pytest.approx(predicted, rel=1e-8)


def test_auto_is_free_when_off_and_costs_two_products_when_on(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=loss_fn, lr=0.1)
    calls: list[int] = []

    def counted(directions):  # type: ignore[no-untyped-def]
        calls.append(len(directions))
        return original(directions)

    original = opt.extractor.ggn_gram
    monkeypatch.setattr(opt.extractor, "ggn_gram", counted)
    monkeypatch.setattr(opt.extractor, "capture", lambda: pytest.fail("capture() while off"))
    _train(opt, model, loss_fn, _batches(2))
    assert calls == [] and opt.last_stats["adaptive_lr"] is None
    monkeypatch.undo()
    opt = _auto(model, loss_fn)
    original = opt.extractor.ggn_gram
    monkeypatch.setattr(opt.extractor, "ggn_gram", counted)
    _train(opt, model, loss_fn, _batches(3))
    assert calls == [1, 2, 2]  # no previous update on the first step


def test_state_dict_round_trips_the_previous_update() -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    opt = _auto(model, loss_fn)
    batches = _batches(5)
    _train(opt, model, loss_fn, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_model = _mlp()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = _auto(resumed_model, loss_fn)
    resumed.load_state_dict(checkpoint["opt"])
    assert all("previous_update" in resumed.state[p] for p in resumed_model.parameters())
    _train(opt, model, loss_fn, batches[3:])
    _train(resumed, resumed_model, loss_fn, batches[3:])
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert resumed.last_stats["adaptive_lr"] == opt.last_stats["adaptive_lr"]


def test_auto_combines_with_levenberg_marquardt_and_fixed_values() -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    opt = _auto(model, loss_fn, damping=LevenbergMarquardt(initial=1e-2, interval=1))
    _train(opt, model, loss_fn, _batches(3), closure=True)
    ratio = opt.last_stats["lm_ratio"]
    assert ratio is not None and math.isfinite(ratio) and ratio > 0.25
    model = _mlp()
    opt = _auto(model, loss_fn, momentum=0.5, groups=[{"layers": ["2"], "momentum": 0.9}])
    losses = _train(opt, model, loss_fn, _batches(3))
    assert losses[-1] < losses[0] and opt.last_stats["adaptive_momentum"] is None


@pytest.mark.parametrize("key", ["lr", "momentum"])
@pytest.mark.parametrize("value", ["Auto", "adaptive", -1.0, math.nan])
def test_bad_values_are_value_errors(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        PreconditionedOptimizer(_mlp(), KFAC(), loss_fn=nn.CrossEntropyLoss(), **{key: value})
    with pytest.raises(ValueError, match=key):
        PreconditionedOptimizer(
            _mlp(), KFAC(), loss_fn=nn.CrossEntropyLoss(), groups=[{"layers": ["0"], key: value}]
        )


def test_auto_settings_that_cannot_be_honoured_are_errors() -> None:
    with pytest.raises(ValueError, match="nesterov"):
        _auto(_mlp(), nn.CrossEntropyLoss(), lr=0.1, momentum="auto", nesterov=True)
    with pytest.raises(ValueError, match="every curvature group or in none"):
        PreconditionedOptimizer(
            _mlp(), KFAC(), loss_fn=nn.CrossEntropyLoss(), groups=[{"layers": ["2"], "lr": "auto"}]
        )
    norm = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"1\.weight, 1\.bias take the unpreconditioned"):
        _auto(norm, nn.CrossEntropyLoss(), unsupported="ignore")
    # A numeric optimizer-level lr for the fallback step, "auto" for every curvature layer.
    loss_fn = nn.CrossEntropyLoss()
    opt = PreconditionedOptimizer(
        norm, KFAC(), loss_fn=loss_fn, lr=0.05, unsupported="ignore",
        groups=[{"layers": ["*"], "lr": "auto"}],
    )  # fmt: skip
    losses = _train(opt, norm, loss_fn, _batches(3))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("clip", [None, 1e-2, 1e-5])
def test_the_kl_trust_region_bounds_the_exact_curvature_of_the_update(clip: float | None) -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    log: list[dict[str, object]] = []
    opt = _auto(model, loss_fn, on_step=log.append, kl_clip=clip)
    for x, y in _batches()[:3]:
        before = [p.detach().clone() for p in model.parameters()]
        _train(opt, model, loss_fn, [(x, y)])
        update = {
            layer.name: layer.to_matrix(
                *(opt.state[p]["previous_update"] for p in layer.parameters)
            )
            for layer in opt.layers
        }
        after = [p.detach().clone() for p in model.parameters()]
        # The exact GGN form at the parameters the step was chosen at.
        with torch.no_grad():
            for p, b in zip(model.parameters(), before, strict=True):
                p.copy_(b)
        curvature = float(opt.extractor.ggn_gram([update])[0, 0])
        with torch.no_grad():
            for p, a in zip(model.parameters(), after, strict=True):
                p.copy_(a)
        nu = log[-1]["kl_clip_factor"]
        assert isinstance(nu, float)
        if clip is None:
            assert nu == 1.0
        else:
            assert curvature <= clip * (1 + 1e-4)
            if nu < 1.0:  # the bound binds: the update sits on its boundary
                assert curvature == pytest.approx(clip, rel=1e-3)
    if clip == 1e-5:
        assert all(row["kl_clip_factor"] < 1.0 for row in log)
