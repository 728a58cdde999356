r"""The Van Loan–Pitsianis rearrangement of a layer's Fisher block, matrix-free.

For the per-sample gradient matrices $\bar W_{kn} \in \mathbb{R}^{d_o \times d_i}$
of one layer ([`curvlib.core.conventions`][curvlib.core.conventions]), the
block $F = \frac1N \sum_{k,n} \operatorname{vec}(\bar W_{kn})
\operatorname{vec}(\bar W_{kn})^\top$ satisfies
$\|F - G \otimes A\|_F = \|\mathcal R(F) - \operatorname{vec}(G)
\operatorname{vec}(A)^\top\|_F$ with the rearrangement

$$\mathcal R(F)\operatorname{vec}(V) = \operatorname{vec}\Big(\frac1N \sum_{k,n}
\bar W_{kn} V \bar W_{kn}^\top\Big), \qquad
\mathcal R(F)^\top\operatorname{vec}(U) = \operatorname{vec}\Big(\frac1N \sum_{k,n}
\bar W_{kn}^\top U \bar W_{kn}\Big),$$

a map from $d_i \times d_i$ to $d_o \times d_o$ matrices. So the best sums of
Kronecker products are the leading singular triples of $\mathcal R(F)$
(Van Loan & Pitsianis 1993), found here by power iterations
([`power_svd`][curvlib.linalg.power_svd], with
[`Deflated`][curvlib.linalg.Deflated] operators for later pairs) or by
restarted Golub–Kahan–Lanczos bidiagonalisation
([`lanczos_svd`][curvlib.linalg.lanczos_svd]).

**Symmetric factors.** $F = F^\top$ makes $\mathcal R(F)$ commute with
transposition, $\mathcal R(F)\operatorname{vec}(V^\top) =
\operatorname{vec}(U^\top)$, so its singular vectors split into symmetric and
antisymmetric matrices. Only symmetric factors give a usable preconditioner, so
[`RearrangedFisher`][curvlib.linalg.RearrangedFisher] restricts
$\mathcal R(F)$ to symmetric matrices by default: its singular triples are then
the best Kronecker sums with symmetric factors. The top pair of a positive
semi-definite $F$ is symmetric anyway (Van Loan & Pitsianis, theorem 5.8), and
both its factors are definite with one sign.

The package in four modules: ``fisher`` (the operator and its deflation),
``spaces`` (the operator on coordinates, and the starts), ``triples``
(singular triples and their Kronecker factors) and ``svd`` (power iterations
and Lanczos). Every name is importable from here and from
[`curvlib.linalg`][curvlib.linalg].
"""

from curvlib.linalg.rearrange.fisher import (
    Deflated,
    RearrangedFisher,
    RearrangedOperator,
    effective_tol,
)
from curvlib.linalg.rearrange.spaces import (
    Coordinates,
    DeflatedCoordinates,
    coordinates,
    psd_start,
)
from curvlib.linalg.rearrange.svd import lanczos_svd, power_svd
from curvlib.linalg.rearrange.triples import (
    SingularTriple,
    balanced_factors,
    deflated,
    psd_factors,
)

__all__ = [
    "Coordinates",
    "Deflated",
    "DeflatedCoordinates",
    "RearrangedFisher",
    "RearrangedOperator",
    "SingularTriple",
    "balanced_factors",
    "coordinates",
    "deflated",
    "effective_tol",
    "lanczos_svd",
    "power_svd",
    "psd_factors",
    "psd_start",
]
