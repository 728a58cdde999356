r"""Layer 2: approximations $C \approx F$ behind [`CurvatureApprox`][curvlib.core.CurvatureApprox].

Imports [`curvlib.core`][curvlib.core] and [`curvlib.linalg`][curvlib.linalg]
only; never the extractors or the optimizer (checked by ``lint-imports``).
"""

__all__: list[str] = []
