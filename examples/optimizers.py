"""The optimizer registry of curvlib's examples: where ``--optim`` strings become objects.

``OPTIMIZERS`` maps every name to an ``OptimizerSpec`` whose ``build(model, loss_fn,
config, include=..., params=...)`` returns a ready ``torch.optim.Optimizer``. Add an
approximation by adding one entry.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from curvlib.core.protocols import CurvatureApprox
from curvlib.core.stats import StatKind
from curvlib.extract import coupling_modules
from curvlib.optim.defaults import DEFAULTS, default_damping, default_kl_clip, default_t_inv
from curvlib.optim.hyper import DampingWarmup, LevenbergMarquardt


@dataclass(frozen=True)
class OptimConfig:
    r"""Hyper-parameters of one run, as parsed from the command line.

    Attributes:
        lr: Learning rate.
        damping: Tikhonov damping $\lambda$ of $(C + \lambda I)^{-1}$ (``None``: the
            approximation's own, ``curvlib.optim.defaults.default_damping``:
            $3\cdot10^{-4}$, the Diagonal's $3\cdot10^{-3}$).
        adaptive_damping: Adapt $\lambda$ by the Levenberg-Marquardt rule.
        clipping: KL-clipping bound; 0 disables clipping (``None``: the
            approximation's own, ``curvlib.optim.defaults.default_kl_clip``:
            $3\cdot10^{-3}$, EKFAC's $1.5\cdot10^{-3}$).
        momentum: Momentum (curvature optimizers and SGD; Adam keeps its betas).
        weight_decay: L2 weight decay.
        decoupled_weight_decay: Curvature optimizers: add ``weight_decay * theta`` to
            the step after preconditioning, clipping and momentum instead of to the
            gradient (``PreconditionedOptimizer``'s ``decoupled_weight_decay``).
        kl_clip_lr_squared: Include $\eta^2$ in the KL clip.
        damping_mode: ``damping_mode`` of approximations that have one and whose
            name does not fix it (``None``: theirs).
        conv_damping: ``conv_damping`` of approximations that have one (``None``: theirs).
        decay: Running-average ``decay`` of the approximation (``None``: its default).
        fisher: ``mc``, ``empirical`` or ``exact``.
        stats_fraction: Fraction of each batch used by the statistics.
        t_cov: Steps between statistics updates.
        t_inv: Steps between inverse rebuilds (``None``: the approximation's
            own, ``curvlib.optim.defaults.default_t_inv``: 10, EKFAC's 20).
        warmup: Steps at the start with curvature refreshes at doubling intervals.
        refresh_on_move: Refresh the curvature also when some layer's weights
            moved by this fraction of their norm since the last statistics.
        max_move: Largest step of a layer's weights as a fraction of their
            norm (the optimizer's ``max_move``; 0: no bound; ``None``: the
            approximation's, ``curvlib.optim.defaults.default_max_move``).
        overlap_inverse: Steps during which a rebuilt inverse is built in the
            background before it is used (0: at once; ``overlap_inverse`` of
            the optimizer).
        split_inverses: Under ``torchrun``, what the owners of a layer's
            curvature work send: ``"directions"`` or ``"inverses"``
            (``DataParallel(split_inverses=True, broadcast=...)``); ``None``:
            every rank does all of it.
        damping_warmup_samples: Damping times $n_0/n$ while the statistics have
            seen $n < n_0$ samples (0: none; ignored with ``adaptive_damping``;
            ``None``: the approximation's, ``default_damping(approx).samples``).
        seed: Seed of MC sampling.
        coarse_space: A key of ``COARSE_SPACES``: wrap the approximation in a
            two-level correction with that coarse space (``None``: none).
        krylov: Krylov enrichment of the coarse space.
        coarse_form: ``residual`` or ``additive`` (see ``CorrectionForm``).
        coarse_samples: ``TwoLevel``'s ``max_samples``: the samples of each
            statistics batch the coarse level's Fisher uses (``"auto"``,
            ``None`` for all, or an int).
    """

    lr: float
    damping: float | None = None
    adaptive_damping: bool = False
    clipping: float | None = None
    momentum: float = DEFAULTS.momentum
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    kl_clip_lr_squared: bool = True
    damping_mode: str | None = None
    conv_damping: str | None = None
    decay: float | None = None
    fisher: str = "mc"
    stats_fraction: float = DEFAULTS.stats_fraction
    t_cov: int = DEFAULTS.t_cov
    t_inv: int | None = None
    warmup: int = DEFAULTS.warmup
    refresh_on_move: float = DEFAULTS.refresh_on_move
    max_move: float | None = None
    overlap_inverse: int = 0
    split_inverses: str | None = None
    damping_warmup_samples: int | None = None
    seed: int = 0
    coarse_space: str | None = None
    krylov: bool = False
    coarse_form: str = "residual"
    coarse_samples: int | str | None = "auto"


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
        default_momentum: Momentum when ``--momentum`` is not given.
        curvature: Whether it is a curvlib ``PreconditionedOptimizer``.
        help: One line for ``--help``.
    """

    build: Factory
    default_lr: float
    curvature: bool
    help: str
    default_momentum: float = DEFAULTS.momentum


def approx_options(cfg: OptimConfig) -> dict[str, Any]:
    """The approximation's keyword arguments the configuration sets (``None``: left out)."""
    options = {
        "damping_mode": cfg.damping_mode,
        "conv_damping": cfg.conv_damping,
        "decay": cfg.decay,
    }
    return {key: value for key, value in options.items() if value is not None}


def _curvature(make_approx: Callable[..., CurvatureApprox]) -> Factory:
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
        if cfg.split_inverses is not None:
            from curvlib.distributed import DataParallel

            restrict["data_parallel"] = DataParallel(
                split_inverses=True, broadcast=cfg.split_inverses
            )

        approx = make_approx(**approx_options(cfg))
        if cfg.coarse_space is not None:
            approx = two_level(
                lambda: approx, cfg.coarse_space, cfg.krylov, cfg.coarse_form, cfg.coarse_samples
            )()
        refuse_coupled_samples(model, approx)
        own = default_damping(approx)
        t_inv = default_t_inv(approx) if cfg.t_inv is None else cfg.t_inv
        clipping = default_kl_clip(approx) if cfg.clipping is None else cfg.clipping
        lam = own.damping if cfg.damping is None else cfg.damping
        samples = own.samples if cfg.damping_warmup_samples is None else cfg.damping_warmup_samples
        damping: float | LevenbergMarquardt | DampingWarmup = lam
        if cfg.adaptive_damping:
            damping = LevenbergMarquardt(initial=lam, interval=t_inv)
        elif samples:
            damping = DampingWarmup(lam, samples=samples)
        return PreconditionedOptimizer(
            model,
            approx,
            loss_fn=loss_fn,
            fisher_type=cfg.fisher,
            stats_fraction=cfg.stats_fraction,
            seed=cfg.seed,
            lr=cfg.lr,
            damping=damping,
            kl_clip=clipping if clipping > 0 else None,
            kl_clip_lr_squared=cfg.kl_clip_lr_squared,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            decoupled_weight_decay=cfg.decoupled_weight_decay,
            t_cov=cfg.t_cov,
            t_inv=t_inv,
            warmup=cfg.warmup,
            refresh_on_move=cfg.refresh_on_move,
            max_move="default" if cfg.max_move is None else cfg.max_move or None,
            # Only where asked for: approximations that cannot overlap refuse it.
            **({"overlap_inverse": cfg.overlap_inverse} if cfg.overlap_inverse else {}),
            include=None if include is None else list(include),
            **restrict,
        )

    return build


def refuse_coupled_samples(model: nn.Module, approx: CurvatureApprox) -> None:
    """Refuse an approximation of per-sample statistics for a model whose BatchNorm couples them.

    The examples train in train mode, where BatchNorm normalises each sample with
    the batch's statistics, so a sample's gradient depends on the others and
    per-sample statistics do not exist (curvlib would refuse them at the first
    statistics step). Said here, before any training, with what does work.

    Raises:
        ValueError: If ``approx`` needs statistics other than Kronecker factors
            and ``model`` has BatchNorm in train mode (or without running
            statistics, which normalises with the batch's in eval mode too).
    """
    per_sample = set(getattr(approx, "required_stats", ())) - {StatKind.KRONECKER}
    coupling = coupling_modules(model)
    if per_sample and coupling:
        shown = ", ".join(coupling[:3]) + (f" and {len(coupling) - 3} more" if coupling[3:] else "")
        raise ValueError(
            f"{type(approx).__name__} needs per-sample statistics "
            f"({', '.join(sorted(k.name for k in per_sample))}), which this network does not "
            f"have: its BatchNorm layers ({shown}) normalise each sample with the batch's "
            "statistics in training. Use kfac or kfac-eigen (Kronecker factors only), or a "
            "network without BatchNorm."
        )


def _approx(module: str, cls: str, **kwargs: Any) -> Callable[..., CurvatureApprox]:
    """Builds ``curvlib.approx.<module>.<cls>(**options, **kwargs)``, imported when chosen.

    Importing on demand keeps one unfinished approximation from breaking the others.
    ``options`` (``approx_options``) reach the class only where its constructor
    takes them, and ``kwargs`` (what the ``--optim`` name fixes) win over them.
    """

    def make(**options: Any) -> CurvatureApprox:
        factory = _approx_class(module, cls)
        accepted = inspect.signature(factory).parameters
        chosen = {key: value for key, value in options.items() if key in accepted}
        approx: CurvatureApprox = factory(**(chosen | kwargs))
        return approx

    return make


def _approx_class(module: str, cls: str) -> Any:
    """``curvlib.approx.<module>.<cls>``, imported now."""
    return getattr(importlib.import_module(f"curvlib.approx.{module}"), cls)


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


DEFAULT_CURVATURE_LR = DEFAULTS.lr
"""Learning rate of every curvature optimizer when ``--lr`` is not given: the library's."""

_CURVATURE = [  # --optim name, module of curvlib.approx, class, arguments, help
    ("kfac", "kfac", "KFAC", {}, "KFAC, pi-split damping (Cholesky)"),
    ("kfac-eigen", "kfac", "KFAC", {"damping_mode": "eigen"}, "KFAC, exact eigenbasis damping"),
    ("ekfac", "ekfac", "EKFAC", {}, "KFAC's eigenbasis, refitted eigenvalues"),
    ("kpsvd", "kpsvd", "KPSVD", {}, "best single Kronecker product"),
    ("deflation", "deflation", "Deflation", {}, "best sum of two Kronecker products"),
    ("kfac-corrected", "kfac_corrected", "KFACCorrected", {}, "KFAC plus its best correction"),
    ("lanczos", "lanczos", "Lanczos", {}, "rank-2 Kronecker sum by Lanczos"),
    ("block-ng", "natural_gradient", "BlockNaturalGradient", {},
     "exact block-diagonal natural gradient"),
    ("exact-ng", "natural_gradient", "ExactNaturalGradient", {},
     "exact natural gradient (Woodbury)"),
    ("diag", "diagonal", "Diagonal", {},
     "diagonal of the GGN (--fisher mc/exact) or empirical Fisher (--fisher empirical)"),
]  # fmt: skip


def _coarse(cls: str, **kwargs: Any) -> Callable[[bool], Any]:
    def make(krylov: bool) -> Any:
        return getattr(importlib.import_module("curvlib.approx.coarse"), cls)(
            krylov=krylov, **kwargs
        )

    return make


COARSE_SPACES: dict[str, Callable[[bool], Any]] = {
    "nicolaides": _coarse("Nicolaides"),
    "residual": _coarse("ResidualSpace"),
    "spectral": _coarse("Spectral"),
    "tselepidis": _coarse("Tselepidis"),
}
"""Every ``--coarse-space`` name and how to build it from ``krylov``."""


def two_level(
    make_fine: Callable[[], CurvatureApprox],
    space: str,
    krylov: bool = False,
    form: str = "residual",
    max_samples: int | str | None = "auto",
) -> Callable[[], CurvatureApprox]:
    """Builds ``TwoLevel(make_fine(), COARSE_SPACES[space](krylov), form=form, max_samples=...)``.

    Raises:
        KeyError: If ``space`` is not a key of ``COARSE_SPACES``.
    """
    make_space = COARSE_SPACES[space]

    def make() -> CurvatureApprox:
        module = importlib.import_module("curvlib.approx.two_level")
        approx: CurvatureApprox = module.TwoLevel(
            make_fine(), make_space(krylov), form=form, max_samples=max_samples
        )
        return approx

    return make


def approx_parameters(name: str) -> list[str]:
    """The keyword arguments of the approximation class behind ``--optim name`` (imported).

    Raises:
        KeyError: If ``name`` is not a single approximation's ``--optim`` name.
    """
    for optim, module, cls, _, _ in _CURVATURE:
        if optim == name:
            return list(inspect.signature(_approx_class(module, cls)).parameters)
    raise KeyError(name)


APPROXIMATIONS: dict[str, Callable[..., CurvatureApprox]] = {
    name: _approx(mod, cls, **kw) for name, mod, cls, kw, _ in _CURVATURE
}
"""Every curvature ``--optim`` name and how to build its approximation."""

TWO_LEVEL: dict[str, Callable[[], CurvatureApprox]] = {
    "kfac+nicolaides": two_level(APPROXIMATIONS["kfac"], "nicolaides"),
    "kfac+nicolaides-additive": two_level(APPROXIMATIONS["kfac"], "nicolaides", form="additive"),
    "kfac+nicolaides-krylov": two_level(APPROXIMATIONS["kfac"], "nicolaides", krylov=True),
    "kfac+residual": two_level(APPROXIMATIONS["kfac"], "residual"),
    "kfac+spectral": two_level(APPROXIMATIONS["kfac"], "spectral"),
    "kfac+tselepidis": two_level(APPROXIMATIONS["kfac"], "tselepidis"),
}
"""Two-level corrections over KFAC by name, for the benchmarks (the examples use
``--coarse-space`` with any ``--optim``); also in ``APPROXIMATIONS``."""
APPROXIMATIONS.update(TWO_LEVEL)

OPTIMIZERS: dict[str, OptimizerSpec] = {
    **{
        name: OptimizerSpec(_curvature(APPROXIMATIONS[name]), DEFAULT_CURVATURE_LR, True, text)
        for name, _, _, _, text in _CURVATURE
    },
    "adam": OptimizerSpec(_adam, 1e-3, False, "torch.optim.Adam"),
    "sgd": OptimizerSpec(_sgd, 0.1, False, "torch.optim.SGD with momentum", default_momentum=0.9),
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
