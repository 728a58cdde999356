"""Layer 1: curvature statistics from the backward pass (the only package that imports BackPACK).

[`CurvatureExtractor`][curvlib.extract.CurvatureExtractor] computes, for the
``Linear``, ``Conv2d`` and ``ConvTranspose2d`` layers of a network, the
statistics an approximation asks for: Kronecker factors, per-sample layer
inputs and output gradients, or per-sample gradients, for the ``MC``,
``EXACT`` and ``EMPIRICAL`` flavours.
"""

from curvlib.extract.extractor import (
    Backend,
    CurvatureExtractor,
    UnsupportedPolicy,
    coupling_modules,
)

__all__ = ["Backend", "CurvatureExtractor", "UnsupportedPolicy", "coupling_modules"]
