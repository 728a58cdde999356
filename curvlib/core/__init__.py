"""The shared vocabulary of curvlib: layer layout, statistics and protocols.

Everything in this package imports torch only, so that every layer of curvlib
(extractors, approximations, optimizer) can depend on it without depending on
each other. The conventions that all layers share are written down once, in
[`curvlib.core.conventions`][curvlib.core.conventions].
"""

from curvlib.core.layout import (
    CurvatureLayer,
    LayerKind,
    ModelLayout,
    UnsupportedModule,
    kronecker_cost,
)
from curvlib.core.protocols import (
    CurvatureApprox,
    CurvatureOperator,
    CurvatureProducts,
    Extractor,
    Preconditioner,
    RefreshableApprox,
    ReplicaSync,
)
from curvlib.core.stats import (
    CurvatureStatistics,
    FisherType,
    KroneckerFactors,
    LayerStatistics,
    PerSampleGrads,
    PerSampleIO,
    PooledIO,
    StatKind,
    cross_layer_factors,
)

__all__ = [
    "CurvatureApprox",
    "CurvatureLayer",
    "CurvatureOperator",
    "CurvatureProducts",
    "CurvatureStatistics",
    "Extractor",
    "FisherType",
    "KroneckerFactors",
    "LayerKind",
    "LayerStatistics",
    "ModelLayout",
    "PerSampleGrads",
    "PerSampleIO",
    "PooledIO",
    "Preconditioner",
    "RefreshableApprox",
    "ReplicaSync",
    "StatKind",
    "UnsupportedModule",
    "cross_layer_factors",
    "kronecker_cost",
]
