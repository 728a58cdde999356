"""PreconditionedOptimizer: SGD equivalence, training, clipping, damping, guards, resume."""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch
from torch import nn

from curvlib.approx.diagonal import Diagonal
from curvlib.approx.kfac import KFAC, KFACDamping
from curvlib.core import FisherType
from curvlib.optim import LevenbergMarquardt, kl_clip_factor
from curvlib.wiring import NaturalGradientPreconditioner, PreconditionedOptimizer
from tests import problems as P
from tests.hyper import FRESH, train_steps
from tests.optim.identity import ZeroCurvature


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.BatchNorm1d(8), nn.Linear(8, 3))


def _batches(n: int = 12, steps: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen))
            for _ in range(steps)]  # fmt: skip


_train = train_steps


@pytest.mark.parametrize(
    ("momentum", "nesterov", "weight_decay"),
    [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 1e-2), (0.5, False, 1e-1)],
)
def test_zero_curvature_with_unit_damping_matches_sgd(
    momentum: float, nesterov: bool, weight_decay: float
) -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    reference = copy.deepcopy(model)
    kwargs = {"lr": 0.1, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay}
    opt = PreconditionedOptimizer(
        model, ZeroCurvature(), loss_fn=loss_fn, damping=1.0, kl_clip=None, max_move=None,
        unsupported="ignore", **kwargs,
    )  # fmt: skip
    sgd = torch.optim.SGD(reference.parameters(), **kwargs)  # type: ignore[arg-type]
    for x, y in _batches():
        _train(opt, model, loss_fn, [(x, y)])
        sgd.zero_grad()
        loss_fn(reference(x), y).backward()
        sgd.step()
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_decoupled_weight_decay_matches_the_closed_form() -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    opt = PreconditionedOptimizer(
        model, ZeroCurvature(), loss_fn=loss_fn, damping=1.0, kl_clip=None, lr=0.1,
        weight_decay=0.5, decoupled_weight_decay=True, unsupported="ignore",
    )  # fmt: skip
    ((x, y),) = _batches(steps=1)
    before = model[0].weight.detach().clone()
    _train(opt, model, loss_fn, [(x, y)])
    grad = model[0].weight.grad
    assert grad is not None
    torch.testing.assert_close(model[0].weight, before * (1 - 0.05) - 0.1 * grad)


def _binary(problem: P.Problem) -> P.Problem:
    """Hard targets, so that the loss can approach zero (soft targets bound it below)."""
    return problem.with_loss(problem.loss_fn, y=(problem.y > 0.5).to(problem.y.dtype))


TRAINING = [
    # (problem, largest final/initial loss ratio after 25 full-batch steps)
    (P.mlp_ce(n=32), 0.65),
    (P.cnn_ce(n=16), 0.1),
    (_binary(P.tconv_bce(n=8)), 0.85),
]


@pytest.mark.parametrize(("problem", "factor"), TRAINING, ids=lambda v: getattr(v, "name", ""))
@pytest.mark.parametrize("mode", list(KFACDamping))
def test_kfac_trains_small_problems(problem: P.Problem, factor: float, mode: KFACDamping) -> None:
    model = problem.model()
    opt = PreconditionedOptimizer(
        model, KFAC(mode), loss_fn=problem.loss_fn, lr=0.5, damping=1e-3, kl_clip=1e-1,
        momentum=0.5, fisher_type=FisherType.EXACT, **FRESH,
    )  # fmt: skip
    losses = _train(opt, model, problem.loss_fn, [(problem.x, problem.y)] * 25)
    if mode is KFACDamping.SQRT:
        # The same sqrt(lambda) on factors of different scales damps the smaller one
        # more than the pi split does: slower on the transposed-conv problem (0.86).
        factor = max(factor, 0.9)
    assert losses[-1] < factor * losses[0], losses


