"""Fault injection: every fault ends in a stated, asserted outcome, never a crash.

Each case trains a good step first (so a preconditioner exists), injects one
fault into the next step, and checks the outcome the docs promise:

* a fault in the loss, the input or the gradient **skips the step** with a
  warning naming the layer(s); parameters and momentum stay bit-identical and
  the live preconditioner is the same object;
* a fault in the statistics or the factorisation **skips the curvature update
  or the inverse** with a warning naming the layer(s); the last good
  preconditioner is kept and the step is taken with it.

Every case runs under every Fisher flavour and both backends; then training
goes on and ends finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from curvlib.approx.ekfac import EKFAC
from curvlib.approx.kfac import KFAC
from curvlib.core import FisherType
from curvlib.extract import Backend
from curvlib.wiring import PreconditionedOptimizer
from tests import problems as P
from tests.hyper import FRESH, train_steps

FLAVOURS = [FisherType.MC, FisherType.EXACT, FisherType.EMPIRICAL]
BACKENDS = [Backend.BACKPACK, Backend.AUTOGRAD]
MATRIX = [
    pytest.param(f, b, id=f"{f.value}-{b.value}") for f in FLAVOURS for b in BACKENDS
]  # fmt: skip


class Run:
    """A small classifier, its optimizer, and one recorded step with a fault injected."""

    def __init__(
        self,
        fisher: FisherType,
        backend: Backend,
        approx: Any = None,
        good_steps: int = 1,
        schedule: dict[str, Any] | None = None,
    ) -> None:
        problem = P.mlp_ce()
        self.x, self.y, self.loss_fn = problem.x, problem.y, problem.loss_fn
        self.model = problem.model()
        self.opt = PreconditionedOptimizer(
            self.model, KFAC() if approx is None else approx, loss_fn=self.loss_fn,
            fisher_type=fisher, backend=backend, momentum=0.9, **(schedule or FRESH),
        )  # fmt: skip
        train_steps(self.opt, self.model, self.loss_fn, [(self.x, self.y)] * good_steps)
        self.params = [p.detach().clone() for p in self.model.parameters()]
        self.buffers = [
            self.opt.state[p]["momentum_buffer"].clone() for p in self.model.parameters()
        ]
        self.precond = self.opt.engine._precond

    def step(
        self,
        x: torch.Tensor | None = None,
        loss_factor: float = 1.0,
        after_backward: Callable[[PreconditionedOptimizer], None] | None = None,
    ) -> None:
        self.opt.zero_grad()
        with self.opt.record():
            out = self.model(self.x if x is None else x)
            (loss_factor * self.loss_fn(out, self.y)).backward()
        if after_backward is not None:
            after_backward(self.opt)
        self.opt.step()

    def unchanged(self) -> bool:
        params = zip(self.model.parameters(), self.params, self.buffers, strict=True)
        return all(
            torch.equal(p, q) and torch.equal(self.opt.state[p]["momentum_buffer"], b)
            for p, q, b in params
        )

    def goes_on(self) -> None:
        with torch.autograd.set_detect_anomaly(False):
            train_steps(self.opt, self.model, self.loss_fn, [(self.x, self.y)] * 2)
        assert all(torch.isfinite(p).all() for p in self.model.parameters())


# -- faults that skip the step ------------------------------------------------


def _bad_input(value: float) -> torch.Tensor:
    x = P.mlp_ce().x.clone()
    x[3, 0] = value
    return x


STEP_FAULTS = {
    "nan-loss": {"loss_factor": math.nan},
    "inf-loss": {"loss_factor": math.inf},
    "overflowing-loss": {"loss_factor": 1e308 * 10.0},
    "nan-input": {"x": _bad_input(math.nan)},
    "inf-input": {"x": _bad_input(math.inf)},
}


@pytest.mark.parametrize("fault", list(STEP_FAULTS))
@pytest.mark.parametrize(("fisher", "backend"), MATRIX)
def test_a_bad_loss_or_input_skips_the_step(
    fisher: FisherType, backend: Backend, fault: str
) -> None:
    run = Run(fisher, backend)
    with pytest.warns(RuntimeWarning, match=r"skipped: the gradient of \['.+\] contains NaN/Inf"):
        run.step(**STEP_FAULTS[fault])
    assert run.unchanged() and run.opt.skipped_steps == 1
    assert run.opt.engine._precond is run.precond
    run.goes_on()


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize(("fisher", "backend"), MATRIX)
def test_a_bad_gradient_skips_the_step_naming_its_layer(
    fisher: FisherType, backend: Backend, value: float
) -> None:
    run = Run(fisher, backend)

    def plant(opt: PreconditionedOptimizer) -> None:
        opt.layers[1].weight.grad[0, 0] = value  # type: ignore[index]

    with pytest.warns(RuntimeWarning, match=r"the gradient of \['2'\] contains NaN/Inf"):
        run.step(after_backward=plant)
    assert run.unchanged() and run.opt.engine._precond is run.precond
    run.goes_on()


IDLE = {"t_cov": 10, "t_inv": 10, "warmup": 0, "stats_fraction": 1.0}
"""Statistics and an inverse at step 0 only: the next steps prepare nothing."""


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_bad_gradient_on_a_step_without_statistics_skips_it_alike(value: float) -> None:
    # There the check of the gradients travels with the directions' measurements (one
    # host synchronisation in all): the step is skipped as on a statistics step.
    run = Run(FisherType.MC, Backend.AUTOGRAD, schedule=IDLE)
    assert all(engine.prepare_idle for engine in run.opt.engines)

    def plant(opt: PreconditionedOptimizer) -> None:
        opt.layers[1].weight.grad[0, 0] = value  # type: ignore[index]

    with pytest.warns(RuntimeWarning, match=r"skipped: the gradient of \['2'\] contains NaN/Inf"):
        run.step(after_backward=plant)
    assert run.unchanged() and run.opt.skipped_steps == 1
    assert run.opt.engine._precond is run.precond
    run.goes_on()


# -- faults that skip the curvature update or the inverse ---------------------


def _plant_statistics(value: float) -> Callable[[PreconditionedOptimizer], None]:
    def plant(opt: PreconditionedOptimizer) -> None:
        kron = opt.engine._pending[0].layers["2"].kronecker
        assert kron is not None
        kron.G[0, 0] = value

    return plant


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize(("fisher", "backend"), MATRIX)
def test_bad_statistics_keep_the_last_good_preconditioner(
    fisher: FisherType, backend: Backend, value: float
) -> None:
    run = Run(fisher, backend)
    estimate = run.opt.engine.approx.state_dict()
    with pytest.warns(RuntimeWarning, match=r"statistics of layers \['2'\] contain NaN/Inf"):
        run.step(after_backward=_plant_statistics(value))
    assert run.opt.engine.skipped_updates == 1
    state = run.opt.engine.approx.state_dict()
    for name in ("0", "2", "4"):
        for key in ("A", "G"):
            assert torch.equal(
                state["blocks"][name]["state"][key], estimate["blocks"][name]["state"][key]
            )
    run.goes_on()


def _indefinite(opt: PreconditionedOptimizer) -> None:
    kron = opt.engine._pending[0].layers["2"].kronecker
    assert kron is not None
    kron.A.copy_(-1e6 * torch.eye(kron.A.shape[0], dtype=kron.A.dtype))


@pytest.mark.parametrize(("fisher", "backend"), MATRIX)
def test_an_indefinite_factor_keeps_the_last_good_inverse(
    fisher: FisherType, backend: Backend
) -> None:
    run = Run(fisher, backend)
    with pytest.warns(RuntimeWarning, match=r"damped inverse failed \(layer '2'"):
        run.step(after_backward=_indefinite)
    assert run.opt.engine._precond is run.precond and run.opt.engine.inverse_failures == 1
    assert not run.unchanged()  # the step itself is taken, with the last good inverse
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


@pytest.mark.parametrize(("fisher", "backend"), MATRIX)
def test_singular_statistics_are_damped_not_fatal(fisher: FisherType, backend: Backend) -> None:
    run = Run(fisher, backend)

    def zero(opt: PreconditionedOptimizer) -> None:
        for layer in opt.engine._pending[0].layers.values():
            assert layer.kronecker is not None
            layer.kronecker.A.zero_()
            layer.kronecker.G.zero_()

    run.step(after_backward=zero)
    assert run.opt.engine.inverse_failures == 0 and run.opt.skipped_steps == 0
    run.goes_on()


@pytest.mark.parametrize(("fisher", "backend"), MATRIX)
def test_eigh_that_never_converges_keeps_the_last_eigenbasis(
    fisher: FisherType, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = Run(fisher, backend, approx=EKFAC(), good_steps=2)  # the basis is stale after two
    estimate = run.opt.engine.approx.state_dict()

    def fail(*args: object, **kwargs: object) -> None:
        raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", fail)
    with pytest.warns(
        RuntimeWarning, match=r"refreshing the curvature estimate failed \(layer '0'"
    ):
        run.step()
    assert run.opt.engine.inverse_failures >= 1
    bases = run.opt.engine.approx.state_dict()["blocks"]
    for name in ("0", "2", "4"):
        for key, value in estimate["blocks"][name]["state"].items():
            if key.startswith("basis"):
                assert torch.equal(bases[name]["state"][key], value), (name, key)
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    monkeypatch.undo()
    run.goes_on()


def test_the_fault_matrix_covers_every_flavour_and_backend() -> None:
    assert {f for f in FisherType} == set(FLAVOURS)
    assert {Backend.BACKPACK, Backend.AUTOGRAD} == set(BACKENDS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mse_and_bce_with_nan_inputs_skip_too(backend: Backend) -> None:
    for problem in (P.mlp_mse(), P.autoencoder_bce()):
        model = problem.model()
        opt = PreconditionedOptimizer(
            model, KFAC(), loss_fn=problem.loss_fn, backend=backend, unsupported="ignore", **FRESH
        )
        train_steps(opt, model, problem.loss_fn, [(problem.x, problem.y)])
        x = problem.x.clone()
        x.view(-1)[0] = math.nan
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.warns(RuntimeWarning, match="skipped"):
            train_steps(opt, model, problem.loss_fn, [(x, problem.y)])
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
        assert isinstance(problem.loss_fn, nn.Module)
