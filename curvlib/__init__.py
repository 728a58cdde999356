"""curvlib: natural-gradient and Kronecker-factored curvature optimizers for PyTorch.

The public API, grouped by layer:

* core vocabulary: layouts, statistics, protocols and flavours;
* layer 1, extractors: [`CurvatureExtractor`][curvlib.extract.CurvatureExtractor].
"""

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

__version__ = "0.1.0.dev0"

__all__ = [
    "CurvatureApprox",
    "CurvatureLayer",
    "CurvatureStatistics",
    "Extractor",
    "FisherType",
    "KroneckerFactors",
    "LayerKind",
    "LayerStatistics",
    "ModelLayout",
    "PerSampleGrads",
    "PerSampleIO",
    "Preconditioner",
    "StatKind",
    "UnsupportedModule",
    "__version__",
]
