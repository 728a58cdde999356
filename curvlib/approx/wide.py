r"""The wide-network family of natural gradients (Karakida & Osawa, 2020).

Three pieces, all built on the per-sample gradient rows
$U = [U_1 \mid \dots \mid U_L]$ of the latest batch that
[`ExactNaturalGradient`][curvlib.approx.natural_gradient.ExactNaturalGradient]
keeps ($F = U^\top U$, $m = KN$ rows):

* [`BlockTridiagonalNaturalGradient`][curvlib.approx.wide.BlockTridiagonalNaturalGradient],
  a [`CurvatureApprox`][curvlib.core.protocols.CurvatureApprox] whose Fisher keeps
  each layer's block and the blocks between neighbouring layers, solved in
  sample space ([`curvlib.linalg.tridiagonal`][curvlib.linalg.tridiagonal]);
* the function-space forms $\Delta\theta = U^\top(\Theta + \rho I)^{-1} r$ through
  the empirical NTK $\Theta = UU^\top$
  ([`function_space_direction`][curvlib.approx.wide.function_space_direction]),
  which also work at $\rho = 0$, K-FAC's step through per-layer kernels
  of inputs and output gradients, and the unit-wise step through per-unit
  kernels;
* the learning rates at which each form moves the linearised network onto its
  targets in one step
  ([`optimal_learning_rate`][curvlib.approx.learning_rates.optimal_learning_rate]).

Layer order, and so which layers are neighbours, is the order of
``stats.layers``: the layout's ``named_modules()`` order.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import ClassVar

import torch
from torch import Tensor

from curvlib.approx.kfac import KFACDamping
from curvlib.approx.natural_gradient import ExactNaturalGradient, SampleSpaceInverse
from curvlib.approx.unitwise import unit_expand, unit_kernels
from curvlib.core.stats import CurvatureStatistics, FisherType, PerSampleIO
from curvlib.linalg.factors import FactorizationError, pi_split_of_means
from curvlib.linalg.tridiagonal import (
    BlockTridiagonalInverse,
    TridiagonalKernel,
    tridiagonal_matvec,
)
from curvlib.linalg.woodbury import LayerRows, layer_rows


class BlockTridiagonalNaturalGradient(ExactNaturalGradient):
    r"""Natural gradient with the block-tridiagonal Fisher: neighbouring layers coupled.

    $F_\text{tri}$ keeps the blocks $F_{ll'} = U_l^\top U_{l'}$ with $|l - l'|\le1$
    of the full Fisher of the latest batch (the rows of
    [`ExactNaturalGradient`][curvlib.approx.natural_gradient.ExactNaturalGradient]),
    and the damping is exact Tikhonov damping,

    $$(F_\text{tri} + \lambda I)^{-1} g = \frac1\lambda\Big(g - \mathcal U^\top
    (\lambda I_{Lm} + (T\otimes I)K)^{-1} (T\otimes I)\,\mathcal U g\Big),$$

    with $\mathcal U = \operatorname{blockdiag}(U_l)$, $K_l = U_lU_l^\top$ and $T$ the
    $L\times L$ tridiagonal matrix of ones
    ([`curvlib.linalg.tridiagonal`][curvlib.linalg.tridiagonal]). With one layer it
    is block-diagonal NG, with two the exact NG.

    **Not positive definite.** The tridiagonal truncation of a positive
    semi-definite matrix is indefinite in general (for three layers $T$ itself
    has a negative eigenvalue), so $F_\text{tri} + \lambda I$ may be indefinite
    or singular. ``inverse`` refuses a singular system with a
    [`FactorizationError`][curvlib.linalg.factors.FactorizationError] that says
    why; an indefinite one can give a direction that climbs, which the
    optimizer's guards judge for the whole step (``couples_layers``). ``logdet``
    and ``sample`` are therefore not offered. ``inverse(damping)`` returns a
    [`WoodburyPreconditioner`][curvlib.approx.natural_gradient.WoodburyPreconditioner]
    over the [`BlockTridiagonalInverse`][curvlib.linalg.tridiagonal.BlockTridiagonalInverse]
    (its ``woodbury.kernel.pivot_ratio`` says how close to singular the system
    is), without ``condition_numbers``; ``matvec`` multiplies by $F_\text{tri}$.

    Cost with $m = KN$ rows, $L$ layers and $P$ parameters: ``update`` stores the
    statistics; ``inverse`` the kernels $O(m^2P)$ (less for one-position layers)
    and an $Lm\times Lm$ pivoted LU $O(L^3m^3)$; ``apply`` $O(mP + L^2m^2)$ per
    vector. Memory $O(mP + L^2m^2)$.

    Example:
        >>> approx = BlockTridiagonalNaturalGradient()
        >>> sorted(kind.name for kind in approx.required_stats)
        ['PER_SAMPLE_IO']

    Args:
        dtype: Storage dtype of the statistics (default: theirs).

    References:
        R. Karakida and K. Osawa, "Understanding approximate Fisher information
        for fast convergence of natural gradient descent in wide neural
        networks", NeurIPS 2020. J. Martens and R. Grosse, "Optimizing neural
        networks with Kronecker-factored approximate curvature", ICML 2015 (the
        block-tridiagonal approximation).
    """

    couples_layers: ClassVar[bool] = True
    """Neighbouring layers coupled: one layer's direction may oppose its gradient."""

    def _solver(self, blocks: list[LayerRows], damping: float) -> SampleSpaceInverse:
        """The push-through inverse of ``curvlib.linalg.tridiagonal``."""
        return BlockTridiagonalInverse(blocks, damping)

    def _product(self, blocks: list[LayerRows], mats: list[Tensor]) -> list[Tensor]:
        r"""The product with $F_\text{tri}$, $O(mP)$ per vector."""
        return tridiagonal_matvec(blocks, mats)

    def to_dense_full(self) -> Tensor:
        r"""The whole $F_\text{tri}$, ``[P, P]`` in the order of ``layers`` (small nets only)."""
        flats = [r.dense().flatten(1) for r in self._rows().values()]
        sizes = [f.shape[1] for f in flats]
        dense = torch.cat(flats, dim=1)
        dense = dense.T @ dense
        starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        for i in range(len(sizes)):
            for j in range(len(sizes)):
                if abs(i - j) > 1:
                    dense[starts[i] : starts[i + 1], starts[j] : starts[j + 1]] = 0.0
        return dense

    def logdet(self, damping: float, layer: str | None = None) -> Tensor:
        r"""Not offered: $F_\text{tri} + \lambda I$ may be indefinite (class docstring).

        Raises:
            TypeError: Always, naming the approximations that offer it.
        """
        raise _indefinite("has no log-determinant")

    def sample(
        self, damping: float, num_samples: int = 1, *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        r"""Not offered: $F_\text{tri} + \lambda I$ may be indefinite (class docstring).

        Raises:
            TypeError: Always, naming the approximations that offer it.
        """
        raise _indefinite("cannot draw samples (it is no covariance)")


def _indefinite(what: str) -> TypeError:
    return TypeError(
        f"BlockTridiagonalNaturalGradient {what}: its damped Fisher may be indefinite. Use "
        "ExactNaturalGradient or BlockNaturalGradient, which are positive definite."
    )


# -- function-space forms ------------------------------------------------------------


class FunctionSpaceForm(Enum):
    r"""Which Fisher the function-space step inverts.

    Attributes:
        EXACT: The full Fisher, $\Delta\theta = U^\top(\Theta + \rho I)^{-1}r$ with
            $\Theta = \sum_l U_lU_l^\top$.
        BLOCK_DIAGONAL: One block per layer, $\Delta\theta_l = U_l^\top(\Theta_l +
            \rho I)^{-1} r$ with $\Theta_l = U_lU_l^\top$.
        BLOCK_TRIDIAGONAL: Neighbouring layers coupled, $\Delta\theta_l =
            U_l^\top y_l$ with $(\rho I + (T\otimes I)\operatorname{blockdiag}(\Theta_l))\,y
            = \mathbf 1\otimes r$.
        KFAC: K-FAC's Kronecker-factored layer blocks $G_l\otimes A_l$ of the
            batch, damped like [`KFAC`][curvlib.approx.kfac.KFAC] with
            ``kfac_damping`` (the $\pi$ split by default), through the per-layer
            sample kernels of inputs and output gradients, e.g.
            $\Delta\theta_l = \Gamma_l^\top(\Gamma_l\Gamma_l^\top/NT + \gamma_G I)^{-1}
            C(\bar A_l\bar A_l^\top/N + \gamma_A I)^{-1}\bar A_l$
            ([`function_space_direction`][curvlib.approx.wide.function_space_direction]);
            pseudo-inverses at $\rho = 0$.
        UNIT_WISE: One block per output unit (and normalised feature),
            $\Delta\theta_o = U_o^\top(\Theta_o + \rho I)^{-1} r$ with the unit's
            kernel $\Theta_o = U_oU_o^\top$
            ([`unit_kernels`][curvlib.approx.unitwise.unit_kernels]); the
            pseudo-inverse $\Theta_o^+$ at $\rho = 0$.
    """

    EXACT = "exact"
    BLOCK_DIAGONAL = "block_diagonal"
    BLOCK_TRIDIAGONAL = "block_tridiagonal"
    KFAC = "kfac"
    UNIT_WISE = "unit_wise"


def sample_rows(stats: CurvatureStatistics) -> dict[str, LayerRows]:
    r"""The rows $U_l$ (``vec`` of $\bar W_{kn}/\sqrt N$) of every layer, from ``PER_SAMPLE_IO``.

    Row $(k, n)$ sits at index $kN + n$, the order of the residual of
    [`function_space_direction`][curvlib.approx.wide.function_space_direction].

    Raises:
        ValueError: If a layer lacks per-sample inputs and output gradients.
    """
    rows: dict[str, LayerRows] = {}
    for name, io in _per_sample_io(stats).items():
        n = io.inputs.shape[0]
        rows[name] = layer_rows(io.inputs, io.output_grads, 1.0 / math.sqrt(n))
    return rows


def _per_sample_io(stats: CurvatureStatistics) -> dict[str, PerSampleIO]:
    """Every layer's ``PER_SAMPLE_IO``, or a ``ValueError`` that names the missing layer."""
    ios: dict[str, PerSampleIO] = {}
    for name, layer in stats.layers.items():
        if layer.io is None:
            raise ValueError(
                f"The function-space step needs ['PER_SAMPLE_IO'] statistics for layer "
                f"{name!r}; create the extractor with stats={{StatKind.PER_SAMPLE_IO}}."
            )
        ios[name] = layer.io
    return ios


def _null_projector(null_space: Tensor | None, m: int, like: Tensor) -> Tensor | None:
    """The ``[m, m]`` projector onto per-sample unit null directions ``[K, N]``."""
    if null_space is None:
        return None
    if null_space.numel() != m:
        raise ValueError(
            f"null_space must have one entry per row (K * N = {m}), got {null_space.numel()}."
        )
    k, n = null_space.shape
    vecs = null_space.to(like).T  # [N, K]: sample n's direction over its K rows
    proj = torch.zeros(k, n, k, n, dtype=like.dtype, device=like.device)
    idx = torch.arange(n, device=like.device)
    proj[:, idx, :, idx] = torch.einsum("nk,nj->nkj", vecs, vecs)
    return proj.reshape(m, m)


def _shifted(kernel: Tensor, shift: Tensor | None) -> Tensor:
    return kernel if shift is None else kernel + shift


def _kernel_solve(kernel: Tensor, rhs: Tensor, damping: float, what: str) -> Tensor:
    damped = kernel + damping * torch.eye(kernel.shape[0], dtype=kernel.dtype, device=kernel.device)
    chol, info = torch.linalg.cholesky_ex((damped + damped.T) / 2)
    if int(info) != 0:
        raise FactorizationError(
            f"The {what} kernel Theta + {damping:g} I ({kernel.shape[0]}x{kernel.shape[0]}) is "
            "not positive definite to working precision: the per-sample gradients are linearly "
            "dependent (fewer parameters than rows, dead units, or a loss whose Hessian is "
            "singular without null_space=). Use damping > 0 or float64."
        )
    return torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)


