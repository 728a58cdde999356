"""Bad input gets an error that names the fix (or is supported), one test per case."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from curvlib import (
    KFAC,
    KPSVD,
    Backend,
    CurvatureExtractor,
    NaturalGradientPreconditioner,
    PreconditionedOptimizer,
)
from curvlib.optim import CurvatureEngine

DTYPE = torch.float64


def _net(dtype: torch.dtype = DTYPE) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _data(n: int = 8, dtype: torch.dtype = DTYPE) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


LOSS = nn.CrossEntropyLoss()


def _step(opt: Any, model: nn.Module, x: Tensor, y: Tensor, out: Any = None) -> None:
    opt.zero_grad()
    with opt.record():
        output = model(x)
        LOSS(output if out is None else out(output), y).backward()
    opt.step()


def test_the_approximation_class_instead_of_an_instance() -> None:
    model = _net()
    with pytest.raises(TypeError, match=r"got the class KFAC: write KFAC\(\)"):
        PreconditionedOptimizer(model, KFAC, loss_fn=LOSS)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"groups\[0\]\['approx'\] .*got the class KPSVD"):
        PreconditionedOptimizer(
            model, KFAC(), loss_fn=LOSS, groups=[{"layers": ["2"], "approx": KPSVD}]
        )
    with pytest.raises(TypeError, match=r"write KFAC\(\)"):
        NaturalGradientPreconditioner(model, KFAC, loss_fn=LOSS)  # type: ignore[arg-type]
    extractor = CurvatureExtractor(model, LOSS)
    with pytest.raises(TypeError, match=r"must be a curvature approximation such as KFAC\(\)"):
        CurvatureEngine(extractor, "kfac")  # type: ignore[arg-type]


def test_add_param_group_is_refused_naming_what_to_do() -> None:
    model = _net()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=LOSS)
    groups = len(opt.param_groups)
    with pytest.raises(ValueError, match="add_param_group cannot add parameters later") as info:
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": 0.1})
    assert "Build a new optimizer whose params=" in str(info.value)
    assert len(opt.param_groups) == groups
    x, y = _data()
    _step(opt, model, x, y)  # still a working optimizer


@pytest.mark.parametrize("backend", [Backend.BACKPACK, Backend.AUTOGRAD])
def test_an_empty_batch_names_the_fix(backend: Backend) -> None:
    model = _net()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=LOSS, backend=backend)
    x, y = _data()
    with pytest.raises(ValueError, match=r"empty \(0 samples\): skip empty batches"):
        _step(opt, model, x[:0], y[:0])


def test_torch_style_param_groups_point_to_groups_with_the_translation() -> None:
    model = _net()
    torch_groups = [
        {"params": model[0].parameters(), "lr": 0.1},
        {"params": list(model[2].parameters()), "damping": 1e-2},
    ]
    with pytest.raises(TypeError, match="not torch-style parameter groups") as info:
        PreconditionedOptimizer(model, KFAC(), loss_fn=LOSS, params=torch_groups)
    assert "groups=[{'layers': ['0'], 'lr': 0.1}, {'layers': ['2'], 'damping': 0.01}]" in str(
        info.value
    )
    # The translation works as written.
    opt = PreconditionedOptimizer(
        model, KFAC(), loss_fn=LOSS,
        groups=[{"layers": ["0"], "lr": 0.1}, {"layers": ["2"], "damping": 0.01}],
    )  # fmt: skip
    assert [g["lr"] for g in opt.param_groups] == [0.1, opt.defaults["lr"]]


def test_a_loss_on_a_slice_with_backpack_names_the_fix_and_autograd_is_right() -> None:
    model = _net()
    x, y = _data()
    y = y % 2

    def first_two(out: Tensor) -> Tensor:
        return out[:, :2]

    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=LOSS, backend=Backend.BACKPACK)
    with pytest.raises(ValueError, match=r"shape \[8, 2\], not to the model's output") as info:
        _step(opt, model, x, y, out=first_two)
    assert "backend=Backend.AUTOGRAD" in str(info.value)
    # The advice holds: autograd follows the slice. Layer 0's exact factors equal
    # those of the network whose last layer keeps only the two outputs used.
    sliced = CurvatureExtractor(model, LOSS, fisher_type="exact", backend=Backend.AUTOGRAD)
    with sliced.collect():
        LOSS(first_two(model(x)), y).backward()
    small = _net()
    small[2] = nn.Linear(5, 2).to(DTYPE)
    with torch.no_grad():
        small[2].weight.copy_(model[2].weight[:2])
        small[2].bias.copy_(model[2].bias[:2])
    reference = CurvatureExtractor(small, LOSS, fisher_type="exact", backend=Backend.AUTOGRAD)
    with reference.collect():
        LOSS(small(x), y).backward()
    got, want = sliced.statistics()["0"].kronecker, reference.statistics()["0"].kronecker
    assert got is not None and want is not None
    torch.testing.assert_close(got.A, want.A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.G, want.G, rtol=1e-12, atol=1e-14)


def test_a_meta_device_model_names_the_fix() -> None:
    model = _net().to("meta")
    with pytest.raises(ValueError, match="meta device") as info:
        PreconditionedOptimizer(model, KFAC(), loss_fn=LOSS)
    assert "to_empty" in str(info.value) and "assign=True" in str(info.value)


@pytest.mark.parametrize("stats_step", [True, False], ids=["statistics-step", "plain-step"])
def test_a_layer_frozen_after_construction_names_the_fix(stats_step: bool) -> None:
    model = _net()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=LOSS, t_cov=2, t_inv=2, warmup=0)
    x, y = _data()
    _step(opt, model, x, y)  # step 0 records statistics, step 1 does not
    if not stats_step:
        _step(opt, model, x, y)
        assert opt.engine.stats_due
        _step(opt, model, x, y)
        assert not opt.engine.stats_due
    model[0].requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"\['0'\] were frozen \(requires_grad=False\)") as info:
        _step(opt, model, x, y)
    assert "exclude=['0']" in str(info.value)


class _NamedLinear(nn.Linear):
    """Adds an attribute; computes exactly what nn.Linear computes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tag = "mine"