def test_kl_bound_holds_after_clipping() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(3, 4, generator=gen)}
    dirs = {"a": 10.0 * grads["a"]}
    nu = kl_clip_factor(grads, dirs, lr=0.5, clip=1e-3)
    kl = (0.5 * nu) ** 2 * float((grads["a"] * dirs["a"]).sum())
    assert nu < 1.0 and kl == pytest.approx(1e-3)
    no_lr = kl_clip_factor(grads, dirs, lr=0.5, clip=1e-3, lr_squared=False)
    assert nu**2 * 0.25 == pytest.approx(no_lr**2)
    assert kl_clip_factor(grads, {"a": 1e-6 * grads["a"]}, lr=0.5, clip=1e-3) == 1.0


def test_optimizer_reports_the_clip_it_applied() -> None:
    problem = P.mlp_ce(n=16)
    model = problem.model()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=problem.loss_fn, lr=1.0, kl_clip=1e-6)
    _train(opt, model, problem.loss_fn, [(problem.x, problem.y)])
    assert opt.last_stats["kl_clip_factor"] < 1.0


def test_lr_scheduler_changes_the_step() -> None:
    steps = []
    for gamma in (1.0, 0.1):
        model, loss_fn = _mlp(), nn.CrossEntropyLoss()
        opt = PreconditionedOptimizer(model, KFAC(), loss_fn=loss_fn, unsupported="ignore")
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=gamma)
        batches = _batches(steps=2)
        _train(opt, model, loss_fn, batches[:1])
        sched.step()
        before = model[0].weight.detach().clone()
        _train(opt, model, loss_fn, batches[1:])
        steps.append(float((model[0].weight.detach() - before).norm()))
    assert steps[1] < 0.5 * steps[0]


def test_lm_damping_rises_after_a_bad_step_and_falls_after_good_ones() -> None:
    problem = P.mlp_ce(n=32)
    lm = LevenbergMarquardt(initial=1e-2, interval=1)
    model = problem.model()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=problem.loss_fn, lr=0.05, damping=lm,
                                  kl_clip=None, max_move=None)  # fmt: skip

    def closure() -> torch.Tensor:
        return problem.loss_fn(model(problem.x), problem.y)

    dampings = []
    for _ in range(4):
        opt.zero_grad()
        with opt.record():
            closure().backward()
        opt.step(closure)
        dampings.append(opt.damping)
        assert opt.last_stats["lm_ratio"] is not None
    assert dampings[-1] < 1e-2  # small steps follow the quadratic model: damping falls
    # A huge learning rate overshoots: the loss rises and the damping goes up.
    opt.param_groups[0]["lr"] = 1e3
    before = opt.damping
    opt.zero_grad()
    with opt.record():
        closure().backward()
    opt.step(closure)
    assert opt.last_stats["lm_ratio"] < 0.25 or math.isnan(opt.last_stats["lm_ratio"])
    assert opt.damping > before


def test_lm_without_closure_is_an_error() -> None:
    problem = P.mlp_ce()
    model = problem.model()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=problem.loss_fn,
                                  damping=LevenbergMarquardt())  # fmt: skip
    with pytest.raises(RuntimeError, match="closure"):
        _train(opt, model, problem.loss_fn, [(problem.x, problem.y)])


def test_planted_nan_gradient_skips_the_step() -> None:
    problem = P.mlp_ce()
    model = problem.model()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=problem.loss_fn, momentum=0.9)
    _train(opt, model, problem.loss_fn, [(problem.x, problem.y)])
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    opt.zero_grad()
    with opt.record():
        problem.loss_fn(model(problem.x), problem.y).backward()
    model[0].weight.grad[0, 0] = float("nan")  # type: ignore[index]
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.skipped_steps == 1 and opt.last_stats["skipped"]
    for p, q, b in zip(model.parameters(), params, buffers, strict=True):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["momentum_buffer"], b)
    _train(opt, model, problem.loss_fn, [(problem.x, problem.y)])  # and training goes on


