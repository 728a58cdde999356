r"""The library defaults of the optimizer, in one place.

``PreconditionedOptimizer(model, approx, loss_fn=loss_fn)`` trains with these
values; every one of them can be overridden by keyword. They were chosen on the
time-to-loss benchmark (`benchmarks/convergence.py`, results in the docs under
"Convergence"): several tasks at once (tanh and ReLU autoencoders, an MLP and a
CNN classifier, a convolutional autoencoder), judged by the wall time to reach
tuned Adam's final loss, never by one tuned run.
"""

from __future__ import annotations

from dataclasses import dataclass

from curvlib.optim.hyper import DampingWarmup


@dataclass(frozen=True)
class OptimizerDefaults:
    r"""Default hyper-parameters of [`CurvatureOptimizer`][curvlib.optim.CurvatureOptimizer].

    Attributes:
        lr: Learning rate $\eta$.
        damping: Tikhonov damping $\lambda$ of $(C + \lambda I)^{-1}$: $3\cdot10^{-4}$,
            multiplied by $400/n$ while the statistics have seen $n < 400$
            samples ([`DampingWarmup`][curvlib.optim.DampingWarmup]).
        kl_clip: KL-clipping bound $c$.
        momentum: Momentum $\mu$ on the clipped preconditioned direction.
        t_cov: Steps between statistics updates.
        t_inv: Steps between inverse rebuilds.
        stats_fraction: Fraction of each batch the statistics use (half: fewer
            epochs to tuned Adam's loss than a quarter on all five tasks of the
            convergence benchmark, at the cost of a larger extra backward pass).
        warmup: Statistics and inverses also at the steps before it that are
            powers of two (0, 1, 2, 4, 8): the curvature of the initial weights
            goes stale fastest.
    """

    lr: float = 0.1
    damping: DampingWarmup = DampingWarmup(3e-4, samples=400)  # noqa: RUF009 (frozen)
    kl_clip: float = 3e-3
    momentum: float = 0.5
    t_cov: int = 10
    t_inv: int = 10
    stats_fraction: float = 0.5
    warmup: int = 10


DEFAULTS = OptimizerDefaults()
"""The values ``PreconditionedOptimizer`` uses for every argument not given."""