class _ScaledLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return 2.0 * super().forward(x)


@pytest.mark.parametrize("backend", [Backend.BACKPACK, Backend.AUTOGRAD])
def test_a_subclass_of_linear_with_linears_forward_gets_the_same_statistics(
    backend: Backend,
) -> None:
    plain = _net()
    sub = nn.Sequential(_NamedLinear(4, 5), nn.Tanh(), _NamedLinear(5, 3)).to(DTYPE)
    sub.load_state_dict(plain.state_dict())
    x, y = _data()
    stats = []
    for model in (plain, sub):
        ex = CurvatureExtractor(model, LOSS, fisher_type="exact", backend=backend)
        assert ex.layout.names == ("0", "2")
        with ex.collect():
            LOSS(model(x), y).backward()
        stats.append(ex.statistics())
    for name in ("0", "2"):
        a, b = stats[0][name].kronecker, stats[1][name].kronecker
        assert a is not None and b is not None
        assert torch.equal(a.A, b.A) and torch.equal(a.G, b.G)


def test_a_subclass_with_its_own_forward_says_why_it_has_no_block() -> None:
    model = nn.Sequential(_ScaledLinear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    with pytest.raises(ValueError, match=r"subclass of nn\.Linear with its own forward") as info:
        PreconditionedOptimizer(model, KFAC(), loss_fn=LOSS, unsupported="raise")
    assert "curvlib cannot tell what it computes" in str(info.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_model_keeps_float32_statistics_and_trains(dtype: torch.dtype) -> None:
    model = _net(dtype)
    reference = _net(torch.float32)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    x, y = _data(dtype=torch.float32)
    steps, optimizers = [], []
    for net, inputs in ((model, x.to(dtype)), (reference, x)):
        before = [p.detach().float().clone() for p in net.parameters()]
        opt = PreconditionedOptimizer(net, KFAC(), loss_fn=LOSS, lr=0.1, momentum=0.0)
        _step(opt, net, inputs, y)
        assert opt.engine.inverse_failures == 0
        steps.append(
            [p.detach().float() - b for p, b in zip(net.parameters(), before, strict=True)]
        )
        optimizers.append(opt)
    factors = optimizers[0].approx.state_dict()["blocks"]["0"]["state"]
    assert factors["A"].dtype == factors["G"].dtype == torch.float32
    explicit = _net(dtype)
    ex = CurvatureExtractor(explicit, LOSS, dtype=torch.float64)  # an explicit dtype wins
    with ex.collect():
        LOSS(explicit(x.to(dtype)), y).backward()
    kron = ex.statistics()["0"].kronecker
    assert kron is not None and kron.A.dtype == torch.float64
    for got, want in zip(*steps, strict=True):
        assert torch.isfinite(got).all()
        # The step of the half-precision model is the float32 step, to its precision.
        assert float((got - want).norm()) <= 0.1 * float(want.norm())


def test_non_finite_statistics_on_the_first_step_reach_the_engines_message() -> None:
    model = _net()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=LOSS)
    record = opt.extractor.statistics
    opt.extractor.statistics = lambda: record().scaled(float("nan"))  # type: ignore[method-assign]
    x, y = _data()
    with (
        pytest.warns(RuntimeWarning, match=r"curvature statistics of layers .* contain NaN/Inf"),
        pytest.raises(RuntimeError, match="No curvature estimate to precondition with"),
    ):
        _step(opt, model, x, y)
