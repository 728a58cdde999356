"""Layer 3: the preconditioned optimizer, generic over any approximation.

Imports [`curvlib.core`][curvlib.core] (and [`curvlib.linalg`][curvlib.linalg])
only; never the extractors or a concrete approximation (checked by
``lint-imports``). The user-facing classes that also build the extractor are
[`curvlib.PreconditionedOptimizer`][curvlib.PreconditionedOptimizer] and
[`curvlib.NaturalGradientPreconditioner`][curvlib.NaturalGradientPreconditioner].
"""

from curvlib.optim.engine import CurvatureEngine
from curvlib.optim.hyper import DampingRule, DampingWarmup, LevenbergMarquardt, Schedule
from curvlib.optim.kernels import kl_clip_factor
from curvlib.optim.optimizer import CurvatureOptimizer
from curvlib.optim.preconditioner import GradientPreconditioner

__all__ = [
    "CurvatureEngine",
    "CurvatureOptimizer",
    "DampingRule",
    "DampingWarmup",
    "GradientPreconditioner",
    "LevenbergMarquardt",
    "Schedule",
    "kl_clip_factor",
]
