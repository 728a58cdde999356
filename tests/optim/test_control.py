"""Choosing what is preconditioned: selection, params=, per-group settings, describe()."""

from __future__ import annotations

import copy
import io
from collections import OrderedDict

import pytest
import torch
from torch import nn

from curvlib.approx.kfac import KFAC, KFACDamping
from curvlib.approx.kpsvd import KPSVD
from curvlib.optim import LevenbergMarquardt
from curvlib.optim.defaults import DEFAULTS
from curvlib.wiring import PreconditionedOptimizer
from tests import problems as P
from tests.hyper import PER_STEP
from tests.optim.identity import ZeroCurvature

DTYPE = torch.float64


class Gan(nn.Module):
    """A generator whose loss goes through a critic (the composite the extractor sees)."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 4))
        self.critic = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.critic(self.generator(z))  # type: ignore[no-any-return]


def _gan() -> tuple[Gan, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(8, 3, generator=gen, dtype=DTYPE)
    return Gan().to(DTYPE), z, torch.ones(8, 1, dtype=DTYPE)


def _step(opt, model, loss_fn, x, y, closure: bool = False):  # type: ignore[no-untyped-def]
    opt.zero_grad()
    with opt.record():
        loss = loss_fn(model(x), y)
        loss.backward()
    if closure:
        opt.step(lambda: loss_fn(model(x), y))
    else:
        opt.step()
    return loss.item()


# -- params= --------------------------------------------------------------------------


def test_params_restricts_what_changes() -> None:
    model, z, y = _gan()
    loss_fn = nn.BCEWithLogitsLoss()
    opt = PreconditionedOptimizer(
        model, ZeroCurvature(), loss_fn=loss_fn, include=["generator.*"], damping=1.0,
        kl_clip=None, lr=0.1, momentum=0.9, params=model.generator.parameters(),
        unsupported="ignore",
    )  # fmt: skip
    assert [layer.name for layer in opt.layers] == ["generator.0", "generator.3"]
    text = opt.describe()
    assert (
        "fallback step (SGD, lr 0.1, momentum 0.9): generator.1.weight 6, generator.1.bias 6"
        in text
    )
    assert "not stepped (outside params=): critic.0.weight, critic.0.bias, critic.1.weight" in text
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(opt, model, loss_fn, z, y)
    for name, p in model.named_parameters():
        assert p.grad is not None  # the critic's gradients were computed ...
        if name.startswith("critic."):
            assert torch.equal(p, before[name]), name  # ... and never applied
            assert p not in opt.state
        else:  # zero curvature with unit damping: plain SGD, fallback (LayerNorm) included
            torch.testing.assert_close(p, before[name] - 0.1 * p.grad)
            assert "momentum_buffer" in opt.state[p]


def test_unsupported_policy_only_concerns_the_stepped_modules() -> None:
    model, _, _ = _gan()
    loss_fn = nn.BCEWithLogitsLoss()
    with pytest.raises(ValueError, match=r"generator\.1 \(LayerNorm\)") as err:
        PreconditionedOptimizer(model, KFAC(), loss_fn=loss_fn, include=["generator.*"],
                                params=model.generator.parameters(),
                                unsupported="raise")  # fmt: skip
    assert "critic" not in str(err.value)
    with pytest.warns(UserWarning, match="generator.1") as record:
        PreconditionedOptimizer(model, KFAC(), loss_fn=loss_fn, include=["generator.*"],
                                params=model.generator.parameters())  # fmt: skip
    assert not any("critic" in str(w.message) for w in record)
    model.generator[1].requires_grad_(False)  # frozen: nothing left to complain about
    PreconditionedOptimizer(model, KFAC(), loss_fn=loss_fn, include=["generator.*"],
                            params=model.generator.parameters(), unsupported="raise")  # fmt: skip


def test_the_unsupported_warning_points_at_the_callers_line() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match=r"1 \(LayerNorm\)") as record:
        PreconditionedOptimizer(model, KFAC(), loss_fn=nn.CrossEntropyLoss())
    assert [w.filename for w in record] == [__file__]


def test_curvature_layers_outside_params_are_an_error() -> None:
    model, _, _ = _gan()
    loss_fn = nn.BCEWithLogitsLoss()
    with pytest.raises(ValueError, match=r"\['critic\.0', 'critic\.3'\].*include="):
        PreconditionedOptimizer(model, KFAC(), loss_fn=loss_fn, unsupported="ignore",
                                params=model.generator.parameters())  # fmt: skip
    with pytest.raises(ValueError, match=r"\['generator\.0'\]"):  # the bias alone is not enough
        PreconditionedOptimizer(model, KFAC(), loss_fn=loss_fn, unsupported="ignore",
                                include=["generator.0"],
                                params=[model.generator[0].bias])  # fmt: skip
    with pytest.raises(ValueError, match="not a parameter of the model"):
        PreconditionedOptimizer(model, KFAC(), loss_fn=loss_fn, unsupported="ignore",
                                params=[nn.Parameter(torch.zeros(2))])  # fmt: skip
    with pytest.raises(ValueError, match="no trainable parameter"):
        PreconditionedOptimizer(model, KFAC(), loss_fn=loss_fn, unsupported="ignore", params=[])
    with pytest.raises(TypeError, match="iterable of parameters"):
        PreconditionedOptimizer(model, KFAC(), loss_fn=loss_fn, unsupported="ignore",
                                params=model.critic[0].weight)  # fmt: skip


def test_params_with_kfac_trains_the_generator_only() -> None:
    model, z, y = _gan()
    loss_fn = nn.BCEWithLogitsLoss()
    critic = copy.deepcopy(model.critic.state_dict())
    opt = PreconditionedOptimizer(
        model, KFAC(), loss_fn=loss_fn, include=["generator.*"], lr=0.3, kl_clip=1e-1,
        params=model.generator.parameters(), unsupported="ignore", fisher_type="exact",
    )  # fmt: skip
    losses = [_step(opt, model, loss_fn, z, y) for _ in range(10)]
    assert losses[-1] < 0.9 * losses[0], losses
    for key, value in model.critic.state_dict().items():
        assert torch.equal(value, critic[key]), key


# -- include / exclude and the fallback step --------------------------------------------


def test_include_exclude_patterns_resolve_as_documented() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        enc=nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3)),
        flat=nn.Flatten(), head=nn.Linear(8, 3),
    ))  # fmt: skip
    loss_fn = nn.CrossEntropyLoss()

    def names(**kwargs):  # type: ignore[no-untyped-def]
        opt = PreconditionedOptimizer(
            model, KFAC(), loss_fn=loss_fn, unsupported="ignore", **kwargs
        )
        return [layer.name for layer in opt.layers]

    assert names() == ["enc.0", "enc.2", "head"]
    assert names(include=[nn.Conv2d]) == ["enc.0", "enc.2"]
    assert names(include=["enc.*"], exclude=["enc.2"]) == ["enc.0"]
    assert names(include=["*"], exclude=[nn.Linear]) == ["enc.0", "enc.2"]
    assert names(exclude=["enc.?"]) == ["head"]
    assert names(include=["ENC.*", "head"]) == ["head"]  # case-sensitive
    with pytest.raises(ValueError, match="No curvature layers selected"):
        names(include=["nothing.*"])
    with pytest.raises(ValueError, match="No curvature layers selected"):
        names(exclude=[nn.Module])


def test_excluded_layers_take_the_sgd_fallback_step() -> None:
    problem = P.mlp_ce(n=16)
    model = problem.model()
    reference = copy.deepcopy(model)
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=problem.loss_fn, exclude=["2"], lr=0.2,
                                  momentum=0.9, weight_decay=1e-2)  # fmt: skip
    sgd = torch.optim.SGD(reference[2].parameters(), lr=0.2, momentum=0.9, weight_decay=1e-2)
    assert [la.name for la in opt.layers] == ["0", "4"]
    for _ in range(3):
        before0 = model[0].weight.detach().clone()
        _step(opt, model, problem.loss_fn, problem.x, problem.y)
        reference.zero_grad()
        problem.loss_fn(reference(problem.x), problem.y).backward()
        sgd.step()
        torch.testing.assert_close(model[2].weight, reference[2].weight)
        torch.testing.assert_close(model[2].bias, reference[2].bias)
        with torch.no_grad():  # keep the rest of the reference in sync with the optimizer
            for name in ("0", "4"):
                reference.get_submodule(name).load_state_dict(
                    model.get_submodule(name).state_dict()
                )
        assert not torch.allclose(model[0].weight - before0, -0.2 * model[0].weight.grad)


# -- groups -----------------------------------------------------------------------------


def _directions(opt, model, problem):  # type: ignore[no-untyped-def]
    """One step with lr 1, no clip, no momentum: the change is minus the direction."""
    before = {la.name: la.to_matrix(*(p.detach().clone() for p in la.parameters))
              for la in opt.layers}  # fmt: skip
    _step(opt, model, problem.loss_fn, problem.x, problem.y)
    return {
        la.name: before[la.name] - la.to_matrix(*(p.detach() for p in la.parameters))
        for la in opt.layers
    }


def _reference(approx, name: str, grad: torch.Tensor, damping: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    dense = approx.to_dense(name).to(DTYPE)
    eye = torch.eye(dense.shape[0], dtype=DTYPE)
    return torch.linalg.solve(dense + damping * eye, grad.flatten().to(DTYPE)).reshape(grad.shape)


def test_per_group_damping_and_approximation_reach_their_layers() -> None:
    problem = P.mlp_ce(n=16)
    model = problem.model()
    opt = PreconditionedOptimizer(
        model, KFAC(KFACDamping.EIGEN), loss_fn=problem.loss_fn, lr=1.0, kl_clip=None,
        max_move=None, damping=1e-3, fisher_type="exact", **PER_STEP, groups=[
            {"layers": ["4"], "damping": 0.5, "name": "head"},
            {"layers": ["2"], "damping": 0.05, "approx": KPSVD(damping_mode="eigen")},
        ],
    )  # fmt: skip
    assert [g["name"] for g in opt.param_groups] == ["default", "head", "group2"]
    assert [type(e.approx).__name__ for e in opt.engines] == ["KFAC", "KFAC", "KPSVD"]
    expected = {
        "0": (opt.engines[0], 1e-3),
        "4": (opt.engines[1], 0.5),
        "2": (opt.engines[2], 0.05),
    }
    for _ in range(2):
        directions = _directions(opt, model, problem)
        for layer in opt.layers:
            engine, damping = expected[layer.name]
            grad = layer.grad_matrix()
            reference = _reference(engine.approx, layer.name, grad, damping)
            torch.testing.assert_close(directions[layer.name], reference, rtol=1e-6, atol=1e-10)
            wrong = _reference(engine.approx, layer.name, grad, 1e-3 if damping != 1e-3 else 0.5)
            assert not torch.allclose(directions[layer.name], wrong, rtol=1e-3)
    # Each engine saw only its own layers.
    assert set(opt.engines[1].approx.blocks) == {"4"}  # type: ignore[attr-defined]
    assert set(opt.engines[2].approx.blocks) == {"2"}  # type: ignore[attr-defined]


def test_group_hyper_parameters_are_editable_param_groups() -> None:
    problem = P.mlp_ce(n=16)
    model = problem.model()
    opt = PreconditionedOptimizer(
        model, KFAC(KFACDamping.EIGEN), loss_fn=problem.loss_fn, lr=1.0, kl_clip=None,
        fisher_type="exact", **PER_STEP, groups=[{"layers": ["4"], "damping": 0.5, "lr": 0.5}],
    )  # fmt: skip
    _step(opt, model, problem.loss_fn, problem.x, problem.y)
    opt.param_groups[1]["damping"] = 2.0
    opt.param_groups[1]["lr"] = 1.0
    directions = _directions(opt, model, problem)
    head = opt.engines[1]
    grad = opt.layers[2].grad_matrix()
    torch.testing.assert_close(directions["4"], _reference(head.approx, "4", grad, 2.0))
    default = DEFAULTS.damping.at(opt.engines[0].samples_seen)  # the default rule, warming up
    assert opt.last_stats["group_damping"] == {"default": pytest.approx(default), "group1": 2.0}
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    _step(opt, model, problem.loss_fn, problem.x, problem.y)
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.1])


def test_per_group_intervals() -> None:
    problem = P.mlp_ce(n=8)
    model = problem.model()
    default, slow = ZeroCurvature(), ZeroCurvature()
    calls = {id(default): 0, id(slow): 0}
    for approx in (default, slow):
        inverse = approx.inverse

        def counted(damping: float, approx=approx, inverse=inverse):  # type: ignore[no-untyped-def]
            calls[id(approx)] += 1
            return inverse(damping)

        approx.inverse = counted  # type: ignore[method-assign]
    opt = PreconditionedOptimizer(model, default, loss_fn=problem.loss_fn, t_cov=1, t_inv=1,
                                  warmup=0, refresh_on_move=0,
                                  groups=[{"layers": ["2", "4"], "approx": slow,
                                           "t_cov": 2, "t_inv": 3}])  # fmt: skip
    for _ in range(6):
        _step(opt, model, problem.loss_fn, problem.x, problem.y)
    assert (default.num_updates, slow.num_updates) == (6, 3)
    assert (calls[id(default)], calls[id(slow)]) == (6, 2)
    # Statistics are recorded only when some group is due.
    opt = PreconditionedOptimizer(model, ZeroCurvature(), loss_fn=problem.loss_fn, t_cov=2,
                                  warmup=0, refresh_on_move=0,
                                  groups=[{"layers": ["4"], "t_cov": 3}])  # fmt: skip
    due = []
    for _ in range(6):
        due.append(any(engine.stats_due for engine in opt.engines))
        _step(opt, model, problem.loss_fn, problem.x, problem.y)
        assert ("time_statistics" in opt.last_stats) == due[-1]
    assert due == [True, False, True, True, True, False]


def test_bad_groups_are_errors_that_name_the_fix() -> None:
    problem = P.mlp_ce()
    model = problem.model()

    def make(groups):  # type: ignore[no-untyped-def]
        return PreconditionedOptimizer(model, KFAC(), loss_fn=problem.loss_fn, groups=groups)

    with pytest.raises(ValueError, match=r"Layer '2' matches groups 'a' and 'b'"):
        make([{"layers": ["2"], "name": "a"}, {"layers": [nn.Linear], "name": "b"}])
    with pytest.raises(ValueError, match=r"Group 'group1' .*matches no curvature layer.*0, 2, 4"):
        make([{"layers": ["dec.*"]}])
    with pytest.raises(ValueError, match=r"unknown keys.*kl_clip bounds the whole update"):
        make([{"layers": ["2"], "kl_clip": 1e-3}])
    with pytest.raises(TypeError, match="list of patterns"):
        make([{"layers": "2"}])
    with pytest.raises(TypeError, match="curvature approximation"):
        make([{"layers": ["2"], "approx": "kfac"}])
    with pytest.raises(ValueError, match="share one approximation object"):
        shared = KFAC()
        PreconditionedOptimizer(model, shared, loss_fn=problem.loss_fn,
                                groups=[{"layers": ["2"], "approx": shared}])  # fmt: skip
    with pytest.raises(ValueError, match=r"group 'group1': damping must be positive"):
        make([{"layers": ["2"], "damping": 0.0}])
    with pytest.raises(ValueError, match=r"group 'group1': t_inv must be a positive integer"):
        make([{"layers": ["2"], "t_inv": 0}])
    with pytest.raises(ValueError, match="names must be unique"):
        make([{"layers": ["2"], "name": "x"}, {"layers": ["4"], "name": "x"}])


@pytest.mark.parametrize("t_inv", [1, 3])
def test_two_group_checkpoint_resume_is_exact(t_inv: int) -> None:
    problem = P.autoencoder_bce(n=8)
    batches = [(problem.x + 0.1 * i, problem.y) for i in range(8)]

    def make(model: nn.Module) -> PreconditionedOptimizer:
        return PreconditionedOptimizer(
            model, KFAC(), loss_fn=problem.loss_fn, lr=0.1, momentum=0.9, t_cov=2, t_inv=t_inv,
            damping=LevenbergMarquardt(interval=2), mc_samples=2,
            groups=[{"layers": [model_layers(model)[-1]], "approx": KPSVD(), "t_inv": 2,
                     "damping": 1e-2, "lr": 0.05}],
        )  # fmt: skip

    def run(opt, model, part):  # type: ignore[no-untyped-def]
        return [_step(opt, model, problem.loss_fn, x, y, closure=True) for x, y in part]

    model = problem.model()
    full = run(make(model), model, batches)
    model = problem.model()
    opt = make(model)
    first = run(opt, model, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model = problem.model()
    opt = make(model)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    assert len(opt.engines) == 2
    second = run(opt, model, batches[3:])
    assert first + second == full
    other = PreconditionedOptimizer(model, KFAC(), loss_fn=problem.loss_fn)
    with pytest.raises(ValueError, match="groups: 'group1' only in the checkpoint"):
        other.load_state_dict(checkpoint["opt"])


def model_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


# -- describe ---------------------------------------------------------------------------


def test_describe_lists_layers_groups_fallback_and_excluded() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.BatchNorm1d(8), nn.Linear(8, 3),
                          nn.Linear(3, 3))  # fmt: skip
    opt = PreconditionedOptimizer(
        model, KFAC(), loss_fn=nn.CrossEntropyLoss(), exclude=["4"], unsupported="ignore",
        damping=LevenbergMarquardt(initial=1e-2), t_cov=1, t_inv=1, momentum=0.0,
        groups=[{"layers": ["3"], "approx": KPSVD(), "damping": 0.1, "t_inv": 5}],
    )  # fmt: skip
    text = opt.describe()
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "kind", "parameters", "group", "approximation", "fisher",
                                "damping", "t_cov/t_inv"]  # fmt: skip
    assert lines[1].split() == ["0", "linear", "8x5,", "8", "default", "KFAC", "mc", "LM", "0.01",
                                "1/1"]  # fmt: skip
    assert lines[2].split() == ["3", "linear", "3x8,", "3", "group1", "KPSVD", "mc", "0.1", "1/5"]
    assert "fallback step (SGD, lr 0.1, momentum 0): 2.weight 8, 2.bias 8, 4.weight 3x3" in text
    assert "without curvature block: 2 (BatchNorm1d): no block in this approximation" in text
    assert "without curvature block: 4 (Linear): excluded by the user" in text
