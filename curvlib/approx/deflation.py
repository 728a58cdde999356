r"""Deflation: the optimal sum of two Kronecker products per layer.

Also home of [`KroneckerSumBlock`][curvlib.approx.deflation.KroneckerSumBlock],
the running estimate $C = G_1 \otimes A_1 + G_2 \otimes A_2$ that
[`Deflation`][curvlib.approx.deflation.Deflation],
[`Lanczos`][curvlib.approx.lanczos.Lanczos] and
[`KFACCorrected`][curvlib.approx.kfac_corrected.KFACCorrected] share: they
differ only in how one batch's four factors are computed.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from curvlib.approx.base import (
    DEFAULT_DECAY,
    LayerBlock,
    LayerInverse,
    SharedInverseBlock,
    running_average,
    standard_normal,
)
from curvlib.approx.kpsvd import RearrangedApprox, _RearrangedBlock
from curvlib.core.stats import LayerStatistics, StatKind
from curvlib.linalg.factors import symmetrize
from curvlib.linalg.kron import KroneckerSumInverse, two_term_inverse
from curvlib.linalg.precision import ApplyDtype, apply_cost, check_apply_dtype, resolve_apply_dtype
from curvlib.linalg.rearrange import (
    Coordinates,
    Deflated,
    RearrangedFisher,
    balanced_factors,
    deflated,
    power_svd,
    psd_start,
)
from curvlib.linalg.sample_space import RearrangedForm, rearranged

Factors = tuple[Tensor, Tensor, Tensor, Tensor]
r"""``(G1, A1, G2, A2)`` of $G_1 \otimes A_1 + G_2 \otimes A_2$."""

_KEYS = ("G1", "A1", "G2", "A2")


def check_settings(tol: float, min_eig: float, **counts: int) -> None:
    """Validate the settings of a two-term method.

    Raises:
        ValueError: If ``tol`` is not positive, ``min_eig`` is outside $(0, 1]$ or
            a count is below one.
    """
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}.")
    if not 0 < min_eig <= 1:
        raise ValueError(f"min_eig must lie in (0, 1], got {min_eig!r}.")
    for name, count in counts.items():
        if count < 1:
            raise ValueError(f"{name} must be at least 1, got {count!r}.")


class KroneckerSumBlock(_RearrangedBlock, SharedInverseBlock):
    r"""Running estimate $C = G_1 \otimes A_1 + G_2 \otimes A_2$ of one layer's block.

    Each update computes the four factors of the current batch
    (``_batch_factors``) and folds each into its running average,
    $X_k = \rho X_{k-1} + (1-\rho)\hat X_k$. The damped inverse is
    [`two_term_inverse`][curvlib.linalg.kron.two_term_inverse]: $\lambda$ on the
    first term only, split by $\pi$, and every whitened eigenvalue floored at
    ``min_eig``, so the operator it inverts,
    $(G_1 + \gamma_G I)\otimes(A_1 + \gamma_A I) + G_2 \otimes A_2$ with the
    floor, is positive definite even for an indefinite second term.
    ``damped_to_dense`` returns exactly that operator.

    Args:
        out_dim: Rows of the layer's $[W \mid b]$ matrix.
        in_dim: Columns of the layer's $[W \mid b]$ matrix.
        dtype: Storage dtype of the factors.
        min_eig: Floor $\epsilon$ of the whitened eigenvalues.
        form: How products with $\mathcal R(F)$ are computed.
        apply_dtype: The dtype the inverse is applied in
            ([`two_term_inverse`][curvlib.linalg.kron.two_term_inverse]).
    """

    def __init__(
        self,
        out_dim: int,
        in_dim: int,
        dtype: torch.dtype | None,
        min_eig: float,
        form: RearrangedForm = RearrangedForm.AUTO,
        apply_dtype: ApplyDtype = "auto",
    ) -> None:
        super().__init__(out_dim, in_dim, dtype)
        self.min_eig, self.form, self.apply_dtype = min_eig, form, apply_dtype
        self.factors: Factors | None = None
        self.last_iterations = 0
        r"""Products with $\mathcal R(F)$ spent by the last update (telemetry)."""
        self.last_form = form
        """The form the last update used (telemetry)."""

    @abstractmethod
    def _batch_factors(self, stats: LayerStatistics) -> Factors:
        """The factors ``(G1, A1, G2, A2)`` of one batch, normalised for averaging."""

    def _rearranged(
        self, stats: LayerStatistics, term: tuple[Tensor, Tensor] | None = None, pairs: int = 2
    ) -> RearrangedFisher | Deflated | Coordinates:
        r"""$\mathcal R(F)$ (minus ``term``, a ``(G, A)`` pair) in the chosen form.

        Records the form in ``last_form``; ``_warm`` then gives previous
        factors as starts only to the matrix-free form (in the sample-space form
        a matrix start costs as much as a factor, and iterations cost
        $O(N^2)$: it starts from the batch's own KFAC factor instead).
        """
        assert stats.io is not None
        terms = [] if term is None else [term]
        op, self.last_form = rearranged(stats.io, self.dtype, self.form, terms, pairs=pairs)
        return op

    def _warm(self, index: int) -> Tensor | None:
        """The previous factor ``index`` of ``(G1, A1, G2, A2)`` as a start, if it is used."""
        if self.factors is None or self.last_form is not RearrangedForm.MATRIX_FREE:
            return None
        return self.factors[index]

    def _fit_shapes(self) -> list[tuple[int, int]]:
        o, i = self.out_dim, self.in_dim
        return [(o, o), (i, i), (o, o), (i, i)]

    def _fit(self, stats: LayerStatistics) -> Factors:
        return self._batch_factors(stats)

    def _fold(self, new: tuple[Tensor, ...], rho: float) -> None:
        """Fold one batch's factors into the running averages of the four factors."""
        old = self.factors
        G1, A1, G2, A2 = (
            running_average(None if old is None else old[i], new[i].contiguous(), rho)
            for i in range(4)
        )
        self.factors = (G1, A1, G2, A2)

    def _current(self) -> Factors:
        if self.factors is None:
            raise RuntimeError(f"{type(self).__name__} has no estimate yet: update() first.")
        return self.factors

    def matvec(self, mat: Tensor) -> Tensor:
        """$G_1 V A_1 + G_2 V A_2$ for ``[..., out, in]`` matrices $V$."""
        G1, A1, G2, A2 = self._current()
        mat = mat.to(A1.dtype)
        return G1 @ mat @ A1 + G2 @ mat @ A2

    def inverse(self, damping: float) -> KroneckerSumInverse:
        """The floored damped inverse of the class docstring, as an operator."""
        G1, A1, G2, A2 = self._current()
        return two_term_inverse(
            G1, A1, G2, A2, damping, min_eig=self.min_eig, apply_dtype=self.apply_dtype
        )

    def trace(self) -> Tensor:
        r"""$\operatorname{tr} C = \sum_j \operatorname{tr} G_j \operatorname{tr} A_j$ (cheap)."""
        G1, A1, G2, A2 = self._current()
        return G1.diagonal().sum() * A1.diagonal().sum() + G2.diagonal().sum() * A2.diagonal().sum()

    def logdet(self, damping: float) -> Tensor:
        r"""$\log\det$ of the floored damped operator, through the whitening.

        $\log\det\big((G_1 + \gamma_G I)\otimes(A_1 + \gamma_A I)\big) +
        \sum_{pq}\log\max(1 + s_{G,p} s_{A,q}, \epsilon)$
        ([`KroneckerSumInverse.logdet`][curvlib.linalg.kron.KroneckerSumInverse.logdet]):
        the cost of building the inverse, two Cholesky and two ``eigh`` of the
        factor sizes.
        """
        return self.inverse(damping).logdet()

    def sample(
        self, damping: float, num_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""Draws from $\mathcal N(0, D(\lambda)^{-1})$ through the same whitening.

        $X = P_G (Z \odot D^{1/2}) P_A^\top$
        ([`KroneckerSumInverse.sample`][curvlib.linalg.kron.KroneckerSumInverse.sample]):
        the inverse's cost once, two products per draw.
        """
        inverse = self.inverse(damping)
        noise = standard_normal((num_samples, self.out_dim, self.in_dim), inverse.scale, generator)
        return inverse.sample(noise)

    def condition_number(self, damping: float) -> float:
        r"""A lower bound of the condition number of the floored damped operator.

        [`KroneckerSumInverse.condition_number`][curvlib.linalg.kron.KroneckerSumInverse]:
        $O(d_o^2 + d_i^2)$ on top of the inverse (which the preconditioner has
        built anyway; on its own this method builds it).
        """
        return self.inverse(damping).condition_number

    def _device(self) -> torch.device:
        return self.factors[0].device if self.factors is not None else torch.device("cpu")

    def to_dense(self) -> Tensor:
        r"""$G_1 \otimes A_1 + G_2 \otimes A_2$."""
        G1, A1, G2, A2 = self._current()
        return torch.kron(G1, A1) + torch.kron(G2, A2)

    def damped_to_dense(self, damping: float) -> Tensor:
        r"""The operator that ``inverse`` inverts, floor included.

        $Q \operatorname{diag}(\max(1 + s_G \otimes s_A, \epsilon)) Q^\top$ with
        $Q = P_G^{-\top} \otimes P_A^{-\top}$ (notation of
        [`curvlib.linalg.kron`][curvlib.linalg.kron]); without floored eigenvalues
        it equals $(G_1 + \gamma_G I)\otimes(A_1 + \gamma_A I) + G_2\otimes A_2$.
        """
        inv = self.inverse(damping)
        q_g, q_a = (torch.linalg.inv(p).T.contiguous() for p in (inv.P_G, inv.P_A))
        q = torch.kron(q_g, q_a)  # torch.kron of torch 2.14 rejects transposed inputs
        return symmetrize((q * (1.0 / inv.scale).flatten()) @ q.T)

    def _packed_sizes(self) -> list[int]:
        """``P_G``, ``P_A``, the scale, ``C_G``, ``C_A``, then ``num_floored`` and the condition."""
        o, i = self.out_dim, self.in_dim
        return [o * o, i * i, o * i, o * o, i * i, 2]

    def _estimate_like(self) -> Tensor:
        return self._current()[0]

    def _packed_parts(self, inverse: LayerInverse) -> tuple[list[Tensor], list[float]]:
        assert isinstance(inverse, KroneckerSumInverse)
        tensors = [inverse.P_G, inverse.P_A, inverse.scale, inverse.chol_G, inverse.chol_A]
        return tensors, [inverse.num_floored, inverse.condition_number]

    def unpacked_inverse(self, packed: Tensor) -> KroneckerSumInverse:
        """The inverse that ``packed_inverse`` packed, its apply dtype resolved as there."""
        o, i = self.out_dim, self.in_dim
        shapes = [(o, o), (i, i), (o, i), (o, o), (i, i)]
        *parts, numbers = torch.split(packed, self._packed_sizes())
        P_G, P_A, scale, chol_G, chol_A = (
            p.reshape(shape).clone() for p, shape in zip(parts, shapes, strict=True)
        )
        num_floored, condition = numbers.tolist()
        low = resolve_apply_dtype(
            check_apply_dtype(self.apply_dtype), scale.dtype, scale.device, apply_cost(o, i),
            condition=condition,
        )  # fmt: skip
        return KroneckerSumInverse(
            P_G=P_G, P_A=P_A, scale=scale, num_floored=int(num_floored), chol_G=chol_G,
            chol_A=chol_A, condition_number=condition, apply_dtype=low,
        )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The four factors."""
        return {k: f.clone() for k, f in zip(_KEYS, self._current(), strict=True)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the four factors from ``state_dict()``."""
        G1, A1, G2, A2 = (state[k].clone() for k in _KEYS)
        self.factors = (G1, A1, G2, A2)


class _DeflationBlock(KroneckerSumBlock):
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
        op = self._rearranged(stats)
        first = power_svd(
            op, psd_start(op, self._warm(1)), tol=self.tol, max_iter=self.max_iter
        )  # fmt: skip
        second = power_svd(
            deflated(op, first),
            self._warm(3),
            tol=self.tol,
            max_iter=self.max_iter,
            scale=first.sigma,
        )
        self.last_iterations = first.iterations + second.iterations
        # The first pair is positive semi-definite by construction (psd_start).
        return (*balanced_factors(first), *balanced_factors(second))


class Deflation(RearrangedApprox):
    r"""The optimal rank-2 Kronecker sum: top two singular pairs of the rearranged block.

    Each layer's block is approximated by $C = G_1 \otimes A_1 + G_2 \otimes A_2$,
    the best sum of two Kronecker products (with symmetric factors, see
    [`curvlib.linalg.rearrange`][curvlib.linalg.rearrange]) in Frobenius norm:

    $$\min_{G_j, A_j} \Big\|F - \sum_{j=1}^2 G_j \otimes A_j\Big\|_F
    = \Big\|\mathcal R(F) - \sum_{j=1}^2 \sigma_j \operatorname{vec}(U_j)
    \operatorname{vec}(V_j)^\top\Big\|_F .$$

    The first pair comes from power iterations on $\mathcal R(F)$, the second from
    power iterations on $\mathcal R(F) - \sigma_1 \operatorname{vec}(U_1)
    \operatorname{vec}(V_1)^\top$ (a genuine second pair, orthogonal to the
    first), both warm-started from the previous step's factors.

    **Normalisation and averaging.** Each pair is stored as
    $G_j = \pm\sqrt{\sigma_j}\, U_j$, $A_j = \pm\sqrt{\sigma_j}\, V_j$ with the sign
    that makes $\operatorname{tr} A_j \ge 0$
    ([`balanced_factors`][curvlib.linalg.balanced_factors]); the first
    pair's factors are then positive semi-definite (power iterations from a
    positive semi-definite start keep them so). The four factors are averaged
    separately over steps. The second term is indefinite in general, so $C$ may
    be too.

    **Damping.** $(G_1 + \gamma_G I)\otimes(A_1 + \gamma_A I) + G_2\otimes A_2$,
    $\gamma_A\gamma_G = \lambda$ ($\pi$-split), with whitened eigenvalues floored
    at ``min_eig`` ([`curvlib.linalg.kron`][curvlib.linalg.kron]).

    Cost per layer with $d_o$ rows, $d_i$ columns, $N$ samples, $K$ columns:
    update $2 \times$ (power iterations) products with $\mathcal R(F)$, each
    $O(N d_i^2 + KN d_o^2)$ for one output position, $O(KN d_o d_i (d_o + d_i))$
    for convolutions; inverse two
    Cholesky factorisations and two ``eigh`` of the factor sizes; apply four
    matrix products.
    The sample-space form, where cheaper (costs in
    [`curvlib.linalg.sample_space`][curvlib.linalg.sample_space]), pays $O(N^2)$
    per product after building its Gram matrices, and forms two factor pairs.
    Warm starts from the previous factors are used by the matrix-free form only.

    Example:
        >>> approx = Deflation(tol=1e-6, max_iter=100)
        >>> sorted(kind.name for kind in approx.required_stats)
        ['PER_SAMPLE_IO']

    Args:
        tol: Relative residual at which power iterations stop.
        max_iter: Cap on the power iterations per pair and update.
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

    required_stats: ClassVar[frozenset[StatKind]] = frozenset({StatKind.PER_SAMPLE_IO})

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
        return _DeflationBlock(
            out_dim, in_dim, self.dtype, self.min_eig, self.tol, self.max_iter, self.form,
            self.apply_dtype,
        )  # fmt: skip
