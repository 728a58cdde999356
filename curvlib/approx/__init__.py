r"""Layer 2: approximations $C \approx F$ behind [`CurvatureApprox`][curvlib.core.CurvatureApprox].

Imports [`curvlib.core`][curvlib.core] and [`curvlib.linalg`][curvlib.linalg]
only; never the extractors or the optimizer (checked by ``lint-imports``).
"""

from curvlib.approx.base import (
    BlockDiagonalPreconditioner,
    LayerBlock,
    LayerwiseApprox,
    NonFiniteStatisticsError,
)
from curvlib.approx.coarse import (
    CoarseContext,
    CoarseSpace,
    FixedSpace,
    Nicolaides,
    ResidualSpace,
    Spectral,
    SpectralEnd,
    Tselepidis,
)
from curvlib.approx.coarse_fisher import CrossKroneckerFisher, SampleFisher
from curvlib.approx.deflation import Deflation
from curvlib.approx.diagnostics import BlockError, approximation_errors, block_error, exact_block
from curvlib.approx.diagonal import Diagonal
from curvlib.approx.ekfac import EKFAC, EKFACDamping
from curvlib.approx.kfac import KFAC, ConvDamping, KFACDamping
from curvlib.approx.kfac_corrected import KFACCorrected
from curvlib.approx.kpsvd import KPSVD
from curvlib.approx.lanczos import Lanczos
from curvlib.approx.learning_rates import optimal_learning_rate
from curvlib.approx.natural_gradient import BlockNaturalGradient, ExactNaturalGradient, NGDamping
from curvlib.approx.two_level import (
    CorrectionForm,
    RefreshableTwoLevel,
    TwoLevel,
    TwoLevelPreconditioner,
)
from curvlib.approx.unitwise import UnitWiseNaturalGradient
from curvlib.approx.wide import (
    BlockTridiagonalNaturalGradient,
    FunctionSpaceForm,
    function_space_direction,
)

__all__ = [
    "EKFAC",
    "KFAC",
    "KPSVD",
    "BlockDiagonalPreconditioner",
    "BlockError",
    "BlockNaturalGradient",
    "BlockTridiagonalNaturalGradient",
    "CoarseContext",
    "CoarseSpace",
    "ConvDamping",
    "CorrectionForm",
    "CrossKroneckerFisher",
    "Deflation",
    "Diagonal",
    "EKFACDamping",
    "ExactNaturalGradient",
    "FixedSpace",
    "FunctionSpaceForm",
    "KFACCorrected",
    "KFACDamping",
    "Lanczos",
    "LayerBlock",
    "LayerwiseApprox",
    "NGDamping",
    "Nicolaides",
    "NonFiniteStatisticsError",
    "RefreshableTwoLevel",
    "ResidualSpace",
    "SampleFisher",
    "Spectral",
    "SpectralEnd",
    "Tselepidis",
    "TwoLevel",
    "TwoLevelPreconditioner",
    "UnitWiseNaturalGradient",
    "approximation_errors",
    "block_error",
    "exact_block",
    "function_space_direction",
    "optimal_learning_rate",
]
