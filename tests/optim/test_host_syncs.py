"""Host synchronisations per step, counted on the CPU by ``curvlib.optim.syncs``.

The counts are exact: a change that adds a read fails here, and one that removes
a read updates the count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from curvlib import EKFAC, KFAC, KPSVD, Diagonal, PreconditionedOptimizer
from curvlib.optim.syncs import host_reads


def _steps(
    approx: Any, count: int, deferred_checks: bool | str = "auto"
) -> tuple[PreconditionedOptimizer, Callable[[], None]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    loss_fn = nn.CrossEntropyLoss()
    opt = PreconditionedOptimizer(model, approx, loss_fn=loss_fn, deferred_checks=deferred_checks)
    x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))

    def step() -> None:
        opt.zero_grad()
        with opt.record():
            loss_fn(model(x), y).backward()
        opt.step()

    for _ in range(count):
        step()
    return opt, step


@pytest.mark.parametrize("make", [KFAC, EKFAC, KPSVD, Diagonal], ids=lambda m: m.__name__)
def test_a_regular_step_reads_the_device_once(make: Callable[[], Any]) -> None:
    opt, step = _steps(make(), 25)  # the defaults: statistics every 10 steps after the warm-up
    assert all(engine.prepare_idle for engine in opt.engines)
    with host_reads() as reads:
        step()
    # The gradients' finiteness, the inner products and norms of the KL clip and the
    # guards, in one transfer.
    assert reads.count == 1


# A statistics step's reads: the gradients' and the statistics' finiteness in one transfer
# (before anything is folded in), the sub-batch's indices (drawn on the CPU's generator:
# on a GPU no synchronisation), then per approximation its own, then the directions'
# measurements. KFAC and the diagonal read their whole preconditioner once (every layer's
# Cholesky info, shifts and condition estimate; ``InverseDraft``); EKFAC also its new
# eigenbases once; KPSVD's power iterations read each iterate's norm to decide convergence
# (so their count, at its default tolerance, is part of it).
STATISTICS_STEP_READS = {KFAC: 4, EKFAC: 5, KPSVD: 30, Diagonal: 4}


@pytest.mark.parametrize("make", list(STATISTICS_STEP_READS), ids=lambda m: m.__name__)
def test_the_reads_of_a_statistics_step(make: Callable[[], Any]) -> None:
    opt, step = _steps(make(), 20)  # step 20 folds in statistics and rebuilds the inverse
    assert not all(engine.prepare_idle for engine in opt.engines)
    with host_reads() as reads:
        step()
    assert "time_inverse" in opt.last_stats
    assert reads.count == STATISTICS_STEP_READS[make]


@pytest.mark.parametrize("make", list(STATISTICS_STEP_READS), ids=lambda m: m.__name__)
def test_a_deferred_statistics_step_checks_its_inverse_with_the_directions(
    make: Callable[[], Any],
) -> None:
    # With deferred checks (what "auto" does off the CPU) the inverse is built without
    # reading its checks (``LayerwiseApprox.inverse_ahead``), and they are read with the
    # directions' measurements: one read less. On a GPU a KFAC or diagonal statistics
    # step then waits twice: the gradients' and statistics' check, and the directions'
    # (the sub-batch's indices come from the CPU's generator).
    opt, step = _steps(make(), 20, deferred_checks=True)
    with host_reads() as reads:
        step()
    assert reads.count == STATISTICS_STEP_READS[make] - 1
    assert set(opt.last_stats["condition_numbers"]) == {"0", "2"}


def test_the_counter_sees_every_kind_of_read() -> None:
    with host_reads() as reads:
        t = torch.ones(3)
        float(t.sum())
        bool(t.all())
        t.tolist()
        t.cpu()
        t.nonzero()
    assert reads.count == 5
