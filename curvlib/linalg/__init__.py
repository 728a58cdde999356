"""Pure tensor maths shared by the approximations and the optimizer.

Damped Kronecker inverses, ``eigh`` with retry, two-term Kronecker inverses,
power SVD of the rearranged Fisher and Woodbury solves live here. This package
imports torch and [`curvlib.core`][curvlib.core] only.
"""

__all__: list[str] = []