def test_nan_statistics_keep_the_last_preconditioner() -> None:
    problem = P.mlp_ce()
    model = problem.model()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=problem.loss_fn, t_cov=1, t_inv=1)
    _train(opt, model, problem.loss_fn, [(problem.x, problem.y)])
    opt.zero_grad()
    with opt.record():
        problem.loss_fn(model(problem.x), problem.y).backward()
    opt.engine._pending[0].layers["0"].kronecker.A[0, 0] = float("nan")  # type: ignore[union-attr]
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        opt.step()
    assert opt.engine.skipped_updates == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_failed_update_keeps_the_estimate_and_the_preconditioner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    problem = P.mlp_ce()
    model = problem.model()
    approx = KFAC()
    opt = PreconditionedOptimizer(model, approx, loss_fn=problem.loss_fn, t_cov=1, t_inv=2)
    _train(opt, model, problem.loss_fn, [(problem.x, problem.y)] * 2)
    before = {name: approx.to_dense(name) for name in approx.blocks}
    before_shapes = list(approx.blocks.items())

    block_type = type(approx.blocks["4"])
    real = block_type.update

    def broken(self: Any, stats: Any, rho: float) -> None:
        if self.out_dim == 3:  # the last layer, after the others were updated
            raise RuntimeError("planted failure")
        real(self, stats, rho)

    monkeypatch.setattr(block_type, "update", broken)
    with pytest.warns(RuntimeWarning, match="curvature update failed"):
        _train(opt, model, problem.loss_fn, [(problem.x + 1.0, problem.y)])
    assert opt.engine.skipped_updates == 1 and approx.num_updates == 2
    # Step 2 rebuilds the inverse as due, from the unchanged estimate.
    grads = {n: torch.randn(b.out_dim, b.in_dim, dtype=torch.float64) for n, b in before_shapes}
    live = opt.engine._precond.apply(grads)  # type: ignore[union-attr]
    for name, value in approx.inverse(opt.damping).apply(grads).items():
        torch.testing.assert_close(live[name], value)
    for name, dense in before.items():
        assert torch.equal(approx.to_dense(name), dense), name
    monkeypatch.undo()
    _train(opt, model, problem.loss_fn, [(problem.x, problem.y)])  # and training goes on
    assert approx.num_updates == 3


