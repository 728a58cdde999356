r"""KPSVD: the Frobenius-optimal single Kronecker product per layer.

Where KFAC assumes that inputs and output gradients are independent, KPSVD takes
the Kronecker product closest to the exact layer block: the top singular pair of
the Van Loan–Pitsianis rearrangement
([`curvlib.linalg.rearrange`][curvlib.linalg.rearrange]). It is never further
from the block than KFAC in Frobenius norm, and it costs a few products with the
per-sample statistics per update instead of two outer products.

## The rearranged-Fisher family

All four methods fit Kronecker sums to $\mathcal R(F)$ from the per-sample
inputs and output gradients of a layer, matrix-free or in sample space (the
cheaper per layer, [`curvlib.linalg.sample_space`][curvlib.linalg.sample_space];
``form`` forces one), and keep running averages of
their factors normalised by
[`balanced_factors`][curvlib.linalg.balanced_factors]
($\operatorname{tr} A_j \ge 0$, $\|G_j\|_F = \|A_j\|_F$):

* [`KPSVD`][curvlib.approx.kpsvd.KPSVD]: $\sigma_1 U_1 \otimes V_1$ by power
  iterations; positive semi-definite; KFAC's $\pi$-split Cholesky inverse.
* [`Deflation`][curvlib.approx.deflation.Deflation]: $\sum_{j \le 2} \sigma_j
  U_j \otimes V_j$, the second pair by power iterations on the deflated
  operator; may be indefinite; floored two-term inverse.
* [`Lanczos`][curvlib.approx.lanczos.Lanczos]: the same sum by
  Golub–Kahan–Lanczos bidiagonalisation; floored two-term inverse.
* [`KFACCorrected`][curvlib.approx.kfac_corrected.KFACCorrected]: KFAC's
  $G \otimes A$ plus the best Kronecker term of the residual; may be indefinite;
  floored two-term inverse.

Per batch, the Frobenius errors are ordered: KPSVD $\le$ KFAC, Deflation $=$
Lanczos $\le$ KPSVD, KFAC-corrected $\le$ KFAC; a rank-2 method is exact when
rank$\,\mathcal R(F) \le 2$. The two-term methods share one block,
[`KroneckerSumBlock`][curvlib.approx.deflation.KroneckerSumBlock], and its
damping rule ([`two_term_inverse`][curvlib.linalg.kron.two_term_inverse]).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from curvlib.approx.base import (
    DEFAULT_DECAY,
    LayerBlock,
    LayerwiseApprox,
    SplitUpdateBlock,
    running_average,
)
from curvlib.approx.kfac import KFACDamping, _KFACBlock
from curvlib.core.stats import LayerStatistics, StatKind
from curvlib.linalg.precision import ApplyDtype, check_apply_dtype
from curvlib.linalg.rearrange import balanced_factors, power_svd, psd_start
from curvlib.linalg.sample_space import RearrangedForm, rearranged


class RearrangedApprox(LayerwiseApprox):
    r"""The shared part of the rearranged-Fisher family: the form and the telemetry.

    Args:
        form: How products with $\mathcal R(F)$ are computed
            ([`RearrangedForm`][curvlib.linalg.sample_space.RearrangedForm]):
            ``AUTO`` (default) takes the cheaper form per layer and update.
        decay: Upper bound of the running-average weight on the old estimate.
        dtype: Storage dtype of the factors (default: that of the statistics).
        apply_dtype: The dtype the inverse is applied in on every step: ``"auto"``
            (default) bfloat16 where the CPU multiplies it in hardware and the
            layer's inverse is large and well conditioned
            ([`curvlib.linalg.precision`][curvlib.linalg.precision]), else the
            factors' dtype; ``None`` for the factors' dtype; or a dtype.

    Raises:
        ValueError: If ``form`` or ``apply_dtype`` is not one of its choices.
    """

    def __init__(
        self,
        form: RearrangedForm | str = RearrangedForm.AUTO,
        decay: float = DEFAULT_DECAY,
        dtype: torch.dtype | None = None,
        apply_dtype: ApplyDtype = "auto",
    ) -> None:
        super().__init__(decay=decay, dtype=dtype)
        self.form = RearrangedForm(form)
        self.apply_dtype = check_apply_dtype(apply_dtype)

    splits_update: ClassVar[bool] = True
    """Each layer's fit to the batch (its power or Lanczos iterations) is split over ranks."""
    owner_statistics: ClassVar[frozenset[StatKind]] = frozenset({StatKind.PER_SAMPLE_IO})
    """Only the fit reads the per-sample statistics; ``update_with`` folds in the factors."""
    shares_inverses: ClassVar[bool] = True

    def last_products(self) -> dict[str, tuple[RearrangedForm, int]]:
        r"""Per layer, the form and the products with $\mathcal R(F)$ of the last update.

        Products are counted as in
        [`SingularTriple.iterations`][curvlib.linalg.SingularTriple]
        (one with $\mathcal R$ and one with $\mathcal R^\top$ each), summed
        over the pairs of the update.
        """
        return {
            name: (block.last_form, block.last_iterations)  # type: ignore[attr-defined]
            for name, block in self.blocks.items()
        }


