"""Data sets of the reproduced experiments that curvlib can generate offline.

This package imports torch only and is independent of the three layers.
"""

from curvlib.data.curves import CurvesSplit, generate_curves, render_curves

__all__ = ["CurvesSplit", "generate_curves", "render_curves"]
