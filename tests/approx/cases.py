"""The approximations under test and the statistics they are fitted on.

Every approximation in ``APPROXIMATIONS`` runs through the generic checks of
``test_generic.py``; add new ones here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from curvlib.approx.base import LayerwiseApprox
from curvlib.approx.deflation import Deflation
from curvlib.approx.diagonal import Diagonal
from curvlib.approx.ekfac import EKFAC, EKFACDamping
from curvlib.approx.kfac import KFAC, ConvDamping, KFACDamping
from curvlib.approx.kfac_corrected import KFACCorrected
from curvlib.approx.kpsvd import KPSVD
from curvlib.approx.lanczos import Lanczos
from curvlib.approx.natural_gradient import BlockNaturalGradient, NGDamping
from curvlib.approx.unitwise import UnitWiseNaturalGradient
from curvlib.core import CurvatureStatistics, FisherType
from curvlib.extract import CurvatureExtractor, UnsupportedPolicy
from tests import problems as P
from tests.problems import Problem


@dataclass(frozen=True)
class ApproxCase:
    """One approximation configuration.

    Attributes:
        name: Test id.
        make: Builds a fresh approximation.
        psd: Whether the undamped dense form is guaranteed positive semi-definite.
    """

    name: str
    make: Callable[[], LayerwiseApprox] = field(repr=False)
    psd: bool = True


APPROXIMATIONS = [
    ApproxCase("kfac_pi", lambda: KFAC(KFACDamping.PI)),
    ApproxCase("kfac_eigen", lambda: KFAC(KFACDamping.EIGEN)),
    ApproxCase(  # the KPSVD papers' rule: sqrt(lambda) on both factors, lambda/T for convs
        "kfac_sqrt_per_position",
        lambda: KFAC(KFACDamping.SQRT, conv_damping=ConvDamping.PER_POSITION),
    ),
    ApproxCase("ekfac", lambda: EKFAC()),
    ApproxCase("ekfac_exact", lambda: EKFAC(EKFACDamping.EXACT)),
    ApproxCase("diagonal", lambda: Diagonal()),
    ApproxCase("kpsvd", lambda: KPSVD()),
    ApproxCase("kpsvd_sqrt", lambda: KPSVD(KFACDamping.SQRT)),
    ApproxCase("deflation", lambda: Deflation(), psd=False),
    ApproxCase("kfac_corrected", lambda: KFACCorrected(), psd=False),
    ApproxCase("lanczos", lambda: Lanczos(), psd=False),
    ApproxCase("block_ng_exact", lambda: BlockNaturalGradient(NGDamping.EXACT)),
    ApproxCase("block_ng_heuristic", lambda: BlockNaturalGradient(NGDamping.HEURISTIC)),
    ApproxCase("unit_wise_ng", lambda: UnitWiseNaturalGradient()),
]

PROBLEMS = [P.mlp_ce(), P.cnn_ce(), P.tconv_bce()]


def fit_statistics(
    problem: Problem,
    approx: LayerwiseApprox,
    fisher: FisherType = FisherType.EXACT,
    model: nn.Module | None = None,
    seed: int = 0,
) -> CurvatureStatistics:
    """Extract the statistics ``approx`` needs on the problem's batch."""
    model = problem.model() if model is None else model
    ex = CurvatureExtractor(
        model,
        problem.loss_fn,
        stats=approx.required_stats,
        fisher_type=fisher,
        unsupported=UnsupportedPolicy.IGNORE,
        seed=seed,
    )
    with ex.collect():
        problem.loss_fn(model(problem.x), problem.y).backward()
    model.zero_grad()
    return ex.statistics()


def perturbed(problem: Problem, scale: float = 0.3) -> Problem:
    """The problem with a different batch (same shapes), for multi-step runs."""
    gen = torch.Generator().manual_seed(123)
    x = problem.x + scale * torch.randn(problem.x.shape, generator=gen, dtype=problem.x.dtype)
    return Problem(
        f"{problem.name}[perturbed]",
        problem.make_model,
        problem.loss_fn,
        x,
        problem.y,
        train=problem.train,
        backpack=problem.backpack,
        seed=problem.seed,
    )