_FORMS = list(RearrangedForm)


class _RearrangedBlock(SplitUpdateBlock):
    r"""A block that fits Kronecker factors to each batch's $\mathcal R(F)$ and averages them.

    ``update`` is ``_fold(_fit(stats), rho)``: the fit (power or Lanczos
    iterations, the expensive part) is what a data-parallel rank computes for
    the layers it owns; its packed form is the factors, row-major, then the
    telemetry (``last_iterations`` and the index of ``last_form``).
    """

    last_iterations: int
    last_form: RearrangedForm

    @abstractmethod
    def _fit_shapes(self) -> list[tuple[int, int]]:
        """The shapes of the factors ``_fit`` returns."""

    @abstractmethod
    def _fit(self, stats: LayerStatistics) -> tuple[Tensor, ...]:
        """The factors of one batch, normalised for averaging; sets the telemetry."""

    @abstractmethod
    def _fold(self, factors: tuple[Tensor, ...], rho: float) -> None:
        """Fold one batch's factors into the running averages."""

    def update(self, stats: LayerStatistics, rho: float) -> None:
        self._fold(self._fit(stats), rho)

    def fit_size(self) -> int:
        return sum(rows * cols for rows, cols in self._fit_shapes()) + 2

    def fit_dtype(self, stats: LayerStatistics) -> torch.dtype:
        assert stats.io is not None
        return self.dtype or stats.io.inputs.dtype

    def fit(self, stats: LayerStatistics, rho: float) -> Tensor:
        dtype = self.fit_dtype(stats)
        try:
            factors = self._fit(stats)
        except (RuntimeError, ValueError):
            assert stats.io is not None
            return stats.io.inputs.new_full((self.fit_size(),), torch.nan, dtype=dtype)
        telemetry = [float(self.last_iterations), float(_FORMS.index(self.last_form))]
        parts = [f.reshape(-1).to(dtype) for f in factors]
        return torch.cat([*parts, parts[0].new_tensor(telemetry)])

    def update_fitted(self, stats: LayerStatistics, rho: float, packed: Tensor) -> None:
        shapes = self._fit_shapes()
        *parts, telemetry = torch.split(packed, [r * c for r, c in shapes] + [2])
        iterations, form = telemetry.tolist()
        self.last_iterations, self.last_form = int(iterations), _FORMS[int(form)]
        factors = (p.reshape(shape).clone() for p, shape in zip(parts, shapes, strict=True))
        self._fold(tuple(factors), rho)


class _KPSVDBlock(_RearrangedBlock, _KFACBlock):
    """A single Kronecker product, refitted by power iterations; inverted like KFAC."""

    def __init__(
        self,
        out_dim: int,
        in_dim: int,
        dtype: torch.dtype | None,
        damping: KFACDamping,
        tol: float,
        max_iter: int,
        form: RearrangedForm,
        apply_dtype: ApplyDtype = "auto",
    ) -> None:
        super().__init__(out_dim, in_dim, dtype, damping, apply_dtype=apply_dtype)
        self.tol, self.max_iter, self.form = tol, max_iter, form
        self.last_iterations = 0
        """Power iterations spent by the last update (telemetry)."""
        self.last_form = form
        """The form the last update used (telemetry)."""

    def _fit_shapes(self) -> list[tuple[int, int]]:
        return [(self.out_dim, self.out_dim), (self.in_dim, self.in_dim)]

    def _fit(self, stats: LayerStatistics) -> tuple[Tensor, Tensor]:
        assert stats.io is not None
        op, self.last_form = rearranged(stats.io, self.dtype, self.form)
        warm = self.A if self.last_form is RearrangedForm.MATRIX_FREE else None
        triple = power_svd(op, psd_start(op, warm), tol=self.tol, max_iter=self.max_iter)
        self.last_iterations = triple.iterations
        return balanced_factors(triple)  # (G, A), positive semi-definite by construction

    def _fold(self, factors: tuple[Tensor, ...], rho: float) -> None:
        G, A = factors
        self.A = running_average(self.A, A, rho)
        self.G = running_average(self.G, G, rho)


