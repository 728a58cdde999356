r"""KFAC-corrected: KFAC plus the best Kronecker approximation of its residual.

KFAC's $G\otimes A$ is cheap and usually good, but its error $F - G\otimes A$
has structure of its own (correlations between inputs and output gradients, and
for convolutions the spatial correlations that KFC drops). KFAC-corrected keeps
the KFAC term and adds the one Kronecker product that removes most of that
error in Frobenius norm.

**Why a floor.** The correction is a difference of curvatures, so it is
indefinite: where KFAC overestimates, it subtracts. Nothing bounds how much it
subtracts relative to the damped KFAC term; on the convolution of a small CNN
with $\lambda = 10^{-3}$ it already cancels more than all of it in some
directions, and $(G + \gamma_G I)\otimes(A + \gamma_A I) + G_c \otimes A_c$ has
negative eigenvalues. A preconditioner built from it would step uphill there.
[`two_term_inverse`][curvlib.linalg.kron.two_term_inverse] works in the
eigenbasis of the correction whitened by the damped KFAC term, where each
direction has the eigenvalue $1 + s_G s_A$ relative to KFAC alone, and floors
it at $\epsilon$ (``min_eig``): directions the correction would cancel to below
$\epsilon$ keep the fraction $\epsilon$ of their damped KFAC curvature, and no
direction is amplified by more than $1/\epsilon$ relative to KFAC. The
correction acts unchanged everywhere else.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from curvlib.approx.base import DEFAULT_DECAY, LayerBlock
from curvlib.approx.deflation import Factors, KroneckerSumBlock, check_settings
from curvlib.approx.kpsvd import RearrangedApprox
from curvlib.core.stats import LayerStatistics, StatKind
from curvlib.linalg.precision import ApplyDtype
from curvlib.linalg.rearrange import balanced_factors, power_svd
from curvlib.linalg.sample_space import RearrangedForm


class _KFACCorrectedBlock(KroneckerSumBlock):
    def __init__(
        self,
        out_dim: int,
        in_dim: int,
        dtype: torch.dtype | None,
        min_eig: float,
        tol: float,
        max_iter: int,
        form: RearrangedForm,
        apply_dtype: ApplyDtype = "auto",
    ) -> None:
        super().__init__(out_dim, in_dim, dtype, min_eig, form, apply_dtype)
        self.tol, self.max_iter = tol, max_iter

    def _batch_factors(self, stats: LayerStatistics) -> Factors:
        assert stats.kronecker is not None
        G, A = self._cast(stats.kronecker.G), self._cast(stats.kronecker.A)
        residual = self._rearranged(stats, (G, A), pairs=1)
        correction = power_svd(
            residual,
            self._warm(3),
            self._warm(2),
            tol=self.tol,
            max_iter=self.max_iter,
            scale=float(G.norm() * A.norm()),
        )
        self.last_iterations = correction.iterations
        return (G, A, *balanced_factors(correction))


class KFACCorrected(RearrangedApprox):
    r"""KFAC plus the Frobenius-optimal Kronecker approximation of KFAC's error.

    Each layer's block is approximated by

    $$C = G \otimes A + G_c \otimes A_c, \qquad
    G_c \otimes A_c = \operatorname*{arg\,min}_{X, Y}
    \|(F - G\otimes A) - X \otimes Y\|_F ,$$

    with KFAC's factors $A$, $G$ of
    [`curvlib.core.conventions`][curvlib.core.conventions] and the correction the
    top singular pair of the rearranged residual $\mathcal R(F - G\otimes A) =
    \mathcal R(F) - \operatorname{vec}(G)\operatorname{vec}(A)^\top$, found by
    power iterations on $\mathcal R(F)$ deflated against the KFAC term (with
    symmetric factors, see [`curvlib.linalg.rearrange`][curvlib.linalg.rearrange]).
    Since $X = 0$ is a candidate, $\|F - C\|_F \le \|F - G\otimes A\|_F$ for the
    batch.

    **Signs.** The residual is indefinite, and so in general are $G_c$, $A_c$ and
    $C$: the correction adds curvature where KFAC underestimates it and removes it
    where KFAC overestimates it.

    **Normalisation and averaging.** $A$ and $G$ are averaged as in KFAC. The
    correction is stored as $G_c = \pm\sqrt{\sigma}\, U$, $A_c = \pm\sqrt{\sigma}\,
    V$ with the sign that makes $\operatorname{tr} A_c \ge 0$
    ([`balanced_factors`][curvlib.linalg.balanced_factors]), and its
    factors are averaged separately; power iterations start from the previous
    $A_c$.

    **Damping.** The operator inverted is $(G + \gamma_G I)\otimes(A + \gamma_A I)
    + G_c\otimes A_c$ with $\gamma_A\gamma_G = \lambda$ ($\pi$-split), through
    [`two_term_inverse`][curvlib.linalg.kron.two_term_inverse]: whitened by the
    damped KFAC term, the correction has eigenvalues $s_G s_A$, and wherever
    $1 + s_G s_A < \epsilon$ (``min_eig``, i.e. the correction cancels more than
    $1 - \epsilon$ of the damped KFAC curvature) the eigenvalue is raised to
    $\epsilon$. The preconditioner is thus always positive definite, and
    ``damped_to_dense`` returns the floored operator.

    Cost per layer with $d_o$ rows, $d_i$ columns, $N$ samples, $K$ columns:
    update KFAC's factors plus power iterations on the deflated $\mathcal R(F)$,
    each $O(N d_i^2 + KN d_o^2)$ for one output position or
    $O(KN d_o d_i (d_o + d_i))$ for convolutions; inverse two Cholesky
    factorisations and two ``eigh`` of the factor sizes; apply four matrix
    products.
    The sample-space form, where cheaper (costs in
    [`curvlib.linalg.sample_space`][curvlib.linalg.sample_space]), pays $O(N^2)$
    per product and forms the correction's factors once.
    The KFAC term joins the sample terms there: its inner products with them
    cost one more factor pair.

    Example:
        >>> approx = KFACCorrected(tol=1e-6, min_eig=0.1)
        >>> sorted(kind.name for kind in approx.required_stats)
        ['KRONECKER', 'PER_SAMPLE_IO']

    Args:
        tol: Relative residual at which power iterations stop.
        max_iter: Cap on the power iterations per update.
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
        ValueError: If ``tol`` or ``max_iter`` is not positive, ``min_eig`` is
            outside $(0, 1]$ or ``form`` or ``apply_dtype`` is unknown.

    References:
        A. Koroko, A. Anciaux-Sedrakian, I. Ben Gharbia, V. Garès, M. Haddou and
        Q. H. Tran, "Efficient approximations of the Fisher matrix in neural
        networks using Kronecker product singular value decomposition", ESAIM:
        Proceedings and Surveys, 2023. C. F. Van Loan and N. Pitsianis,
        "Approximation with Kronecker products", in Linear Algebra for Large Scale
        and Real-Time Applications, 1993.
    """

    required_stats: ClassVar[frozenset[StatKind]] = frozenset(
        {StatKind.KRONECKER, StatKind.PER_SAMPLE_IO}
    )

    def __init__(
        self,
        tol: float = 1e-6,
        max_iter: int = 100,
        min_eig: float = 0.1,
        decay: float = DEFAULT_DECAY,
        dtype: torch.dtype | None = None,
        form: RearrangedForm | str = RearrangedForm.AUTO,
        apply_dtype: ApplyDtype = "auto",
    ) -> None:
        super().__init__(form, decay=decay, dtype=dtype, apply_dtype=apply_dtype)
        check_settings(tol, min_eig, max_iter=max_iter)
        self.tol, self.max_iter, self.min_eig = tol, int(max_iter), min_eig

    def _make_block(self, out_dim: int, in_dim: int) -> LayerBlock:
        return _KFACCorrectedBlock(
            out_dim, in_dim, self.dtype, self.min_eig, self.tol, self.max_iter, self.form,
            self.apply_dtype,
        )  # fmt: skip
