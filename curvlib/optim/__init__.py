"""Layer 3: the preconditioned optimizer, generic over any approximation.

Imports [`curvlib.core`][curvlib.core] (and [`curvlib.linalg`][curvlib.linalg])
only; never the extractors or a concrete approximation (checked by
``lint-imports``).
"""

__all__: list[str] = []
