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


@dataclass(frozen=True)
class OptimizerDefaults:
    r"""Default hyper-parameters of [`CurvatureOptimizer`][curvlib.optim.CurvatureOptimizer].

    Attributes:
        lr: Learning rate $\eta$.
        damping: Tikhonov damping $\lambda$ of $(C + \lambda I)^{-1}$ for an
            approximation without a ``default_damping`` of its own
            ([`default_damping`][curvlib.optim.defaults.default_damping]).
        kl_clip: KL-clipping bound $c$.
        momentum: Momentum $\mu$ on the clipped preconditioned direction.
        t_cov: Steps between statistics updates.
        t_inv: Steps between inverse rebuilds.
        stats_fraction: Fraction of each batch the statistics use.
        warmup: Statistics and inverses also at the steps before it that are
            powers of two (0, 1, 2, 4, 8): the curvature of the initial weights
            goes stale fastest.
    """

    lr: float = 0.1
    damping: float = 1e-3
    kl_clip: float = 3e-3
    momentum: float = 0.5
    t_cov: int = 10
    t_inv: int = 10
    stats_fraction: float = 0.25
    warmup: int = 10


DEFAULTS = OptimizerDefaults()
"""The values ``PreconditionedOptimizer`` uses for every argument not given."""


def default_damping(approx: object) -> float:
    r"""The damping an approximation trains with when none is given.

    The same $\lambda$ damps approximations by different amounts: KFAC's
    factored damping $(G + \gamma_G I)\otimes(A + \gamma_A I)$ adds the cross
    terms $\gamma_G I\otimes A + G\otimes\gamma_A I$, of order
    $\sqrt\lambda$ times the factors' scale, on top of $\lambda I$, where
    EKFAC and the exact methods add $\lambda I$ alone. An approximation may
    therefore name its own default in a ``default_damping`` class attribute
    (KFAC: $2\cdot10^{-4}$); every other one gets ``DEFAULTS.damping``.
    """
    value = getattr(approx, "default_damping", None)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return DEFAULTS.damping  # none, or a class passed for an instance: refused later
    return float(value)
