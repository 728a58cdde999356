"""curvlib: natural-gradient and Kronecker-factored curvature optimizers for PyTorch.

The public API, grouped by layer:

* training: [`PreconditionedOptimizer`][curvlib.PreconditionedOptimizer] and
  [`NaturalGradientPreconditioner`][curvlib.NaturalGradientPreconditioner]
  (the wiring of all three layers);
* layer 2, approximations: KFAC, EKFAC, KPSVD, Deflation, KFAC-corrected,
  Lanczos, exact and block-diagonal natural gradient, diagonal, and the
  two-level wrapper with its coarse spaces;
* layer 1, extractors: [`CurvatureExtractor`][curvlib.extract.CurvatureExtractor];
* layer 3, the generic optimizer: [`curvlib.optim`][curvlib.optim];
* the shared vocabulary: layouts, statistics, protocols and flavours.
"""

from curvlib.approx import (
    EKFAC,
    KFAC,
    KPSVD,
    BlockNaturalGradient,
    Deflation,
    Diagonal,
    ExactNaturalGradient,
    KFACCorrected,
    KFACDamping,
    Lanczos,
    NGDamping,
    Nicolaides,
    ResidualSpace,
    Spectral,
    Tselepidis,
    TwoLevel,
)
from curvlib.core import (
    CurvatureApprox,
    CurvatureLayer,
    CurvatureStatistics,
    Extractor,
    FisherType,
    KroneckerFactors,
    LayerKind,
    LayerStatistics,
    ModelLayout,
    PerSampleGrads,
    PerSampleIO,
    Preconditioner,
    StatKind,
    UnsupportedModule,
)
from curvlib.extract import Backend, CurvatureExtractor, UnsupportedPolicy
from curvlib.optim import DampingWarmup, LevenbergMarquardt
from curvlib.wiring import NaturalGradientPreconditioner, PreconditionedOptimizer

__version__ = "0.1.0.dev0"

__all__ = [
    "EKFAC",
    "KFAC",
    "KPSVD",
    "Backend",
    "BlockNaturalGradient",
    "CurvatureApprox",
    "CurvatureExtractor",
    "CurvatureLayer",
    "CurvatureStatistics",
    "DampingWarmup",
    "Deflation",
    "Diagonal",
    "ExactNaturalGradient",
    "Extractor",
    "FisherType",
    "KFACCorrected",
    "KFACDamping",
    "KroneckerFactors",
    "Lanczos",
    "LayerKind",
    "LayerStatistics",
    "LevenbergMarquardt",
    "ModelLayout",
    "NGDamping",
    "NaturalGradientPreconditioner",
    "Nicolaides",
    "PerSampleGrads",
    "PerSampleIO",
    "PreconditionedOptimizer",
    "Preconditioner",
    "ResidualSpace",
    "Spectral",
    "StatKind",
    "Tselepidis",
    "TwoLevel",
    "UnsupportedModule",
    "UnsupportedPolicy",
    "__version__",
]