class KPSVD(RearrangedApprox):
    r"""Kronecker product singular value decomposition: the best $G \otimes A$ per layer.

    Each layer's block $F = \frac1N\sum_{k,n} \operatorname{vec}(\bar W_{kn})
    \operatorname{vec}(\bar W_{kn})^\top$ is approximated by the Kronecker product
    nearest to it in Frobenius norm,

    $$G \otimes A = \operatorname*{arg\,min}_{G, A} \|F - G\otimes A\|_F
    = \sigma_1 U_1 \otimes V_1 ,$$

    with $(\sigma_1, U_1, V_1)$ the top singular triple of the rearranged block
    $\mathcal R(F)$, $\mathcal R(F)\operatorname{vec}(V) =
    \operatorname{vec}(\frac1N\sum_{k,n} \bar W_{kn} V \bar W_{kn}^\top)$
    (Van Loan & Pitsianis 1993). Power iterations find it matrix-free from the
    per-sample inputs and output gradients, warm-started from the previous
    step's $A$ and stopped at relative residual ``tol`` or after ``max_iter``
    iterations. Since KFAC's $G_\text{KFAC} \otimes A_\text{KFAC}$ is one
    candidate, $\|F - G\otimes A\|_F \le \|F - G_\text{KFAC}\otimes
    A_\text{KFAC}\|_F$ for the batch.

    **Tolerance.** The residual is the sine of the angle between the iterate
    and its image; at ``tol`` $= 10^{-2}$ (the default) the factors' directions
    are within about $10^{-2}$ of the batch's top pair and the squared Frobenius
    error within about $10^{-4}\sigma_1^2$ of its minimum. On the layers of
    four of curvlib's convergence benchmark tasks, in float64, $G \otimes A$ at
    $10^{-2}$ was within $8\cdot10^{-3}$ (relative Frobenius distance) of the
    pair at $10^{-10}$, after 1–7 iterations against 2–27. Each iteration is
    two products with the layer's per-sample statistics: on the convolutional
    layers of the digits CNN 6–9 iterations per update at float32's floor of
    1.2e-4, 3–4 at $10^{-2}$, where the products are most of KPSVD's
    statistics step.

    **Normalisation and averaging.** The pair is stored as $G = \sqrt{\sigma_1}\,
    U_1$, $A = \sqrt{\sigma_1}\, V_1$ with the sign that makes
    $\operatorname{tr} A \ge 0$
    ([`balanced_factors`][curvlib.linalg.balanced_factors]), so
    $\|G\|_F = \|A\|_F = \sqrt{\sigma_1}$; for positive semi-definite $F$ both
    factors are then positive semi-definite (Van Loan & Pitsianis, theorem 5.8),
    and the power iterations keep them so at every iterate: they start from the
    previous $A$ or the identity, and each product maps positive semi-definite
    matrices to positive semi-definite ones
    ([`psd_start`][curvlib.linalg.psd_start]). $G$ and $A$ are
    averaged separately over steps, like KFAC's factors.

    **Damping.** As KFAC ([`KFACDamping`][curvlib.approx.kfac.KFACDamping]):
    by default $(G + \frac{\sqrt\lambda}{\pi} I)\otimes(A + \pi\sqrt\lambda I)$
    with two Cholesky inverses; ``SQRT`` adds $\sqrt\lambda$ to both factors
    (no $\pi$ split, two Cholesky inverses); ``EIGEN`` damps exactly in the
    Kronecker eigenbasis.

    Cost per layer with $d_o$ rows, $d_i$ columns, $N$ samples and $K$ columns:
    update one product with $\mathcal R(F)$ and one with $\mathcal R(F)^\top$ per
    power iteration, $O(N d_i^2 + KN d_o^2)$ for one output position (no
    per-sample gradient is formed) or $O(KN d_o d_i (d_o + d_i))$ for
    convolutions; inverse two
    Cholesky factorisations $O(d_o^3 + d_i^3)$; apply $O(d_o d_i (d_o + d_i))$.
    In the sample-space form, where cheaper
    ([`choose_form`][curvlib.linalg.sample_space.choose_form]), the update
    costs $O(N^2 (d_i + K^2 d_o))$ once, $O(N^2)$ per power iteration and
    one KFAC-sized factor pair at the end.
    There the iterations start from the batch's own KFAC factor $\bar A^\top
    \bar A$ (free), not from the previous $A$ (whose inner products with the
    new samples would cost as much as forming a factor).

    Example:
        >>> approx = KPSVD(tol=1e-6, max_iter=50)
        >>> approx.required_stats == frozenset({StatKind.PER_SAMPLE_IO})
        True

    Args:
        damping_mode: How $\lambda$ is applied.
        tol: Relative residual at which power iterations stop (raised to the
            statistics dtype's floor, [`effective_tol`][curvlib.linalg.effective_tol]).
            Exactness checks against the dense rearrangement pass a small one.
        max_iter: Cap on the power iterations per update.
        decay: Upper bound of the running-average weight on the old estimate.
        dtype: Storage dtype of the factors (default: that of the statistics).
        form: How products with $\mathcal R(F)$ are computed
            ([`RearrangedForm`][curvlib.linalg.sample_space.RearrangedForm]).
        apply_dtype: The dtype the inverse is applied in on every step
            (``"auto"``, ``None`` or a dtype; as for
            [`KFAC`][curvlib.approx.kfac.KFAC], see
            [`curvlib.linalg.precision`][curvlib.linalg.precision]).

    Raises:
        ValueError: If ``tol`` or ``max_iter`` is not positive, or ``form`` or
            ``apply_dtype`` is unknown.

    References:
        A. Koroko, A. Anciaux-Sedrakian, I. Ben Gharbia, V. Garès, M. Haddou and
        Q. H. Tran, "Efficient approximations of the Fisher matrix in neural
        networks using Kronecker product singular value decomposition", ESAIM:
        Proceedings and Surveys, 2023. C. F. Van Loan and N. Pitsianis,
        "Approximation with Kronecker products", in Linear Algebra for Large Scale
        and Real-Time Applications, 1993.
    """

    default_max_move: ClassVar[float | None] = None
    r"""No bound on a layer's step by default, where KFAC's is $0.2$ of its weights' norm.

    ([`default_max_move`][curvlib.optim.defaults.default_max_move].) KPSVD's
    steps reach that bound where KFAC's do not: on the convergence benchmark it
    shortened them on three tasks of five, which then needed more epochs to
    tuned Adam's loss (CURVES 0.52 of Adam's against 0.39, the ReLU
    autoencoder 0.38 against 0.32, the CNN 0.43 against 0.28; fewer only on the
    convolutional autoencoder, 0.20 against 0.26)
    ([results](../results/convergence.md#a-bound-on-each-layers-step)).
    """

    required_stats: ClassVar[frozenset[StatKind]] = frozenset({StatKind.PER_SAMPLE_IO})

    def __init__(
        self,
        damping_mode: KFACDamping | str = KFACDamping.PI,
        tol: float = 1e-2,
        max_iter: int = 100,
        decay: float = DEFAULT_DECAY,
        dtype: torch.dtype | None = None,
        form: RearrangedForm | str = RearrangedForm.AUTO,
        apply_dtype: ApplyDtype = "auto",
    ) -> None:
        super().__init__(form, decay=decay, dtype=dtype, apply_dtype=apply_dtype)
        if not (tol > 0 and max_iter >= 1):
            raise ValueError(f"tol and max_iter must be positive, got {tol!r}, {max_iter!r}.")
        self.damping_mode = KFACDamping(damping_mode)
        self.tol, self.max_iter = tol, int(max_iter)

    def _make_block(self, out_dim: int, in_dim: int) -> LayerBlock:
        return _KPSVDBlock(
            out_dim, in_dim, self.dtype, self.damping_mode, self.tol, self.max_iter, self.form,
            apply_dtype=self.apply_dtype,
        )  # fmt: skip
