"""The optimizer registry of curvlib's examples: where ``--optim`` strings become objects.

``OPTIMIZERS`` maps every name to an ``OptimizerSpec`` whose ``build(model, loss_fn,
config, include=..., params=...)`` returns a ready ``torch.optim.Optimizer``. Add an
approximation by adding one entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from curvlib.core.protocols import CurvatureApprox
from curvlib.optim.hyper import LevenbergMarquardt


@dataclass(frozen=True)
class OptimConfig:
    r"""Hyper-parameters of one run, as parsed from the command line.

    Attributes:
        lr: Learning rate.
        damping: Tikhonov damping $\lambda$ of $(C + \lambda I)^{-1}$.
        adaptive_damping: Adapt $\lambda$ by the Levenberg-Marquardt rule.
        clipping: KL-clipping bound; 0 disables clipping.
        momentum: Momentum (curvature optimizers and SGD; Adam keeps its betas).
        weight_decay: L2 weight decay.
        fisher: ``mc``, ``empirical`` or ``exact``.
        stats_fraction: Fraction of each batch used by the statistics.
        t_cov: Steps between statistics updates.
        t_inv: Steps between inverse rebuilds.
        seed: Seed of MC sampling.
    """

    lr: float
    damping: float = 1e-3
    adaptive_damping: bool = False
    clipping: float = 1e-2
    momentum: float = 0.5
    weight_decay: float = 0.0
    fisher: str = "mc"
    stats_fraction: float = 1.0
    t_cov: int = 10
    t_inv: int = 10
    seed: int = 0


class Factory(Protocol):
    """``build(model, loss_fn, config, *, include=None, params=None)``.

    ``include`` (layer-name globs) restricts which layers a curvature optimizer
    preconditions; ``params`` restricts which parameters the optimizer steps (e.g.
    the generator's parameters of a ``critic(generator(z))`` composite). ``None``
    means all of ``model``.
    """

    def __call__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        cfg: OptimConfig,
        *,
        include: Sequence[str] | None = None,
        params: Iterable[nn.Parameter] | None = None,
    ) -> torch.optim.Optimizer:
        """Build the optimizer of ``model`` for ``loss_fn`` with the hyper-parameters ``cfg``."""
        ...


@dataclass(frozen=True)
class OptimizerSpec:
    """One entry of the registry.

    Attributes:
        build: ``build(model, loss_fn, config, include=..., params=...)`` returns the
            optimizer (see ``Factory``).
        default_lr: Learning rate when ``--lr`` is not given.
        curvature: Whether it is a curvlib ``PreconditionedOptimizer``.
        help: One line for ``--help``.
    """

    build: Factory
    default_lr: float
    curvature: bool
    help: str


def _curvature(make_approx: Callable[[], CurvatureApprox]) -> Factory:
    def build(
        model: nn.Module,
        loss_fn: nn.Module,
        cfg: OptimConfig,
        *,
        include: Sequence[str] | None = None,
        params: Iterable[nn.Parameter] | None = None,
    ) -> torch.optim.Optimizer:
        from curvlib.wiring import PreconditionedOptimizer

        restrict: dict[str, Any] = {} if params is None else {"params": list(params)}

        damping: float | LevenbergMarquardt = cfg.damping
        if cfg.adaptive_damping:
            damping = LevenbergMarquardt(initial=cfg.damping, interval=cfg.t_inv)
        return PreconditionedOptimizer(
            model,
            make_approx(),
            loss_fn=loss_fn,
            fisher_type=cfg.fisher,
            stats_fraction=cfg.stats_fraction,
            seed=cfg.seed,
            lr=cfg.lr,
            damping=damping,
            kl_clip=cfg.clipping if cfg.clipping > 0 else None,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            t_cov=cfg.t_cov,
            t_inv=cfg.t_inv,
            include=None if include is None else list(include),
            **restrict,
        )

    return build


# The approximations are imported when chosen, so that one unfinished module
# cannot break the others.
def _kfac() -> CurvatureApprox:
    from curvlib.approx.kfac import KFAC

    return KFAC()


def _kfac_eigen() -> CurvatureApprox:
    from curvlib.approx.kfac import KFAC, KFACDamping

    return KFAC(damping_mode=KFACDamping.EIGEN)


def _ekfac() -> CurvatureApprox:
    from curvlib.approx.ekfac import EKFAC

    return EKFAC()


def _diagonal() -> CurvatureApprox:
    from curvlib.approx.diagonal import Diagonal

    return Diagonal()


def _kpsvd() -> CurvatureApprox:
    from curvlib.approx.kpsvd import KPSVD

    return KPSVD()


def _deflation() -> CurvatureApprox:
    from curvlib.approx.deflation import Deflation

    return Deflation()


def _kfac_corrected() -> CurvatureApprox:
    from curvlib.approx.kfac_corrected import KFACCorrected

    return KFACCorrected()


def _lanczos() -> CurvatureApprox:
    from curvlib.approx.lanczos import Lanczos

    return Lanczos()


def _block_ng() -> CurvatureApprox:
    from curvlib.approx.natural_gradient import BlockNaturalGradient

    return BlockNaturalGradient()


def _exact_ng() -> CurvatureApprox:
    from curvlib.approx.natural_gradient import ExactNaturalGradient

    return ExactNaturalGradient()


def _params(model: nn.Module, params: Iterable[nn.Parameter] | None) -> list[nn.Parameter]:
    return [p for p in (model.parameters() if params is None else params) if p.requires_grad]


def _adam(
    model: nn.Module,
    loss_fn: nn.Module,
    cfg: OptimConfig,
    *,
    include: Sequence[str] | None = None,
    params: Iterable[nn.Parameter] | None = None,
) -> torch.optim.Optimizer:
    return torch.optim.Adam(_params(model, params), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _sgd(
    model: nn.Module,
    loss_fn: nn.Module,
    cfg: OptimConfig,
    *,
    include: Sequence[str] | None = None,
    params: Iterable[nn.Parameter] | None = None,
) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        _params(model, params), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


DEFAULT_CURVATURE_LR = 0.2
"""Learning rate of every curvature optimizer when ``--lr`` is not given."""

OPTIMIZERS: dict[str, OptimizerSpec] = {
    "kfac": OptimizerSpec(
        _curvature(_kfac), DEFAULT_CURVATURE_LR, True, "KFAC, pi-split damping (Cholesky)"
    ),
    "kfac-eigen": OptimizerSpec(
        _curvature(_kfac_eigen), DEFAULT_CURVATURE_LR, True, "KFAC, exact eigenbasis damping"
    ),
    "ekfac": OptimizerSpec(
        _curvature(_ekfac), DEFAULT_CURVATURE_LR, True, "KFAC's eigenbasis, refitted eigenvalues"
    ),
    "diag": OptimizerSpec(
        _curvature(_diagonal),
        DEFAULT_CURVATURE_LR,
        True,
        "diagonal of the GGN (--fisher mc/exact) or empirical Fisher (--fisher empirical)",
    ),
    "kpsvd": OptimizerSpec(
        _curvature(_kpsvd), DEFAULT_CURVATURE_LR, True, "best single Kronecker product"
    ),
    "deflation": OptimizerSpec(
        _curvature(_deflation), DEFAULT_CURVATURE_LR, True, "best sum of two Kronecker products"
    ),
    "kfac-corrected": OptimizerSpec(
        _curvature(_kfac_corrected), DEFAULT_CURVATURE_LR, True, "KFAC plus its best correction"
    ),
    "lanczos": OptimizerSpec(
        _curvature(_lanczos), DEFAULT_CURVATURE_LR, True, "rank-2 Kronecker sum by Lanczos"
    ),
    "block-ng": OptimizerSpec(
        _curvature(_block_ng), DEFAULT_CURVATURE_LR, True, "exact block-diagonal natural gradient"
    ),
    "exact-ng": OptimizerSpec(
        _curvature(_exact_ng), DEFAULT_CURVATURE_LR, True, "exact natural gradient (Woodbury)"
    ),
    "adam": OptimizerSpec(_adam, 1e-3, False, "torch.optim.Adam"),
    "sgd": OptimizerSpec(_sgd, 1.0, False, "torch.optim.SGD with momentum"),
}
"""Every ``--optim`` name and how to build it: the only place strings become optimizers."""


def build_optimizer(
    name: str,
    model: nn.Module,
    loss_fn: nn.Module,
    config: OptimConfig,
    *,
    include: Sequence[str] | None = None,
    params: Iterable[nn.Parameter] | None = None,
) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` (``include``, ``params``: see ``Factory``)."""
    return OPTIMIZERS[name].build(model, loss_fn, config, include=include, params=params)
