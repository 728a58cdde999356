"""Every approximation trains every small problem through PreconditionedOptimizer."""

from __future__ import annotations

import pytest

from curvlib.wiring import PreconditionedOptimizer
from tests import problems as P
from tests.approx.cases import APPROXIMATIONS, ApproxCase
from tests.hyper import FRESH


def _binary(problem: P.Problem) -> P.Problem:
    """Hard targets, so that the loss can approach zero (soft targets bound it below)."""
    return problem.with_loss(problem.loss_fn, y=(problem.y > 0.5).to(problem.y.dtype))


DAMPING = 1e-3

TRAINING = [
    # (problem, largest final/initial loss ratio after 20 full-batch steps)
    (P.mlp_ce(n=32), 0.9),
    (P.cnn_ce(n=16), 0.05),
    (_binary(P.tconv_bce(n=8)), 0.85),
]

SLOWER = {
    # The heuristic per-layer damping adds sqrt(lambda) (|A| + |G|); A sums over the
    # output positions of a convolution, so the transposed-conv layers are damped hard.
    ("block_ng_heuristic", "tconv_bce[BCEWithLogitsLoss:mean]"): 0.97,
    # EKFAC's own bound on a layer's step, 0.1 of its weights' norm, binds at this
    # learning rate on the small transposed convolutions (0.88 of the loss after 20 steps).
    ("ekfac", "tconv_bce[BCEWithLogitsLoss:mean]"): 0.9,
    ("ekfac_exact", "tconv_bce[BCEWithLogitsLoss:mean]"): 0.9,
}


@pytest.mark.parametrize(("problem", "factor"), TRAINING, ids=lambda v: getattr(v, "name", ""))
@pytest.mark.parametrize("case", APPROXIMATIONS, ids=lambda c: c.name)
def test_trains(case: ApproxCase, problem: P.Problem, factor: float) -> None:
    model = problem.model()
    opt = PreconditionedOptimizer(
        model, case.make(), loss_fn=problem.loss_fn, lr=0.5, damping=DAMPING, kl_clip=1e-1,
        momentum=0.5, fisher_type="exact", **FRESH,
    )  # fmt: skip
    losses = []
    for _ in range(20):
        opt.zero_grad()
        with opt.record():
            loss = problem.loss_fn(model(problem.x), problem.y)
            loss.backward()
        opt.step()
        losses.append(loss.item())
    factor = SLOWER.get((case.name, problem.name), factor)
    assert losses[-1] < factor * losses[0], losses
