"""On a GPU: every approximation steps on CUDA as on the CPU, and trains under autocast.

Marked ``cuda`` and skipped without a GPU, so CI (no GPU) stays green; they run on
the GPU machine (``pytest -m cuda``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from curvlib import (
    EKFAC,
    KFAC,
    KPSVD,
    Deflation,
    Diagonal,
    ExactNaturalGradient,
    FisherType,
    KFACCorrected,
    Lanczos,
    NaturalGradientPreconditioner,
    PreconditionedOptimizer,
    TwoLevel,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

APPROXIMATIONS: dict[str, Callable[[], Any]] = {
    "kfac": KFAC,
    "ekfac": EKFAC,
    "kpsvd": KPSVD,
    "deflation": Deflation,
    "lanczos": Lanczos,
    "kfac-corrected": KFACCorrected,
    "diagonal": Diagonal,
    "exact-ng": ExactNaturalGradient,
    "two-level": lambda: TwoLevel(KFAC()),
}


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    return net.to(dtype)


def _train(
    make: Callable[[], Any],
    device: str,
    dtype: torch.dtype,
    fisher: FisherType,
    autocast: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    net = _model(dtype).to(device)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 1, 8, 8, generator=gen, dtype=dtype).to(device)
    y = torch.randint(0, 10, (32,), generator=gen).to(device)
    opt = PreconditionedOptimizer(
        net, make(), loss_fn=loss_fn, fisher_type=fisher, stats_fraction=1.0
    )
    for _ in range(3):
        opt.zero_grad()
        with opt.record():
            with torch.autocast(device, dtype=autocast or torch.float16, enabled=bool(autocast)):
                loss = loss_fn(net(x), y)
            loss.backward()
        opt.step()
    return {k: v.detach().cpu() for k, v in net.named_parameters()}


@pytest.mark.parametrize("make", APPROXIMATIONS.values(), ids=list(APPROXIMATIONS))
def test_three_steps_on_cuda_equal_those_on_the_cpu_in_float64(make: Callable[[], Any]) -> None:
    # The empirical Fisher on the whole batch: statistics without random draws.
    cpu = _train(make, "cpu", torch.float64, FisherType.EMPIRICAL)
    cuda = _train(make, "cuda", torch.float64, FisherType.EMPIRICAL)
    for name, value in cpu.items():
        torch.testing.assert_close(cuda[name], value, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("make", APPROXIMATIONS.values(), ids=list(APPROXIMATIONS))
def test_every_approximation_trains_under_cuda_autocast(
    make: Callable[[], Any], dtype: torch.dtype
) -> None:
    before = _model(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no skipped update, no failed inverse
        after = _train(make, "cuda", torch.float32, FisherType.MC, autocast=dtype)
    moved = [name for name, p in before.named_parameters() if not torch.equal(p, after[name])]
    assert moved == [name for name, _ in before.named_parameters()]
    assert all(bool(torch.isfinite(p).all()) for p in after.values())


def _sync_warnings(step: Callable[[], None]) -> int:
    """The synchronisations ``torch.cuda.set_sync_debug_mode("warn")`` reports in ``step``."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_kfac_steps_wait_for_the_gpu_as_often_as_counted_on_the_cpu() -> None:
    # tests/optim/test_host_syncs.py counts the reads on the CPU: one per regular step
    # (none with deferred checks), and on a statistics step the gradients' and statistics'
    # check, then the directions with the new inverse's checks (deferred checks, the
    # default on CUDA; on the host the inverse is read on its own). The sub-batch's
    # indices, drawn on the CPU, do not wait for the GPU.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10)).cuda()
    loss_fn = nn.CrossEntropyLoss()
    opt = PreconditionedOptimizer(net, KFAC(), loss_fn=loss_fn, stats_fraction=1.0)
    x, y = torch.randn(64, 20, device="cuda"), torch.randint(0, 10, (64,), device="cuda")

    def step() -> None:
        opt.zero_grad()
        with opt.record():
            loss_fn(net(x), y).backward()
        opt.step()

    for _ in range(20):
        step()
    assert not all(engine.prepare_idle for engine in opt.engines)
    assert _sync_warnings(step) <= 2  # step 20: statistics and inverse
    assert all(engine.prepare_idle for engine in opt.engines)
    # Step 21, a regular step: with deferred checks (the default on CUDA) no wait at all;
    # "error" makes any synchronisation in curvlib's step raise where it happens.
    opt.zero_grad()
    with opt.record():
        loss_fn(net(x), y).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.last_stats["skipped"] is False  # read now, after the step
    opt.deferred_checks = False
    assert _sync_warnings(step) <= 1  # checks on the host: one read