def test_misuse_is_an_error() -> None:
    problem = P.mlp_ce()
    model = problem.model()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=problem.loss_fn, t_cov=2)
    with pytest.raises(RuntimeError, match="No gradients"):
        opt.step()
    problem.loss_fn(model(problem.x), problem.y).backward()
    with pytest.raises(RuntimeError, match=r"inside `with optimizer\.record"):
        opt.step()
    with pytest.raises(RuntimeError, match="nested"), opt.record(), opt.record():
        pass
    with pytest.raises(ValueError, match="t_cov"):
        PreconditionedOptimizer(model, KFAC(), loss_fn=problem.loss_fn, t_cov=0)
    with pytest.raises(ValueError, match="damping must be positive"):
        PreconditionedOptimizer(model, KFAC(), loss_fn=problem.loss_fn, damping=0.0)
    with pytest.raises(ValueError, match="lr must be positive"):
        PreconditionedOptimizer(model, KFAC(), loss_fn=problem.loss_fn, lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        PreconditionedOptimizer(model, KFAC(), loss_fn=problem.loss_fn, momentum=0.0, nesterov=True)


def test_statistics_only_when_due() -> None:
    problem = P.mlp_ce()
    model = problem.model()
    approx = KFAC()
    opt = PreconditionedOptimizer(
        model, approx, loss_fn=problem.loss_fn, t_cov=3, t_inv=3, warmup=0
    )
    _train(opt, model, problem.loss_fn, [(problem.x, problem.y)] * 7)
    assert approx.num_updates == 3  # steps 0, 3, 6


@pytest.mark.parametrize("t_inv", [1, 4])
def test_checkpoint_resume_is_exact(t_inv: int) -> None:
    problem = P.autoencoder_bce(n=8)
    batches = [(problem.x + 0.1 * i, problem.y) for i in range(10)]

    def make(model: nn.Module) -> PreconditionedOptimizer:
        return PreconditionedOptimizer(
            model, KFAC(), loss_fn=problem.loss_fn, lr=0.1, momentum=0.9, t_cov=2, t_inv=t_inv,
            damping=LevenbergMarquardt(interval=2), mc_samples=2,
        )  # fmt: skip

    def run(opt, model, part):  # type: ignore[no-untyped-def]
        losses = []
        for x, y in part:
            opt.zero_grad()
            with opt.record():
                loss = problem.loss_fn(model(x), y)
                loss.backward()
            opt.step(lambda x=x, y=y: problem.loss_fn(model(x), y))
            losses.append(loss.item())
        return losses

    model = problem.model()
    opt = make(model)
    full = run(opt, model, batches)

    model = problem.model()
    opt = make(model)
    first = run(opt, model, batches[:5])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model = problem.model()
    opt = make(model)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    second = run(opt, model, batches[5:])
    assert first + second == full


def test_gradient_accumulation_equals_the_large_batch() -> None:
    problem = P.mlp_ce(n=12)
    results = []
    for micro in (1, 3):
        model = problem.model()
        opt = PreconditionedOptimizer(
            model, KFAC(), loss_fn=problem.loss_fn, fisher_type="empirical",
            accumulation_steps=micro, lr=0.1, momentum=0.9, stats_fraction=1.0,
        )  # fmt: skip
        for _ in range(3):
            opt.zero_grad()
            for x, y in zip(problem.x.chunk(micro), problem.y.chunk(micro), strict=True):
                with opt.record():
                    (problem.loss_fn(model(x), y) / micro).backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*results, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_preconditioner_mode_rewrites_gradients() -> None:
    problem = P.mlp_ce(n=16)
    model = problem.model()
    reference = problem.model()
    precond = NaturalGradientPreconditioner(model, KFAC(KFACDamping.EIGEN), loss_fn=problem.loss_fn,
                                            damping=1e-2, fisher_type="exact")  # fmt: skip
    with precond.record():
        problem.loss_fn(model(problem.x), problem.y).backward()
    precond.step()
    problem.loss_fn(reference(problem.x), problem.y).backward()
    approx = precond.engine.approx
    for layer in precond.layers:
        ref_module = reference.get_submodule(layer.name)
        grad = layer.to_matrix(ref_module.weight.grad, ref_module.bias.grad)
        dense = approx.to_dense(layer.name)
        expected = torch.linalg.solve(dense + 1e-2 * torch.eye(dense.shape[0]).double(),
                                      grad.flatten())  # fmt: skip
        torch.testing.assert_close(layer.grad_matrix().flatten(), expected)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    sgd.step()


@pytest.mark.parametrize("fisher", ["mc", "empirical", "exact"])
def test_the_loss_instance_is_handed_back_and_another_one_is_named(fisher: str) -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=loss_fn, fisher_type=fisher, **FRESH)
    precond = NaturalGradientPreconditioner(model, KFAC(), loss_fn=loss_fn)
    assert opt.loss_fn is loss_fn and precond.loss_fn is loss_fn
    x, y = _batches()[0]
    with pytest.raises(RuntimeError, match="another CrossEntropyLoss instance"), opt.record():
        nn.CrossEntropyLoss()(model(x), y).backward()


def test_stats_due_follows_the_schedule_and_lets_batchnorm_train_between() -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    opt = PreconditionedOptimizer(model, Diagonal(), loss_fn=loss_fn, t_cov=3, t_inv=3, warmup=0)
    due = []
    for x, y in _batches(steps=7):
        due.append(opt.stats_due)
        model.train(not opt.stats_due)  # per-sample statistics need eval-mode BatchNorm
        opt.zero_grad()
        with opt.record():
            loss_fn(model(x), y).backward()
        opt.step()
    assert due == [True, False, False, True, False, False, True]
    assert int(model[2].num_batches_tracked) == 4  # the four steps in train mode
