"""The user-facing classes that compose an extractor with the optimizer (all three layers).

This small module is the only place that connects
[`curvlib.extract`][curvlib.extract] with [`curvlib.optim`][curvlib.optim]:
the optimizer layer itself works with any
[`Extractor`][curvlib.core.protocols.Extractor].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from curvlib.core.protocols import CurvatureApprox
from curvlib.core.stats import FisherType
from curvlib.extract.extractor import Backend, CurvatureExtractor, UnsupportedPolicy
from curvlib.optim.optimizer import CurvatureOptimizer
from curvlib.optim.preconditioner import GradientPreconditioner


def _extractor(
    model: nn.Module,
    approx: CurvatureApprox,
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
    return CurvatureExtractor(
        model,
        loss_fn,
        stats=approx.required_stats,
        fisher_type=fisher_type,
        mc_samples=mc_samples,
        stats_fraction=stats_fraction,
        include=include,
        exclude=exclude,
        unsupported=unsupported,
        backend=backend,
        dtype=stats_dtype,
        seed=seed,
        kinds=getattr(approx, "supported_kinds", None),
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
    computes exactly the statistics ``approx`` needs, and passes everything else
    to [`CurvatureOptimizer`][curvlib.optim.CurvatureOptimizer] (learning rate,
    damping, KL-clipping, momentum, weight decay, intervals).

    Args:
        model: The network.
        approx: The curvature approximation.
        loss_fn: The loss module the training loop calls (MC and exact Fisher
            sample from / differentiate its likelihood).
        fisher_type: ``MC`` (default), ``EXACT`` or ``EMPIRICAL``.
        mc_samples: Monte-Carlo samples per datum.
        stats_fraction: Fraction of each batch the statistics use.
        include: Layers to precondition (glob patterns or module types).
        exclude: Layers to leave out.
        unsupported: What to do with trainable modules without a curvature block
            (their parameters take plain SGD steps unless this is ``RAISE``).
        backend: How the extractor backpropagates.
        stats_dtype: Storage dtype of the statistics.
        seed: Seed of the MC targets and sub-batches.
        **optimizer_kwargs: Arguments of ``CurvatureOptimizer``.
    """

    def __init__(
        self,
        model: nn.Module,
        approx: CurvatureApprox,
        *,
        loss_fn: nn.Module,
        fisher_type: FisherType | str = FisherType.MC,
        mc_samples: int = 1,
        stats_fraction: float = 1.0,
        include: Sequence[str | type[nn.Module]] | None = None,
        exclude: Sequence[str | type[nn.Module]] = (),
        unsupported: UnsupportedPolicy | str = UnsupportedPolicy.WARN,
        backend: Backend | str = Backend.AUTO,
        stats_dtype: torch.dtype | None = None,
        seed: int = 0,
        **optimizer_kwargs: Any,
    ) -> None:
        extractor = _extractor(
            model, approx, loss_fn, fisher_type, mc_samples, stats_fraction, include, exclude,
            unsupported, backend, stats_dtype, seed,
        )  # fmt: skip
        super().__init__(model, extractor, approx, **optimizer_kwargs)
        self.extractor = extractor


class NaturalGradientPreconditioner(GradientPreconditioner):
    """Preconditioner mode: rewrites ``.grad`` so that any torch optimizer takes the step.

    Same arguments as [`PreconditionedOptimizer`][curvlib.PreconditionedOptimizer]
    for the extractor; ``**kwargs`` go to
    [`GradientPreconditioner`][curvlib.optim.GradientPreconditioner] (damping,
    KL clip, intervals).
    """

    def __init__(
        self,
        model: nn.Module,
        approx: CurvatureApprox,
        *,
        loss_fn: nn.Module,
        fisher_type: FisherType | str = FisherType.MC,
        mc_samples: int = 1,
        stats_fraction: float = 1.0,
        include: Sequence[str | type[nn.Module]] | None = None,
        exclude: Sequence[str | type[nn.Module]] = (),
        unsupported: UnsupportedPolicy | str = UnsupportedPolicy.WARN,
        backend: Backend | str = Backend.AUTO,
        stats_dtype: torch.dtype | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        extractor = _extractor(
            model, approx, loss_fn, fisher_type, mc_samples, stats_fraction, include, exclude,
            unsupported, backend, stats_dtype, seed,
        )  # fmt: skip
        super().__init__(extractor, approx, **kwargs)
        self.extractor = extractor