def test_a_regular_step_of_preconditioner_mode_does_not_wait_for_the_gpu() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10)).cuda()
    loss_fn = nn.CrossEntropyLoss()
    precond = NaturalGradientPreconditioner(net, KFAC(), loss_fn=loss_fn, kl_clip=1e-3, lr=0.1)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(64, 20, device="cuda"), torch.randint(0, 10, (64,), device="cuda")

    def backward() -> None:
        sgd.zero_grad()
        with precond.record():
            loss_fn(net(x), y).backward()

    for _ in range(20):
        backward()
        precond.step()
        sgd.step()
    backward()
    assert not precond.engine.prepare_idle  # step 20: statistics and inverse
    # The gradients' and statistics' check, then the new inverse's checks.
    assert _sync_warnings(precond.step) <= 2
    sgd.step()
    assert precond.engine.prepare_idle  # step 21: nothing due
    backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # around curvlib's step alone, not torch's SGD
    try:
        precond.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert precond.skipped_steps == 0 and precond.last_stats["kl_clip_factor"] is not None


def test_inverses_overlapped_on_a_second_stream_are_those_of_their_estimates() -> None:
    # overlap_inverse: each inverse is built on a second stream from the estimate of the
    # rebuild that started it, and installed 3 steps later (tests/optim/test_overlap_inverse.py
    # checks the schedule on the CPU, where a thread builds them).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10)).double().cuda()
    loss_fn = nn.CrossEntropyLoss()
    opt = PreconditionedOptimizer(
        net, KFAC(), loss_fn=loss_fn, stats_fraction=1.0, overlap_inverse=3
    )
    gen = torch.Generator().manual_seed(1)
    mats = {
        name: torch.randn(*shape, generator=gen, dtype=torch.float64).cuda()
        for name, shape in (("0", (30, 21)), ("2", (10, 31)))
    }
    started, installed = None, []
    for k in range(25):
        x = torch.randn(64, 20, generator=gen, dtype=torch.float64).cuda()
        y = torch.randint(0, 10, (64,), generator=gen).cuda()
        opt.zero_grad()
        with opt.record():
            loss_fn(net(x), y).backward()
        opt.step()
        engine = opt.engine
        if engine.inverse_rebuilt and k >= 10:
            installed.append(k)
            assert started is not None
            source, damping = started
            live, expected = engine._precond.apply(mats), source.inverse(damping).apply(mats)
            for name in mats:
                torch.testing.assert_close(live[name], expected[name], rtol=1e-10, atol=0)
        if engine._building is not None and engine._building.step == k:
            started = (engine._building.source, engine._building.damping)
    assert installed == [13, 23]


def test_an_overlapped_build_that_fails_on_the_second_stream_keeps_the_last_inverse() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10)).cuda()
    loss_fn = nn.CrossEntropyLoss()
    approx = KFAC()
    opt = PreconditionedOptimizer(net, approx, loss_fn=loss_fn, overlap_inverse=3)
    x, y = torch.randn(64, 20, device="cuda"), torch.randint(0, 10, (64,), device="cuda")

    def broken(damping: float) -> None:
        raise RuntimeError("planted failure")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(24):
            if k == 20:
                approx.inverse_ahead = broken  # type: ignore[method-assign]
            opt.zero_grad()
            with opt.record():
                loss_fn(net(x), y).backward()
            opt.step()
    assert opt.engine.inverse_failures == 1
    assert any("started at step 20 failed" in str(w.message) for w in caught)
    assert opt.skipped_steps == 0
