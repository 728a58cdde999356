r"""Lanczos: the optimal rank-2 Kronecker sum by Golub–Kahan bidiagonalisation.

The same approximation as [`Deflation`][curvlib.approx.deflation.Deflation],
found with a different solver: restarted Golub–Kahan–Lanczos bidiagonalisation
of the rearranged block ([`lanczos_svd`][curvlib.linalg.lanczos_svd])
yields both singular pairs from one Krylov space, and exactly when the
rearranged block has rank at most two.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from curvlib.approx.base import DEFAULT_DECAY, LayerBlock
from curvlib.approx.deflation import Factors, KroneckerSumBlock, check_settings
from curvlib.approx.kpsvd import RearrangedApprox
from curvlib.core.stats import LayerStatistics, StatKind
from curvlib.linalg.precision import ApplyDtype
from curvlib.linalg.rearrange import balanced_factors, lanczos_svd, psd_factors
from curvlib.linalg.sample_space import RearrangedForm

_RANK = 2
"""Kronecker terms kept per layer."""


class _LanczosBlock(KroneckerSumBlock):
    def __init__(
        self,
        out_dim: int,
        in_dim: int,
        dtype: torch.dtype | None,
        min_eig: float,
        tol: float,
        krylov_dim: int,
        max_restarts: int,
        form: RearrangedForm,
        apply_dtype: ApplyDtype = "auto",
    ) -> None:
        super().__init__(out_dim, in_dim, dtype, min_eig, form, apply_dtype)
        self.tol, self.krylov_dim, self.max_restarts = tol, krylov_dim, max_restarts

    def _warm_start(self) -> Tensor | None:
        """The sum of the previous input-side factors, each normalised (matrix-free form)."""
        previous = [self._warm(1), self._warm(3)]
        parts = [a / a.norm() for a in previous if a is not None and float(a.norm()) > 0]
        return sum(parts[1:], parts[0]) if parts else None

    def _batch_factors(self, stats: LayerStatistics) -> Factors:
        op = self._rearranged(stats)
        first, second = lanczos_svd(
            op,
            _RANK,
            self._warm_start(),
            krylov_dim=self.krylov_dim,
            tol=self.tol,
            max_restarts=self.max_restarts,
        )
        self.last_iterations = first.iterations
        return (*psd_factors(op, first), *balanced_factors(second))


class Lanczos(RearrangedApprox):
    r"""Rank-2 Kronecker sum from Golub–Kahan–Lanczos bidiagonalisation of $\mathcal R(F)$.

    Each layer's block is approximated by $C = G_1 \otimes A_1 + G_2 \otimes A_2$
    with $(\sigma_j, U_j, V_j)$, $j = 1, 2$, the top singular triples of the
    rearranged block $\mathcal R(F)$
    ([`curvlib.linalg.rearrange`][curvlib.linalg.rearrange]): the best sum of two
    Kronecker products with symmetric factors in Frobenius norm, as in
    [`Deflation`][curvlib.approx.deflation.Deflation]. Bidiagonalisation builds
    orthonormal $V_k$, $U_k$ with

    $$\mathcal R(F)\, V_k = U_k B_k, \qquad
    \mathcal R(F)^\top U_k = V_k B_k^\top + \beta_k v_{k+1} e_k^\top ,$$

    ($B_k$ upper bidiagonal, full reorthogonalisation), reads the Ritz triples
    off the SVD of $B_k$, and thick-restarts from the three leading Ritz vectors
    until both residuals fall below ``tol`` (relative to $\sigma_1$). The start
    vector is the sum of the previous step's normalised $A_1$ and $A_2$, so both
    wanted directions are in the first Krylov space. When rank$\,\mathcal R(F)
    \le 2$ (e.g. a ``Linear`` layer and a batch of two samples) the
    bidiagonalisation breaks down on an invariant subspace and $C = F$ exactly.

    **Normalisation and averaging.** As [`Deflation`][curvlib.approx.deflation.Deflation]:
    $G_j = \pm\sqrt{\sigma_j}\,U_j$, $A_j = \pm\sqrt{\sigma_j}\,V_j$ with
    $\operatorname{tr} A_j \ge 0$
    ([`balanced_factors`][curvlib.linalg.balanced_factors]), the first
    pair clamped to positive semi-definite, each factor averaged separately. The
    second term, and so $C$, may be indefinite.

    **Damping.** $(G_1 + \gamma_G I)\otimes(A_1 + \gamma_A I) + G_2\otimes A_2$,
    $\gamma_A\gamma_G = \lambda$ ($\pi$-split), with whitened eigenvalues floored
    at ``min_eig`` ([`curvlib.linalg.kron`][curvlib.linalg.kron]), so the
    preconditioner is positive definite.

    Cost per layer with $d_o$ rows, $d_i$ columns, $N$ samples, $K$ columns:
    update ``krylov_dim`` products with $\mathcal R(F)$ and $\mathcal R(F)^\top$
    per restart ($O(N d_i^2 + KN d_o^2)$ each for one output position,
    $O(KN d_o d_i (d_o + d_i))$ for convolutions) plus
    $O(k^2 (d_o^2 + d_i^2))$ reorthogonalisation and one ``eigh`` per
    first-pair factor; inverse two Cholesky factorisations and two ``eigh`` of
    the factor sizes; apply four matrix products.
    Where cheaper, the sample-space form
    ([`curvlib.linalg.sample_space`][curvlib.linalg.sample_space]) runs the
    bidiagonalisation on Gram matrices, $O(N^2)$ per product.
    The start there is the batch's KFAC factor, not the previous factors.

    Example:
        >>> approx = Lanczos(krylov_dim=10, tol=1e-6)
        >>> sorted(kind.name for kind in approx.required_stats)
        ['PER_SAMPLE_IO']

    Args:
        tol: Relative residual at which the bidiagonalisation stops.
        krylov_dim: Krylov dimension before a restart (at least 4).
        max_restarts: Cap on the restarts per update.
        min_eig: Floor $\epsilon \in (0, 1]$ of the whitened eigenvalues.
        decay: Upper bound of the running-average weight on the old estimate.
        dtype: Storage dtype of the factors (default: that of the statistics).
        form: How products with $\mathcal R(F)$ are computed
            ([`RearrangedForm`][curvlib.linalg.sample_space.RearrangedForm]).
        apply_dtype: The dtype the inverse is applied in on every step
            (``"auto"``, ``None`` or a dtype; as for
            [`KFAC`][curvlib.approx.kfac.KFAC], see
            [`curvlib.linalg.precision`][curvlib.linalg.precision]).

    Raises:
        ValueError: If ``tol`` or ``max_restarts`` is not positive, ``krylov_dim``
            is below 4, ``min_eig`` is outside $(0, 1]$ or ``form`` or
            ``apply_dtype`` is unknown.

    References:
        A. Koroko, A. Anciaux-Sedrakian, I. Ben Gharbia, V. Garès, M. Haddou and
        Q. H. Tran, "Efficient approximations of the Fisher matrix in neural
        networks using Kronecker product singular value decomposition", ESAIM:
        Proceedings and Surveys, 2023. C. F. Van Loan and N. Pitsianis,
        "Approximation with Kronecker products", in Linear Algebra for Large Scale
        and Real-Time Applications, 1993. J. Baglama and L. Reichel, "Augmented
        implicitly restarted Lanczos bidiagonalization methods", SIAM J. Sci.
        Comput., 2005.
    """

    required_stats: ClassVar[frozenset[StatKind]] = frozenset({StatKind.PER_SAMPLE_IO})

    def __init__(
        self,
        tol: float = 1e-6,
        krylov_dim: int = 10,
        max_restarts: int = 20,
        min_eig: float = 0.1,
        decay: float = DEFAULT_DECAY,
        dtype: torch.dtype | None = None,
        form: RearrangedForm | str = RearrangedForm.AUTO,
        apply_dtype: ApplyDtype = "auto",
    ) -> None:
        super().__init__(form, decay=decay, dtype=dtype, apply_dtype=apply_dtype)
        check_settings(tol, min_eig, max_restarts=max_restarts)
        if krylov_dim < _RANK + 2:
            raise ValueError(f"krylov_dim must be at least {_RANK + 2}, got {krylov_dim!r}.")
        self.tol, self.min_eig = tol, min_eig
        self.krylov_dim, self.max_restarts = int(krylov_dim), int(max_restarts)

    def _make_block(self, out_dim: int, in_dim: int) -> LayerBlock:
        return _LanczosBlock(
            out_dim,
            in_dim,
            self.dtype,
            self.min_eig,
            self.tol,
            self.krylov_dim,
            self.max_restarts,
            self.form,
            self.apply_dtype,
        )
