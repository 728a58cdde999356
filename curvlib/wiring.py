"""The user-facing classes that compose an extractor with the optimizer (all three layers).

This small module is the only place that connects
[`curvlib.extract`][curvlib.extract] with [`curvlib.optim`][curvlib.optim]
(and [`curvlib.distributed`][curvlib.distributed]): the optimizer layer
itself works with any [`Extractor`][curvlib.core.protocols.Extractor] and
[`ReplicaSync`][curvlib.core.ReplicaSync].
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlib.core.protocols import CurvatureApprox
from curvlib.core.stats import FisherType
from curvlib.distributed import DataParallel, data_parallel_for
from curvlib.extract.extractor import (
    Backend,
    CurvatureExtractor,
    UnsupportedPolicy,
    report_unsupported,
)
from curvlib.optim.defaults import DEFAULTS
from curvlib.optim.groups import group_approximations, parameter_list, supported_kinds
from curvlib.optim.optimizer import CurvatureOptimizer
from curvlib.optim.preconditioner import GradientPreconditioner


def _check_unsupported(
    model: nn.Module,
    extractor: CurvatureExtractor,
    params: Sequence[Tensor] | None,
    policy: UnsupportedPolicy | str,
) -> None:
    """The unsupported-module policy, for the modules inside ``params`` (default: all).

    Called from the constructors, so that a warning points at the user's line.
    """
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    ids = {id(p) for p in params}
    items = [
        u
        for u in extractor.layout.unsupported
        if u.reason != "excluded by the user"
        and any(id(p) in ids for p in model.get_submodule(u.name).parameters(recurse=False))
    ]
    report_unsupported(items, policy, stacklevel=3)


def _replicas(
    model: nn.Module, data_parallel: DataParallel | bool | None, seed: int
) -> tuple[nn.Module, DataParallel | None, int]:
    """The module inside a DDP wrapper, the synchronisation, and this rank's seed.

    In a group of several ranks, rank $r$ draws its MC targets and sub-batches
    with ``seed + r``, so that the ranks' Monte-Carlo noise is independent.
    """
    inner, sync = data_parallel_for(model, data_parallel)
    if sync is not None:
        seed += sync.rank
    return inner, sync, seed


def _extractor(
    model: nn.Module,
    approxes: Sequence[CurvatureApprox],
    loss_fn: nn.Module,
    fisher_type: FisherType | str,
    mc_samples: int,
    stats_fraction: float,
    include: Sequence[str | type[nn.Module]] | None,
    exclude: Sequence[str | type[nn.Module]],
    unsupported: UnsupportedPolicy | str,
    backend: Backend | str,
    stats_dtype: torch.dtype | None,
    seed: int,
) -> CurvatureExtractor:
    """The one place an extractor is built for the optimizer classes.

    It computes the union of the statistics every approximation needs (one
    approximation per parameter group) for the union of the layer kinds they
    support; each group's engine receives those of its own layers.
    """
    return CurvatureExtractor(
        model,
        loss_fn,
        stats=frozenset().union(*(a.required_stats for a in approxes)),
        fisher_type=fisher_type,
        mc_samples=mc_samples,
        stats_fraction=stats_fraction,
        include=include,
        exclude=exclude,
        unsupported=unsupported,
        backend=backend,
        dtype=stats_dtype,
        seed=seed,
        kinds=supported_kinds(approxes),
    )


class PreconditionedOptimizer(CurvatureOptimizer):
    r"""Natural-gradient training with any curvature approximation.

    ```python
    opt = PreconditionedOptimizer(model, approx=KFAC(), loss_fn=loss_fn, lr=0.1, damping=1e-3)
    for x, y in loader:
        opt.zero_grad()
        with opt.record():  # statistics only on the steps where they are due
            loss = loss_fn(model(x), y)
            loss.backward()
        opt.step()
    ```

    Builds a [`CurvatureExtractor`][curvlib.extract.CurvatureExtractor] that
    computes exactly the statistics the approximations need, and passes
    everything else to [`CurvatureOptimizer`][curvlib.optim.CurvatureOptimizer]
    (learning rate, damping, KL-clipping, momentum, weight decay, intervals).
    The extractor always sees the whole ``model`` (a GAN generator's loss goes
    through the critic); ``include``/``exclude`` choose its curvature layers,
    ``params`` what is stepped:

    ```python
    bce = nn.BCEWithLogitsLoss()  # the instance the loop calls: bce(gan(z), ones)
    opt = PreconditionedOptimizer(
        gan, KFAC(), loss_fn=bce, include=["generator.*"], params=gan.generator.parameters()
    )
    ```

    Args:
        model: The network.
        approx: The curvature approximation (of the layers no group claims).
        loss_fn: The loss module the training loop calls, the same instance
            (MC and exact Fisher sample from / differentiate its likelihood;
            calling another instance inside ``record()`` is an error that says so).
        fisher_type: ``MC`` (default), ``EXACT`` or ``EMPIRICAL``.
        mc_samples: Monte-Carlo samples per datum.
        stats_fraction: Fraction of each batch the statistics use.
        include: Layers to precondition (glob patterns or module types).
        exclude: Layers to leave out.
        unsupported: What to do with trainable modules without a curvature block
            (their parameters take plain SGD steps unless this is ``RAISE``).
        backend: How the extractor backpropagates.
        stats_dtype: Storage dtype of the statistics (default: the model's
            parameters', also under ``torch.autocast``; float32 for float16/bfloat16
            models).
        seed: Seed of the MC targets and sub-batches.
        params: The parameters to step (default: every trainable parameter);
            the others are never touched. Every curvature layer must lie inside
            it, and ``unsupported`` only concerns the modules inside it.
        groups: Per-group settings (layers, approximation, damping, intervals,
            learning rate, ...), see
            [`CurvatureOptimizer`][curvlib.optim.CurvatureOptimizer].
        data_parallel: Training on several ranks: ``None`` (the default)
            synchronises the curvature over DDP's process group for a
            ``DistributedDataParallel`` model, and over the default group (with
            the gradients averaged here, and the ranks' parameters checked to be
            equal) for any other model inside a process group;
            a [`DataParallel`][curvlib.distributed.DataParallel] chooses the
            group and options; ``False`` trains an independent model on every
            rank. The optimizer works on the module inside a DDP wrapper (layer
            names without ``module.``). See [Distributed training](../distributed.md).
        **optimizer_kwargs: The hyper-parameters of
            [`CurvatureOptimizer`][curvlib.optim.CurvatureOptimizer], each
            defaulting to [`DEFAULTS`][curvlib.optim.defaults.DEFAULTS]:
            ``lr`` (0.1, or ``"auto"``), ``damping`` ($3\cdot10^{-4}$, multiplied by
            $400/n$ while the statistics have seen $n < 400$ samples, unless the
            approximation names its own
            ([`default_damping`][curvlib.optim.defaults.default_damping]); a number, a schedule,
            Levenberg–Marquardt or a ``DampingWarmup``),
            ``kl_clip`` ($3\cdot10^{-3}$ on the whole step, or the approximation's
            own ([`default_kl_clip`][curvlib.optim.defaults.default_kl_clip]);
            ``None`` disables it), ``momentum`` (0.5, or ``"auto"``), ``t_cov``
            (10), ``t_inv`` (10, or the approximation's own,
            [`default_t_inv`][curvlib.optim.defaults.default_t_inv]), ``warmup``
            (10), ``refresh_on_move`` (0: off), ``nesterov``, ``weight_decay``,
            ``decoupled_weight_decay``, ``kl_clip_lr_squared``, ``on_step``,
            ``grad_scaler`` and ``accumulation_steps``.
    """

    def __init__(
        self,
        model: nn.Module,
        approx: CurvatureApprox,
        *,
        loss_fn: nn.Module,
        fisher_type: FisherType | str = FisherType.MC,
        mc_samples: int = 1,
        stats_fraction: float = DEFAULTS.stats_fraction,
        include: Sequence[str | type[nn.Module]] | None = None,
        exclude: Sequence[str | type[nn.Module]] = (),
        unsupported: UnsupportedPolicy | str = UnsupportedPolicy.WARN,
        backend: Backend | str = Backend.AUTO,
        stats_dtype: torch.dtype | None = None,
        seed: int = 0,
        params: Iterable[Tensor] | None = None,
        groups: Sequence[Mapping[str, Any]] = (),
        data_parallel: DataParallel | bool | None = None,
        **optimizer_kwargs: Any,
    ) -> None:
        model, sync, seed = _replicas(model, data_parallel, seed)
        approxes = group_approximations(approx, groups)
        chosen = None if params is None else parameter_list(params, model)
        extractor = _extractor(
            model, approxes, loss_fn, fisher_type, mc_samples, stats_fraction, include, exclude,
            UnsupportedPolicy.IGNORE, backend, stats_dtype, seed,
        )  # fmt: skip
        _check_unsupported(model, extractor, chosen, unsupported)
        super().__init__(
            model, extractor, approx, params=chosen, groups=groups, sync=sync, **optimizer_kwargs
        )
        self.extractor: CurvatureExtractor = extractor

    @property
    def loss_fn(self) -> nn.Module:
        """The loss module given as ``loss_fn``: call this instance inside ``record()``."""
        return self.extractor.loss_fn


class NaturalGradientPreconditioner(GradientPreconditioner):
    """Preconditioner mode: rewrites ``.grad`` so that any torch optimizer takes the step.

    Same arguments as [`PreconditionedOptimizer`][curvlib.PreconditionedOptimizer]
    for the extractor and ``data_parallel``; ``**kwargs`` go to
    [`GradientPreconditioner`][curvlib.optim.GradientPreconditioner] (damping,
    KL clip, intervals). In data-parallel training without DDP, ``step()``
    averages the gradients of every trainable parameter of the model over the
    ranks, so that the wrapped optimizer steps the same everywhere.
    """

    def __init__(
        self,
        model: nn.Module,
        approx: CurvatureApprox,
        *,
        loss_fn: nn.Module,
        fisher_type: FisherType | str = FisherType.MC,
        mc_samples: int = 1,
        stats_fraction: float = DEFAULTS.stats_fraction,
        include: Sequence[str | type[nn.Module]] | None = None,
        exclude: Sequence[str | type[nn.Module]] = (),
        unsupported: UnsupportedPolicy | str = UnsupportedPolicy.WARN,
        backend: Backend | str = Backend.AUTO,
        stats_dtype: torch.dtype | None = None,
        seed: int = 0,
        data_parallel: DataParallel | bool | None = None,
        **kwargs: Any,
    ) -> None:
        model, sync, seed = _replicas(model, data_parallel, seed)
        extractor = _extractor(
            model, [approx], loss_fn, fisher_type, mc_samples, stats_fraction, include, exclude,
            UnsupportedPolicy.IGNORE, backend, stats_dtype, seed,
        )  # fmt: skip
        _check_unsupported(model, extractor, None, unsupported)
        super().__init__(extractor, approx, sync=sync, **kwargs)
        self.extractor = extractor
        self.sync_params = [p for p in model.parameters() if p.requires_grad]

    @property
    def loss_fn(self) -> nn.Module:
        """The loss module given as ``loss_fn``: call this instance inside ``record()``."""
        return self.extractor.loss_fn
