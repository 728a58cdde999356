r"""How far an approximation is from the exact Fisher block of a layer (small networks).

The exact block of a layer is built from per-sample statistics,
$F = \frac1N\sum_{k,n}\operatorname{vec}(\bar W_{kn})\operatorname{vec}(\bar W_{kn})^\top$
([`curvlib.core.conventions`][curvlib.core.conventions]), and compared with the
approximation's dense block $C$:

* relative Frobenius error $\lVert F - C\rVert_F / \lVert F\rVert_F$;
* relative spectrum error $\lVert \lambda(F) - \lambda(C)\rVert_2 / \lVert\lambda(F)\rVert_2$
  of the sorted eigenvalues (a basis-free measure: it ignores how the
  eigenvectors differ).

Both cost a dense ``[P, P]`` matrix per layer: use them on layers of up to a few
thousand parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from curvlib.core.protocols import CurvatureApprox
from curvlib.core.stats import CurvatureStatistics, LayerStatistics


def exact_block(stats: LayerStatistics) -> Tensor:
    r"""The exact Fisher block of one layer from its per-sample statistics.

    Args:
        stats: Statistics with per-sample gradients or per-sample inputs and
            output gradients.

    Returns:
        ``[P, P]`` in the row-major $[W \mid b]$ vectorisation.

    Raises:
        ValueError: If neither per-sample kind was extracted.
    """
    if stats.grads is not None:
        grads = stats.grads.grads
    elif stats.io is not None:
        grads = stats.io.grads()
    else:
        raise ValueError(
            f"Layer {stats.layer.name!r} has no per-sample statistics: extract with "
            "StatKind.PER_SAMPLE_GRAD or StatKind.PER_SAMPLE_IO."
        )
    n = grads.shape[1]
    rows = grads.flatten(2).flatten(0, 1)  # [K * N, P]
    return rows.T @ rows / n


@dataclass(frozen=True)
class BlockError:
    """Errors of one layer's approximation against its exact block.

    Attributes:
        frobenius: Relative Frobenius error.
        spectrum: Relative error of the sorted eigenvalues.
    """

    frobenius: float
    spectrum: float


def block_error(exact: Tensor, approx: Tensor) -> BlockError:
    """Relative Frobenius and spectrum errors of ``approx`` against ``exact``."""
    exact = exact.to(approx.dtype)
    norm = float(exact.norm())
    frob = float((exact - approx).norm()) / norm
    eig_exact = torch.linalg.eigvalsh((exact + exact.T) / 2)
    eig_approx = torch.linalg.eigvalsh((approx + approx.T) / 2)
    spectrum = float((eig_exact - eig_approx).norm() / eig_exact.norm())
    return BlockError(frobenius=frob, spectrum=spectrum)


def approximation_errors(
    approx: CurvatureApprox, stats: CurvatureStatistics, layers: list[str] | None = None
) -> dict[str, BlockError]:
    """Per-layer errors of a fitted approximation against the exact blocks of ``stats``.

    Args:
        approx: A fitted approximation (its ``to_dense`` is used).
        stats: Statistics with per-sample quantities, from the batch of interest.
        layers: Which layers to compare (default: all in ``stats``).

    Returns:
        Errors keyed by layer name.
    """
    names = list(stats.layers) if layers is None else layers
    return {
        name: block_error(exact_block(stats.layers[name]), approx.to_dense(name)) for name in names
    }