def _psd_eigh(kernel: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""``eigh`` of (a batch of) PSD kernels, and which eigenvalues count as non-zero.

    Eigenvalues at or below ``n * eps * max`` of their kernel count as zero
    (``torch.linalg.pinv``'s default tolerance, ``eps`` of the kernel's dtype).
    The decomposition runs in float64 and is cast back: the kernels are
    small, and float32 ``eigh`` returns NaN for some batched kernels with many
    exact zeros (a ReLU unit's kernel has a zero row for every sample it is
    inactive on).
    """
    work = kernel.to(torch.float64)
    values, vectors = torch.linalg.eigh((work + work.mT) / 2)
    scale = values.abs().amax(dim=-1, keepdim=True)
    regular = values > kernel.shape[-1] * torch.finfo(kernel.dtype).eps * scale
    return values.to(kernel.dtype), vectors.to(kernel.dtype), regular


def _psd_inverse(kernel: Tensor, shift: float) -> Tensor:
    r"""$(K + sI)^{-1}$ of (a batch of) PSD kernels, or the pseudo-inverse $K^+$ at $s = 0$.

    One (batched) ``eigh``; at $s = 0$ the tolerance of ``_psd_eigh``.
    """
    values, vectors, regular = _psd_eigh(kernel)
    if shift > 0:
        inv = 1.0 / (values.clamp_min(0.0) + shift)
    else:
        inv = torch.where(regular, 1.0 / values, torch.zeros_like(values))
    inverse: Tensor = (vectors * inv.unsqueeze(-2)) @ vectors.mT
    return inverse


def _kfac_shifts(
    inputs: Tensor, grads: Tensor, n: int, t: int, damping: float, mode: KFACDamping
) -> tuple[float, float]:
    r"""``(gamma_A, gamma_G)`` of the factored modes, from the rows alone.

    $\operatorname{tr}A = \lVert\bar A\rVert_F^2/N$ and $\operatorname{tr}G =
    \lVert\Gamma\rVert_F^2/NT$ (the kernels' traces equal the factors'), so
    KFAC's trace-norm $\pi$ needs no $d\times d$ factor.
    """
    if mode is KFACDamping.SQRT:
        return math.sqrt(damping), math.sqrt(damping)
    mean_a = float(inputs.square().sum()) / n / inputs.shape[-1]
    mean_g = float(grads.square().sum()) / (n * t) / grads.shape[-1]
    return pi_split_of_means(mean_a, mean_g, damping)


def _kfac_direction(io: PerSampleIO, coeffs: Tensor, damping: float, mode: KFACDamping) -> Tensor:
    r"""One layer's K-FAC step, damped as ``mode``, in samples.

    $\bar A$ ``[NT, in]`` and $\Gamma$ ``[KNT, out]`` are the stored rows; $A =
    \bar A^\top\bar A/N$, $G = \Gamma^\top\Gamma/NT$ and $\nabla W = \Gamma^\top C\bar A$
    with $C_{knt, n't'} = c_{kn}\delta_{nn'}\delta_{tt'}$. ``PI``, ``SQRT``:
    $(G + \gamma_G I)^{-1}\nabla W(A + \gamma_A I)^{-1}$, push-through on both
    sides. ``EIGEN``: $(G\otimes A + \rho I)^{-1}\nabla W = \Gamma^\top Y\bar A$ with
    $K_G Y K_A + \rho Y = C$ for the kernels $K_G = \Gamma\Gamma^\top/NT$, $K_A =
    \bar A\bar A^\top/N$, solved in their eigenbases.
    """
    k, n, t, d_out = io.output_grads.shape
    inputs = io.inputs.reshape(n * t, -1)
    grads = io.output_grads.reshape(k * n * t, d_out)
    kernel_a, kernel_g = inputs @ inputs.T / n, grads @ grads.T / (n * t)
    if mode is KFACDamping.EIGEN:
        values_a, vectors_a, regular_a = _psd_eigh(kernel_a)
        values_g, vectors_g, regular_g = _psd_eigh(kernel_g)
        right = coeffs[:, :, None, None] * vectors_a.reshape(1, n, t, n * t)  # C Q_A
        rotated = vectors_g.T @ right.reshape(k * n * t, n * t)
        products = values_g.clamp_min(0.0)[:, None] * values_a.clamp_min(0.0)[None, :]
        if damping > 0:
            scale = 1.0 / (products + damping)
        else:
            keep = regular_g[:, None] & regular_a[None, :]
            scale = torch.where(keep, 1.0 / products, torch.zeros_like(products))
        middle = vectors_g @ (rotated * scale) @ vectors_a.T
        return grads.T @ middle @ inputs
    shift_a, shift_g = _kfac_shifts(inputs, grads, n, t, damping, mode)
    inv_a = _psd_inverse(kernel_a, shift_a)  # [NT, NT]
    inv_g = _psd_inverse(kernel_g, shift_g)  # [KNT, KNT]
    right = coeffs[:, :, None, None] * inv_a.reshape(1, n, t, n * t)
    middle = inv_g @ right.reshape(k * n * t, n * t)
    return grads.T @ middle @ inputs


def _check_residual(residual: Tensor, m: int) -> None:
    if residual.numel() != m:
        raise ValueError(f"residual must have K * N = {m} entries, got {residual.numel()}.")


def _kfac_directions(
    stats: CurvatureStatistics, residual: Tensor, damping: float, mode: KFACDamping
) -> dict[str, Tensor]:
    """The ``KFAC`` form of every layer."""
    out: dict[str, Tensor] = {}
    for name, io in _per_sample_io(stats).items():
        k, n = io.output_grads.shape[:2]
        _check_residual(residual, k * n)
        coeffs = residual.reshape(k, n).to(io.inputs) / math.sqrt(n)
        out[name] = _kfac_direction(io, coeffs, damping, mode)
    return out


def _unit_wise_directions(
    stats: CurvatureStatistics, residual: Tensor, damping: float
) -> dict[str, Tensor]:
    r"""The ``UNIT_WISE`` form, $U_o^\top(\Theta_o + \rho I)^{-1}r$ for each unit of each layer."""
    out: dict[str, Tensor] = {}
    for name, layer in stats.layers.items():
        kernels = unit_kernels(layer)  # [out, KN, KN]
        _check_residual(residual, kernels.shape[-1])
        r = residual.reshape(-1).to(kernels)
        coeffs = _psd_inverse(kernels, damping) @ r  # [out, KN]
        out[name] = unit_expand(layer, coeffs)
    return out


def function_space_direction(
    stats: CurvatureStatistics,
    residual: Tensor,
    damping: float = 0.0,
    form: FunctionSpaceForm | str = FunctionSpaceForm.EXACT,
    null_space: Tensor | None = None,
    *,
    kfac_damping: KFACDamping | str | None = None,
) -> dict[str, Tensor]:
    r"""The natural-gradient direction in function space.

    $$\Delta\theta = U^\top(\Theta + \rho I)^{-1} r, \qquad \Theta = UU^\top.$$

    With the rows $U$ of ``EXACT`` statistics ([`sample_rows`][curvlib.approx.wide.sample_rows])
    and the residual $r$ with $U^\top r = g$, the gradient of the batch loss
    ([`sample_space_residual`][curvlib.extract.residual.sample_space_residual]
    computes it), the push-through identity
    $(U^\top U + \rho I)^{-1}U^\top = U^\top(UU^\top + \rho I)^{-1}$ makes the
    result equal to $(F + \rho I)^{-1}g$ for $\rho > 0$ (and to the
    block-diagonal and block-tridiagonal solves for the other ``form``\ s), and
    at $\rho = 0$ to the minimum-norm solution $F^+ g$, wherever the
    $m\times m$ kernels are non-singular. The parameter-space solves need
    $\rho > 0$.

    ``null_space`` handles losses whose Hessian factor is singular
    (``CrossEntropyLoss``: the $C$ columns of a sample satisfy
    $\sum_i\sqrt{p_i}\,s_i = 0$, so $\Theta$ is singular); its projector $\Pi$ is
    added to every kernel, which changes nothing for a residual orthogonal to it
    and makes the kernels regular.

    ``KFAC`` inverts K-FAC's layer blocks $G_l\otimes A_l$ of this batch
    ($A = \bar A^\top\bar A/N$, $G = \Gamma^\top\Gamma/NT$ with the rows $\bar a_{nt}$
    of $\bar A$ and $g_{knt}$ of $\Gamma$) instead. The batch gradient is
    $\nabla W_l = \Gamma^\top C\bar A$ with $C_{knt,n't'} = \frac{r_{kn}}{\sqrt N}
    \delta_{nn'}\delta_{tt'}$, and pushing the damped inverses through both sides,

    $$\Delta\theta_l = (G + \gamma_G I)^{-1}\nabla W_l(A + \gamma_A I)^{-1} =
    \Gamma^\top\big(\tfrac{\Gamma\Gamma^\top}{NT} + \gamma_G I\big)^{-1} C
    \big(\tfrac{\bar A\bar A^\top}{N} + \gamma_A I\big)^{-1}\bar A ,$$

    which equals [`KFAC`][curvlib.approx.kfac.KFAC] with
    ``damping_mode=kfac_damping`` and damping $\rho$ on the same batch:
    ``KFACDamping.PI`` (the default, as ``KFAC()``'s) splits
    $\gamma_A = \pi\sqrt\rho$, $\gamma_G = \sqrt\rho/\pi$ with the trace-norm
    $\pi$, and the factors' traces are the kernels' ($\operatorname{tr}A =
    \lVert\bar A\rVert_F^2/N$, $\operatorname{tr}G = \lVert\Gamma\rVert_F^2/NT$);
    ``SQRT`` puts $\sqrt\rho$ on each factor; ``EIGEN`` damps exactly,
    $(G\otimes A + \rho I)^{-1}\nabla W_l = \Gamma^\top Y\bar A$ with
    $K_GYK_A + \rho Y = C$ for the two kernels $K_G$, $K_A$, solved in their
    eigenbases. At $\rho = 0$ all three are $G^+\nabla W_l A^+$ through the
    kernels' pseudo-inverses (``eigh``, ``pinv``'s tolerance), the paper's
    setting: kernels of size $NT$ and $KNT$ that the wide layers'
    $d_\text{in}\times d_\text{in}$ and $d_\text{out}\times d_\text{out}$
    factors never need to form. ``null_space`` is not used (the
    pseudo-inverses handle singular kernels).

    ``UNIT_WISE`` keeps one block per output unit $o$ (the row $o$ of
    $[W\mid b]$; per normalised feature for normalisation layers) and solves
    each in its own $KN\times KN$ kernel $\Theta_o = U_oU_o^\top$
    ([`unit_kernels`][curvlib.approx.unitwise.unit_kernels]):
    $\Delta\theta_o = U_o^\top(\Theta_o + \rho I)^{-1}r$, equal to
    [`UnitWiseNaturalGradient`][curvlib.approx.unitwise.UnitWiseNaturalGradient]'s
    $(F_o + \rho I)^{-1}g_o$ on the same batch for $\rho > 0$ and to the
    minimum-norm $F_o^+ g_o$ at $\rho = 0$ (pseudo-inverses: a ReLU unit's
    kernel has a zero row for every sample it is inactive on). No
    $d_\text{in}\times d_\text{in}$ block is formed, which is what makes it
    possible on a wide layer.

    Cost: the kernels $O(m^2 P)$, a Cholesky factorisation $O(m^3)$ (per layer
    for ``BLOCK_DIAGONAL``, an $Lm\times Lm$ LU for ``BLOCK_TRIDIAGONAL``), and two
    products with $U$, $O(mP)$; ``KFAC`` per layer the two kernels
    $O(N^2T^2 d_\text{in} + K^2N^2T^2 d_\text{out})$, two ``eigh`` $O(N^3T^3 +
    K^3N^3T^3)$ and the products $O(KN^2T^2(KNT + d_\text{out}) + NT
    d_\text{out}d_\text{in})$ (``EIGEN``: the same with two ``eigh``);
    ``UNIT_WISE`` per layer the kernels $O(d_\text{out}K^2N^2)$ (from
    per-sample gradients for several positions), $d_\text{out}$ ``eigh`` of
    size $KN$, $O(d_\text{out}K^3N^3)$, and $O(KNd_\text{out}d_\text{in})$ for
    the step. Float64 is advised at $\rho = 0$: $\Theta$'s
    condition number enters squared into float32 rounding (see the wide-network
    page of the documentation).

    Args:
        stats: ``PER_SAMPLE_IO`` statistics with ``FisherType.EXACT``.
        residual: $r$, ``[K, N]`` (or flat ``[K * N]``).
        damping: $\rho \ge 0$.
        form: Which Fisher to invert.
        null_space: Unit vectors ``[K, N]``, per sample, spanning a known common
            null space of the kernels, or ``None``.
        kfac_damping: How ``KFAC`` damps its factors
            ([`KFACDamping`][curvlib.approx.kfac.KFACDamping]; default ``PI``).
            Only for ``form=KFAC``.

    Returns:
        $\Delta\theta$ as ``[out, in_aug]`` matrices, keyed by layer; the step is
        $\theta \leftarrow \theta - \eta\,\Delta\theta$.

    Raises:
        ValueError: For statistics that are not ``EXACT``, a residual of the wrong
            size, a negative damping, or ``kfac_damping`` with another form.
        FactorizationError: If a kernel is singular to working precision.
    """
    if stats.fisher_type is not FisherType.EXACT:
        raise ValueError(
            "The function-space step needs the exact factorisation of the loss Hessian: "
            f"create the extractor with fisher_type=FisherType.EXACT (got {stats.fisher_type})."
        )
    if not 0.0 <= damping < math.inf:
        raise ValueError(f"damping must be non-negative and finite, got {damping!r}.")
    form = FunctionSpaceForm(form)
    if kfac_damping is not None and form is not FunctionSpaceForm.KFAC:
        raise ValueError(
            f"kfac_damping applies to form=FunctionSpaceForm.KFAC only (got form={form}); "
            "leave it unset for the other forms, whose damping is exact."
        )
    if form is FunctionSpaceForm.KFAC:
        mode = KFACDamping.PI if kfac_damping is None else KFACDamping(kfac_damping)
        return _kfac_directions(stats, residual, damping, mode)
    if form is FunctionSpaceForm.UNIT_WISE:
        return _unit_wise_directions(stats, residual, damping)
    rows = sample_rows(stats)
    blocks = list(rows.values())
    m = blocks[0].num_rows
    _check_residual(residual, m)
    r = residual.reshape(m).to(dtype=blocks[0].dtype, device=blocks[0].device)
    shift = _null_projector(null_space, m, r)
    if form is FunctionSpaceForm.BLOCK_TRIDIAGONAL:
        system = TridiagonalKernel(blocks, damping, kernel_shift=shift)
        coeffs = system.solve(r.expand(len(blocks), m))
        return {name: b.expand(coeffs[i]) for i, (name, b) in enumerate(rows.items())}
    kernels = [b.gram() for b in blocks]
    if form is FunctionSpaceForm.BLOCK_DIAGONAL:
        return {
            name: b.expand(_kernel_solve(_shifted(k, shift), r, damping, f"layer {name!r}"))
            for (name, b), k in zip(rows.items(), kernels, strict=True)
        }
    total = kernels[0]
    for k in kernels[1:]:
        total = total + k
    coeffs = _kernel_solve(_shifted(total, shift), r, damping, "network")
    return {name: b.expand(coeffs) for name, b in rows.items()}
