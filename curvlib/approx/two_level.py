r"""Two-level preconditioners: a coarse-space correction on top of any approximation.

The fine level is any [`CurvatureApprox`][curvlib.core.protocols.CurvatureApprox]
(KFAC, KPSVD, EKFAC, Deflation, the diagonal, ...), whose damped inverse gives
the fine step $\zeta = (C + \lambda I)^{-1}\nabla$. A
[coarse space][curvlib.approx.coarse] contributes a few vectors per layer,
the rows of $R_0 \in \mathbb{R}^{c \times P}$, and the small matrix

$$F_c = R_0 (F + \lambda I) R_0^\top \in \mathbb{R}^{c \times c}$$

of the *whole network's* Fisher $F$, cross-layer blocks included, built from
per-sample statistics without forming $F$
([`curvlib.approx.coarse_fisher`][curvlib.approx.coarse_fisher]). Two forms
combine the levels ([`CorrectionForm`][curvlib.approx.two_level.CorrectionForm]):
the residual (F-norm optimal) correction and the additive preconditioner.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from curvlib.approx.base import (
    DEFAULT_DECAY,
    NonFiniteStatisticsError,
    check_damping,
)
from curvlib.approx.coarse import CoarseContext, CoarseSpace, Nicolaides
from curvlib.approx.coarse_fisher import (
    CoarseFisher,
    RestrictedFisher,
    SampleFisher,
    SampleProjection,
)
from curvlib.approx.natural_gradient import _cast_io
from curvlib.core.layout import CurvatureLayer
from curvlib.core.protocols import CurvatureApprox, Preconditioner, RefreshableApprox
from curvlib.core.stats import CurvatureStatistics, PerSampleIO, StatKind
from curvlib.linalg.factors import eigh

FLUSH_EVERY = 16
"""Updates between two flushes of a fixed space's averaged rows of $R_0 F$ (see
[`RestrictedFisher.flushed`][curvlib.approx.coarse_fisher.RestrictedFisher.flushed]):
entries below ``finfo.tiny / max(decay, 0.5) ** FLUSH_EVERY`` are zeroed, so
an entry decaying at the rate ``decay`` never turns subnormal in between."""


class CorrectionForm(Enum):
    r"""How the coarse level is combined with the fine step $\zeta = (C + \lambda I)^{-1}\nabla$.

    With $F_\lambda = F + \lambda I$ and $F_c = R_0 F_\lambda R_0^\top$:

    Attributes:
        RESIDUAL: $\zeta + R_0^\top F_c^{+} R_0(\nabla - F_\lambda\zeta)$: of all
            $\zeta + R_0^\top\beta$ the one closest to the exact damped natural
            gradient $F_\lambda^{-1}\nabla$ in the $F_\lambda$-norm, so never
            further from it than $\zeta$. Costs one product $U\zeta$ with the
            stored statistics per step ($O(mTP)$).
        ADDITIVE: $(C + \lambda I)^{-1}\nabla + R_0^\top F_c^{+} R_0\nabla$, the
            additive two-level preconditioner of domain decomposition: symmetric
            positive definite, and per step only $c$ inner products.
    """

    RESIDUAL = "residual"
    ADDITIVE = "additive"


DEFAULT_MAX_CONDITION = 1e3
r"""Default bound $\kappa$ on the condition number of the coarse system that is solved
(see [`TwoLevel`][curvlib.approx.two_level.TwoLevel], ``max_condition``)."""

DEFAULT_MAX_CORRECTION = 0.5
r"""Default bound $\tau$ on the coarse correction's size relative to the fine step
(see [`TwoLevel`][curvlib.approx.two_level.TwoLevel], ``max_correction``)."""


@dataclass(frozen=True)
class _CoarseSolve:
    r"""The guarded solve of the coarse system $F_c$.

    Attributes:
        inverse: $(F_c + \delta I)^{+}$ on the range of $F_c$ (zero when the
            correction is dropped).
        condition: The condition number of $F_c$ itself on its range
            (``inf`` when $F_c$ has NaN/Inf entries).
        damping: The coarse damping $\delta \ge 0$ the guard added (``inf``
            when the correction is dropped).
    """

    inverse: Tensor
    condition: float
    damping: float


def _coarse_solve(matrix: Tensor, max_condition: float) -> _CoarseSolve:
    r"""$(M + \delta I)^{+}$ of a small PSD matrix, $\delta$ the least that bounds its condition.

    Eigenvalues $s_i$ below $c\,\varepsilon\,s_\max$ (coarse vectors that are
    linearly dependent, or zero) are dropped. On the range, with $s_\min$ the
    smallest kept eigenvalue and $\kappa$ = ``max_condition``,
    $\delta = \max\bigl(0, (s_\max - \kappa s_\min)/(\kappa - 1)\bigr)$, so that
    $(s_\max + \delta)/(s_\min + \delta) \le \kappa$ (equality when active).
    A matrix with NaN/Inf entries drops the coarse correction (zero inverse).
    """
    size = matrix.shape[0]
    if size == 0:
        return _CoarseSolve(matrix, 1.0, 0.0)
    if not bool(torch.isfinite(matrix).all()):
        return _CoarseSolve(torch.zeros_like(matrix), math.inf, math.inf)
    dec = eigh(matrix)
    top = float(dec.values[-1])
    if top <= 0.0:
        return _CoarseSolve(torch.zeros_like(matrix), 1.0, 0.0)
    keep = dec.values > 10.0 * size * torch.finfo(matrix.dtype).eps * top
    vecs, vals = dec.vectors[:, keep], dec.values[keep]
    bottom = float(vals[0])
    damping = max(0.0, (top - max_condition * bottom) / (max_condition - 1.0))
    return _CoarseSolve((vecs / (vals + damping)) @ vecs.T, top / bottom, damping)


def _size_limit(
    beta: Tensor,
    matrix: Tensor,
    grads: Mapping[str, Tensor],
    zeta: Mapping[str, Tensor],
    max_correction: float,
) -> Tensor:
    r"""Factors $s \in [0, 1]$ per direction: $s^2\beta^\top F_c\beta \le \tau^2\nabla^\top\zeta$.

    $\beta^\top F_c\beta$ is the squared $F_\lambda$-norm of the correction
    $R_0^\top\beta$, $\nabla^\top\zeta$ that of the fine step in the fine
    level's own norm, $\|\zeta\|^2_{C + \lambda I}$; $\tau$ = ``max_correction``.
    Where either is NaN/Inf or the fine step's is not positive while the
    correction's is, the factor is 0 (the fine step alone).
    """
    fine = sum(
        torch.linalg.vecdot(grads[name].to(z.dtype).flatten(-2), z.flatten(-2)).to(beta.dtype)
        for name, z in zeta.items()
    )
    coarse = ((beta @ matrix.to(beta.dtype)) * beta).sum(-1)
    fine = torch.as_tensor(fine, dtype=beta.dtype, device=beta.device)
    # Lengths, not squares: no product with max_correction can overflow.
    ratio = max_correction * (fine.clamp_min(0.0) / coarse).sqrt()
    scale = torch.where(coarse > 0.0, ratio.clamp(max=1.0), 1.0)
    finite = torch.isfinite(coarse) & torch.isfinite(fine)
    return torch.where(finite, scale, 0.0)


def _check_guard(max_condition: float, max_correction: float) -> tuple[float, float]:
    """The safeguard's parameters as floats.

    Raises:
        ValueError: Unless ``max_condition`` is a finite number above 1 and
            ``max_correction`` a finite positive number.
    """

    def finite_number(value: float) -> bool:
        return (
            not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
        )

    if not finite_number(max_condition) or max_condition <= 1.0:
        raise ValueError(
            "max_condition bounds the condition number of the coarse system and must be a "
            f"finite number above 1 (default {DEFAULT_MAX_CONDITION:g}), got {max_condition!r}."
        )
    if not finite_number(max_correction) or max_correction <= 0.0:
        raise ValueError(
            "max_correction bounds the coarse correction's size relative to the fine step and "
            f"must be a finite positive number (default {DEFAULT_MAX_CORRECTION:g}), got "
            f"{max_correction!r}."
        )
    return float(max_condition), float(max_correction)


def _check_max_samples(
    max_samples: int | Literal["auto"] | None,
) -> int | Literal["auto"] | None:
    """``max_samples`` checked: a positive int, ``"auto"``, or ``None`` for every sample.

    Raises:
        ValueError: Otherwise.
    """
    if max_samples is None or max_samples == "auto":
        return max_samples
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(
            "max_samples is the number of samples of each statistics batch the coarse "
            "Fisher is built from and must be a positive int, 'auto' (the default: the "
            f"coarse space's auto_samples, {CoarseSpace.auto_samples} but for Spectral) or None "
            f"for all, got {max_samples!r}."
        )
    return max_samples


def _first_samples(io: PerSampleIO, limit: int | None) -> PerSampleIO:
    """The first ``limit`` samples of ``io`` (all of them when ``limit`` is ``None``), views."""
    if limit is None or io.inputs.shape[0] <= limit:
        return io
    return PerSampleIO(inputs=io.inputs[:limit], output_grads=io.output_grads[:, :limit])


def _flat(vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each layer's vectors as the rows of a ``[c_l, out * in]`` matrix."""
    return {name: vecs.flatten(1) for name, vecs in vectors.items()}


def _inner(flat: Mapping[str, Tensor], x: Mapping[str, Tensor]) -> Tensor:
    r"""$R_0 x$, ``[..., c]``, from ``[c_l, P_l]`` rows and ``x`` ``[..., out, in]`` (GEMVs)."""
    return torch.cat(
        [x[name].to(rows.dtype).flatten(-2) @ rows.T for name, rows in flat.items()], dim=-1
    )


def _add_expanded(
    zeta: Mapping[str, Tensor], flat: Mapping[str, Tensor], coeffs: Tensor
) -> dict[str, Tensor]:
    r"""$\zeta + R_0^\top\beta$ per layer for ``coeffs`` $\beta$ ``[..., c]`` (one fused GEMM)."""
    out: dict[str, Tensor] = {}
    start = 0
    for name, rows in flat.items():
        stop = start + rows.shape[0]
        z = zeta[name]
        if stop == start:
            out[name] = z
            continue
        beta = coeffs[..., start:stop].reshape(-1, stop - start).to(z.dtype)
        added = torch.addmm(z.reshape(-1, rows.shape[1]), beta, rows.to(z.dtype))
        out[name] = added.reshape(z.shape)
        start = stop
    return out


def _identity_gram(flat: Mapping[str, Tensor]) -> Tensor:
    r"""$R_0 R_0^\top$: block diagonal over layers (vectors of different layers are orthogonal)."""
    gram: Tensor = torch.block_diag(*[v @ v.T for v in flat.values()])  # type: ignore[no-untyped-call]
    return gram


def _complete(vectors: Mapping[str, Tensor], context: CoarseContext) -> dict[str, Tensor]:
    """Vectors for every layer, in the layer order (no vectors: ``[0, out, in]``)."""
    return {
        name: vectors[name]
        if name in vectors
        else torch.zeros(0, *shape, dtype=context.dtype, device=context.device)
        for name, shape in context.shapes.items()
    }


class TwoLevelPreconditioner:
    r"""The two-level operator: the fine inverse plus the coarse correction.

    Returned by [`TwoLevel.inverse`][curvlib.approx.two_level.TwoLevel.inverse].
    ``apply`` maps gradients to directions; ``diagnostics`` holds, after each
    unbatched ``apply``, ``coarse_error_change`` (the change of the squared
    $F_\lambda$-norm distance to $F_\lambda^{-1}\nabla$ made by the correction,
    $\beta^\top F_c\beta - 2\beta^\top R_0(\nabla - F_\lambda\zeta)$, when the
    residual is computed), ``coarse_condition`` (condition number of $F_c$ on
    its range), ``coarse_damping`` ($\delta$ of the safeguard),
    ``coarse_scale`` (its factor $s$ of the correction) and ``coarse_size``
    ($c$); see [`TwoLevel`][curvlib.approx.two_level.TwoLevel], **Safeguard**.
    The two numbers of each ``apply``, ``coarse_error_change`` and
    ``coarse_scale``, are 0-dimensional tensors on the device, so that
    applying never waits for it; ``float(...)`` reads them (the optimizer's
    ``last_stats["diagnostics"]`` does so when first looked at).

    Args:
        fine: The fine level's damped inverse.
        context: Layer shapes, dtype, device and the fine inverse.
        damping: $\lambda$.
        form: The correction form.
        space: The coarse space (used per step if it depends on the gradient).
        fisher: The Fisher model of the coarse level.
        vectors: Fixed coarse vectors (``None`` for gradient-dependent spaces).
        restricted: ``fisher`` restricted to ``vectors``: its ``gram``, and
            ``project`` for $R_0 F x$ when the residual is computed (the stored
            rows of $R_0 F$, or a
            [`SampleProjection`][curvlib.approx.coarse_fisher.SampleProjection]).
        report_error: Compute the error change in the additive form too (one
            product with the rows of $R_0 F$ per step).
        max_condition: The bound $\kappa$ of the coarse system's condition number.
        max_correction: The bound $\tau$ of the correction's size relative to the
            fine step.
    """

    def __init__(
        self,
        fine: Preconditioner,
        context: CoarseContext,
        damping: float,
        form: CorrectionForm,
        space: CoarseSpace,
        fisher: CoarseFisher | None,
        vectors: Mapping[str, Tensor] | None,
        restricted: RestrictedFisher | SampleProjection | None,
        report_error: bool,
        max_condition: float = DEFAULT_MAX_CONDITION,
        max_correction: float = DEFAULT_MAX_CORRECTION,
    ) -> None:
        self.fine = fine
        self.max_condition, self.max_correction = _check_guard(max_condition, max_correction)
        self._context = context
        self.damping = damping
        self.form = form
        self._space = space
        self._fisher = fisher
        self._residual = report_error or form is CorrectionForm.RESIDUAL
        self.diagnostics: dict[str, float | Tensor] = {}
        fine_conditions = getattr(fine, "condition_numbers", None)
        self.condition_numbers: dict[str, float] = (
            dict(fine_conditions) if isinstance(fine_conditions, Mapping) else {}
        )
        """The fine inverse's condition estimates per layer (the coarse one: ``diagnostics``)."""
        self._flat: dict[str, Tensor] | None = None
        self._restricted: RestrictedFisher | SampleProjection | None = None
        if vectors is not None:
            assert restricted is not None
            self._set_space(vectors, restricted.gram)
            if self._residual:
                assert not isinstance(restricted, RestrictedFisher) or restricted.rows is not None
                self._restricted = restricted
            self.diagnostics = self._coarse_diagnostics()

    def _coarse_diagnostics(self) -> dict[str, float | Tensor]:
        solve = self._coarse
        return {
            "coarse_condition": solve.condition,
            "coarse_damping": solve.damping,
            "coarse_size": self._size,
        }

    def _set_space(self, vectors: Mapping[str, Tensor], gram: Tensor) -> None:
        self._flat = _flat(vectors)
        self._matrix = gram + self.damping * _identity_gram(self._flat).to(gram.dtype)
        self._coarse = _coarse_solve(self._matrix, self.max_condition)
        self._size = float(self._matrix.shape[0])

    @property
    def _flat_rows(self) -> dict[str, Tensor]:
        assert self._flat is not None
        return self._flat

    @property
    def layers(self) -> tuple[str, ...]:
        """The layers this operator acts on, in the vectorisation order."""
        return tuple(self._context.shapes)

    def apply(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        r"""The two-level direction for gradients ``[..., out, in]`` of every layer.

        Per step, for vectors fixed since ``inverse``: $R_0\nabla$ and, for
        the residual, $R_0\zeta$ and $R_0 F\zeta$ (a fixed space: from the
        stored rows of $R_0 F$, one GEMV per layer each, $O(cP)$; a moving one:
        $P\,(U\zeta)$ from the stored samples, $O(mP)$), and one fused
        $\zeta + R_0^\top\beta$.

        Raises:
            KeyError: If a layer is missing.
            ValueError: For batched gradients with a gradient-dependent coarse space.
        """
        return self._direction(grads, limit=True)

    def _direction(self, grads: Mapping[str, Tensor], limit: bool) -> dict[str, Tensor]:
        """``apply``, with the correction's size limit (``limit``) or without it."""
        missing = [name for name in self.layers if name not in grads]
        if missing:
            raise KeyError(
                f"The coarse level couples all layers {list(self.layers)}: pass a matrix for "
                f"each (missing {missing})."
            )
        zeta = self.fine.apply(grads)
        batched = next(iter(grads.values())).dim() > 2
        projection: SampleProjection | None = None
        if self._space.gradient_dependent:
            if batched:
                raise ValueError(
                    f"{type(self._space).__name__} builds its vectors from one gradient: apply "
                    "it to unbatched [out, in] matrices."
                )
            projection = self._build_from_residual(grads, zeta)
        flat = self._flat_rows
        rg = _inner(flat, grads)
        res: Tensor | None = None
        fz: Tensor | None = None
        if projection is not None:
            fz = projection.project(zeta)
        elif self._restricted is not None:
            fz = self._restricted.project(zeta)
        if fz is not None:
            res = rg - fz - self.damping * _inner(flat, zeta)
        rhs = res if self.form is CorrectionForm.RESIDUAL else rg
        assert rhs is not None
        beta = rhs @ self._coarse.inverse
        scale = _size_limit(beta, self._matrix, grads, zeta, self.max_correction) if limit else None
        if scale is not None:
            beta = beta * scale[..., None]
        if not batched:
            self.diagnostics = self._coarse_diagnostics()
            self.diagnostics["coarse_scale"] = 1.0 if scale is None else scale.detach()
            if res is not None:
                change = beta @ self._matrix @ beta - 2.0 * (beta @ res)
                self.diagnostics["coarse_error_change"] = change.detach()
        return _add_expanded(zeta, flat, beta)

    def _build_from_residual(
        self, grads: Mapping[str, Tensor], zeta: Mapping[str, Tensor]
    ) -> SampleProjection:
        fisher = self._fisher
        assert isinstance(fisher, SampleFisher)
        fz = fisher.matvec(zeta)
        residual = {
            name: grads[name] - self.damping * zeta[name] - fz[name].to(zeta[name].dtype)
            for name in self.layers
        }
        context = CoarseContext(
            self._context.shapes,
            self._context.dtype,
            self._context.device,
            fine=self.fine,
            residual=residual,
        )
        vectors = _complete(self._space.vectors(context), context)
        projection = fisher.projection(vectors)
        self._set_space(vectors, projection.gram)
        return projection

    def matvec(self, vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The same as ``apply``: this operator *is* the preconditioner."""
        return self.apply(vectors)

    def to_dense_full(self) -> Tensor:
        r"""The whole preconditioner as a ``[P, P]`` matrix, layers in the order of ``layers``.

        $P$ applications (small nets and tests), without the safeguard's size
        bound, which scales each direction on its own (the condition bound is
        linear and included).

        Raises:
            ValueError: For a gradient-dependent coarse space (the map is not linear).
        """
        if self._space.gradient_dependent:
            raise ValueError(
                f"With {type(self._space).__name__} the two-level map depends on the gradient "
                "and has no matrix."
            )
        ctx = self._context
        columns = []
        for layer, (out_dim, in_dim) in ctx.shapes.items():
            size = out_dim * in_dim
            basis = {
                name: torch.zeros(size, *shape, dtype=ctx.dtype, device=ctx.device)
                for name, shape in ctx.shapes.items()
            }
            basis[layer] = torch.eye(size, dtype=ctx.dtype, device=ctx.device).reshape(
                size, out_dim, in_dim
            )
            applied = self._direction(basis, limit=False)
            columns.append(torch.cat([applied[n].reshape(size, -1) for n in ctx.shapes], dim=1))
        return torch.cat(columns, dim=0).T

    def to_dense(self, layer: str) -> Tensor:
        """The diagonal block of one layer of ``to_dense_full()`` (the levels couple layers).

        Raises:
            KeyError: If the layer is unknown.
        """
        if layer not in self._context.shapes:
            raise KeyError(f"Unknown layer {layer!r}; the layers are {list(self.layers)}.")
        start = 0
        for name, (out_dim, in_dim) in self._context.shapes.items():
            if name == layer:
                size = out_dim * in_dim
                return self.to_dense_full()[start : start + size, start : start + size]
            start += out_dim * in_dim
        raise AssertionError  # unreachable


class TwoLevel:
    r"""A coarse-space correction on top of any approximation (two-level preconditioning).

    With the fine step $\zeta = (C + \lambda I)^{-1}\nabla$ of the fine
    approximation $C$ (its own damping rule), the coarse vectors $R_0$ of
    ``coarse`` and $F_c = R_0 (F + \lambda I) R_0^\top$, the direction is

    $$\zeta + R_0^\top F_c^{+} R_0 (\nabla - (F + \lambda I)\zeta)
    \quad\text{(residual)}, \qquad
    \zeta + R_0^\top F_c^{+} R_0 \nabla \quad\text{(additive)}.$$

    $F$ is the whole network's Fisher, cross-layer blocks included, from the
    per-sample statistics of the statistics steps
    ([`SampleFisher`][curvlib.approx.coarse_fisher.SampleFisher]), or the
    coarse space's own model
    ([`Tselepidis`][curvlib.approx.coarse.Tselepidis]: cross-layer Kronecker
    factors). $F_c^{+}$ is the pseudo-inverse of the $c \times c$ matrix (an
    eigendecomposition; linearly dependent vectors are harmless).

    **One Fisher for both terms.** The coarse matrix $R_0 F R_0^\top$ and the
    residual's $R_0 F\zeta$ always come from the same $F$, so the residual
    form is the $F_\lambda$-optimal correction of $\zeta$ and never moves
    away from $F_\lambda^{-1}\nabla$ in that norm. For a space whose vectors
    never change ([`Nicolaides`][curvlib.approx.coarse.Nicolaides],
    [`Tselepidis`][curvlib.approx.coarse.Tselepidis] and
    [`FixedSpace`][curvlib.approx.coarse.FixedSpace] without Krylov
    enrichment) that $F$ is the running average $\bar F$ of the statistics
    steps' Fishers ($\rho_k = \min(1 - 1/k, \text{decay})$, like the fine
    level): ``update`` restricts the batch's Fisher to the vectors,
    $R_0 F_k R_0^\top$ and the rows $R_0 F_k$
    ([`RestrictedFisher`][curvlib.approx.coarse_fisher.RestrictedFisher]),
    and averages both. Spaces whose vectors move with the fine level
    (spectral, Krylov-enriched) restrict the latest batch's Fisher when
    ``inverse`` runs (an average of restrictions to different vectors would
    estimate nothing); [`ResidualSpace`][curvlib.approx.coarse.ResidualSpace]
    restricts it on every step.

    **Safeguard.** The coarse system comes from few samples and a small
    $\lambda$, and its solve can be much longer than the fine step in
    directions where the batch's Fisher is near zero; the optimizer's KL clip
    then shrinks the whole step and the coarse part dominates it. Two bounds
    keep the correction in proportion, and neither can switch itself off:

    1. *Condition*: $F_c$ is solved as $F_c + \delta I$ with the least
       $\delta \ge 0$ for which its condition number (on its range, with
       eigenvalues $s_\max \ge s_\min$) is at most $\kappa$ =
       ``max_condition``: $\delta = \max(0, (s_\max - \kappa s_\min)/(\kappa - 1))$.
       For unit, mutually orthogonal vectors (every space without Krylov
       enrichment) that is a damping $\lambda + \delta$ on the coarse level.
    2. *Size*: the correction $R_0^\top\beta$ is scaled by the largest
       $s \le 1$ with $s\,\|R_0^\top\beta\|_{F_\lambda} \le \tau\,
       \|\zeta\|_{C + \lambda I}$, $\tau$ = ``max_correction``
       ($\|R_0^\top\beta\|^2_{F_\lambda} = \beta^\top F_c\beta$,
       $\|\zeta\|^2_{C + \lambda I} = \nabla^\top\zeta$: $O(c^2 + P)$ per step).

    Both keep the residual form from moving away from $F_\lambda^{-1}\nabla$
    (``coarse_error_change`` stays $\le 0$) and the additive form a descent
    direction. A coarse matrix or step with NaN/Inf entries drops the
    correction (the fine step alone). The diagnostics report $\delta$
    (``coarse_damping``) and $s$ (``coarse_scale``); with $\delta = 0$ and
    $s = 1$ the correction is the exact one above. ``to_dense_full`` is the
    operator without the size bound, which depends on the gradient.

    **Operator.** ``inverse(damping)`` returns a
    [`TwoLevelPreconditioner`][curvlib.approx.two_level.TwoLevelPreconditioner]
    (``apply``, ``to_dense_full``); ``matvec`` and ``to_dense`` are the fine
    level's $C$ (the coarse level changes the solve, not the curvature model).

    **Cost** on top of the fine level, with $c$ vectors, $m$ statistics rows and
    $P$ parameters: ``update`` keeps the batch and, for fixed spaces, builds
    the rows of $R_0 F$ ($O(cmP)$; $O(cP)$ for ``Tselepidis``); ``inverse``
    the projections $P$ of a moving space's vectors on the samples
    ($O(m\bar P)$), and an $O(c^3)$ eigendecomposition; ``apply`` one GEMV
    per layer for $R_0\nabla$, one fused $\zeta + R_0^\top\beta$ and, in the
    residual form, $R_0F_\lambda\zeta$: $O(cP)$ with a fixed space's rows,
    $O(mP)$ as $P\,(U\zeta)$ for a moving space, whose vectors serve
    ``t_inv`` steps (rows would cost $O(cmP)$ at each inverse and $cP$
    numbers read per step). The rows of $R_0 F$ take $cP$ numbers of memory;
    moving spaces and the additive form without ``report_error`` keep none.
    [`ResidualSpace`][curvlib.approx.coarse.ResidualSpace] costs $F\zeta$, a
    second fine apply and $O(mP)$ projections per step. The $O(cmP)$ rows and
    the $O(mP)$ products dominate at large batches, so $m$ counts
    at most the space's
    [`auto_samples`][curvlib.approx.coarse.CoarseSpace.auto_samples] per
    statistics batch (times the MC draws; ``max_samples="auto"``): 128 for
    every space but [`Spectral`][curvlib.approx.coarse.Spectral], which keeps
    every sample. At a batch of 1000 (500 samples of statistics) the rows then
    cost a quarter; a fixed space's running average over the statistics steps
    averages the subsample's noise with them, and a moving space (Krylov
    enrichment, ``ResidualSpace``) restricts one subsample's Fisher, which kept
    its progress per epoch within the seeds' spread on the measured task.
    Batches up to 128 statistics samples are unaffected. Under data
    parallelism the samples are those gathered in rank order, so every rank
    takes the same.

    Example:
        ```python
        approx = TwoLevel(KFAC(), Nicolaides(), form=CorrectionForm.RESIDUAL)
        opt = PreconditionedOptimizer(model, approx, loss_fn=loss_fn)
        ```

    Args:
        fine: The fine approximation.
        coarse: The coarse space (default: ``Nicolaides()``).
        form: How the levels combine.
        decay: Upper bound of the running-average weight of a fixed space's
            coarse statistics.
        dtype: Storage dtype of the stored batch (default: that of the statistics).
        report_error: Also compute ``coarse_error_change`` in the additive form
            (always computed in the residual form).
        max_condition: The bound $\kappa$ on the condition number of the coarse
            system that is solved (see **Safeguard**).
        max_correction: The bound $\tau$ on the correction's size relative to
            the fine step (see **Safeguard**).
        max_samples: The coarse level's Fisher (the sample Fisher of the
            spaces that use per-sample statistics) comes from the first
            ``max_samples`` samples of each statistics batch (``None``: all;
            ``"auto"``: the space's
            [`auto_samples`][curvlib.approx.coarse.CoarseSpace.auto_samples]);
            the fine level always gets every sample. See **Cost**.

    Raises:
        TypeError: If ``coarse`` is not a ``CoarseSpace``.
        ValueError: If ``decay`` is outside ``[0, 1)``, ``max_condition`` is
            not a finite number above 1, ``max_correction`` not a finite
            positive number or ``max_samples`` not a positive int, ``"auto"``
            or ``None``.

    References:
        T. Tselepidis, J. Kohler and A. Orvieto, "Two-level K-FAC preconditioning
        for deep learning", NeurIPS 2020 workshop on optimization for machine
        learning. A. Koroko et al., "Analysis and comparison of two-level KFAC
        methods for training deep neural networks", arXiv:2303.18083, 2023.
    """

    default_damping_samples: ClassVar[int] = 800
    r"""The samples over which the optimizer's default damping warms up when none is given.

    ``PreconditionedOptimizer(model, TwoLevel(...), loss_fn=...)`` damps with
    ``DampingWarmup(3e-4, samples=800)`` (KFAC: 400;
    [`default_damping`][curvlib.optim.defaults.default_damping]): $\lambda$
    times $800/n$ while the statistics have seen $n < 800$ samples. With the
    400 samples of KFAC's default, reached after four statistics steps at half
    of a batch of 200, the coarse matrix of the Nicolaides space had a condition
    number near $10^3$ at that step and its correction sent the loss from 36 to
    900 within two steps; 7 of 60 two-level runs of the convergence benchmark
    diverged (Nicolaides on the digits autoencoders, Tselepidis on the ReLU
    one). With 800 none of those did, but 3 of 60 still diverged (Spectral
    twice, the residual space once, on the two convolutional networks), before
    the coarse level had its safeguard (``max_condition``, ``max_correction``;
    the two-level results page).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> TwoLevel:
        """A ``RefreshableTwoLevel`` when ``fine`` has two time scales, else a ``TwoLevel``."""
        fine = args[0] if args else kwargs.get("fine")  # no arguments when copied
        if cls is TwoLevel and isinstance(fine, RefreshableApprox):
            cls = RefreshableTwoLevel
        return super().__new__(cls)

    def __init__(
        self,
        fine: CurvatureApprox,
        coarse: CoarseSpace | None = None,
        form: CorrectionForm | str = CorrectionForm.RESIDUAL,
        decay: float = DEFAULT_DECAY,
        dtype: torch.dtype | None = None,
        report_error: bool = False,
        max_condition: float = DEFAULT_MAX_CONDITION,
        max_correction: float = DEFAULT_MAX_CORRECTION,
        max_samples: int | Literal["auto"] | None = "auto",
    ) -> None:
        coarse = Nicolaides() if coarse is None else coarse
        if not isinstance(coarse, CoarseSpace):
            raise TypeError(
                f"coarse must be a CoarseSpace (e.g. Nicolaides()), got {type(coarse).__name__}."
            )
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay!r}.")
        self.fine = fine
        self.coarse = coarse
        self.form = CorrectionForm(form)
        self.decay = float(decay)
        self.dtype = dtype
        self.report_error = bool(report_error)
        self.max_condition, self.max_correction = _check_guard(max_condition, max_correction)
        self.max_samples = _check_max_samples(max_samples)
        self.num_updates = 0
        self._shapes: dict[str, tuple[int, int]] = {}
        self._samples: dict[str, PerSampleIO] = {}
        self._restricted: RestrictedFisher | None = None
        self._fixed_vectors: dict[str, Tensor] | None = None
        self._like: Tensor | None = None

    couples_layers: ClassVar[bool] = True
    """The coarse correction mixes layers: one layer's direction may oppose its gradient."""

    @property
    def required_stats(self) -> frozenset[StatKind]:
        """The fine level's statistics and those of the coarse space."""
        return frozenset(self.fine.required_stats) | self.coarse.required_stats

    @property
    def _uses_samples(self) -> bool:
        return StatKind.PER_SAMPLE_IO in self.coarse.required_stats

    @property
    def _sample_limit(self) -> int | None:
        """The samples of a statistics batch the coarse Fisher uses (``None``: all)."""
        if self.max_samples == "auto":
            return self.coarse.auto_samples
        assert self.max_samples is None or isinstance(self.max_samples, int)
        return self.max_samples

    @property
    def _needs_rows(self) -> bool:
        r"""Whether the residual $R_0(\nabla - F_\lambda\zeta)$ is computed (rows of $R_0 F$)."""
        return self.report_error or self.form is CorrectionForm.RESIDUAL

    def _vectors_of_fixed_space(self, context: CoarseContext) -> dict[str, Tensor]:
        """A fixed space's vectors, built once for the layer shapes, dtype and device."""
        cached = self._fixed_vectors
        if (
            cached is None
            or {name: tuple(v.shape[1:]) for name, v in cached.items()} != dict(context.shapes)
            or next(iter(cached.values())).dtype != context.dtype
            or next(iter(cached.values())).device != context.device
        ):
            cached = _complete(self.coarse.vectors(context), context)
            self._fixed_vectors = cached
        return cached

    def _context(self, fine: Preconditioner | None = None) -> CoarseContext:
        if not self._shapes or self._like is None:
            raise RuntimeError("No curvature estimate yet: update() first.")
        return CoarseContext(dict(self._shapes), self._like.dtype, self._like.device, fine=fine)

    def _fisher(self) -> CoarseFisher | None:
        own = self.coarse.fisher()
        if own is not None:
            return own
        return SampleFisher(self._samples) if self._samples else None

    def update(self, stats: CurvatureStatistics) -> None:
        """Fold one step's statistics into the fine level, the coarse space and the coarse matrix.

        Raises:
            NonFiniteStatisticsError: If any statistic has NaN/Inf entries; then
                nothing is changed.
            ValueError: If a statistic is missing (nothing is changed).
        """
        self._update(stats, lambda: self.fine.update(stats))

    # -- the fine level's split, in data-parallel training ------------------------------
    # The coarse level (its space, its c x c matrix) is small and built on every rank; the
    # fine level's update and inverse split by layer where the fine approximation's do.

    @property
    def splits_update(self) -> bool:
        """Whether the fine level's update splits by layer (``update_due``, ``fitted``)."""
        return bool(getattr(self.fine, "splits_update", False))

    @property
    def owner_statistics(self) -> frozenset[StatKind]:
        """The fine level's ``owner_statistics`` that the coarse level does not read.

        The coarse space and matrix are built on every rank from every layer's
        samples of the kinds they need (``coarse.required_stats``), so those
        are gathered to every rank.
        """
        fine = frozenset(getattr(self.fine, "owner_statistics", frozenset()))
        return fine - self.coarse.required_stats

    def update_due(self, stats: CurvatureStatistics) -> dict[str, Tensor]:
        """The fine level's ``update_due``."""
        fine: Any = self.fine
        due: dict[str, Tensor] = fine.update_due(stats)
        return due

    def fitted(self, stats: CurvatureStatistics, layers: Collection[str]) -> dict[str, Tensor]:
        """The fine level's ``fitted`` parts of ``layers``."""
        fine: Any = self.fine
        parts: dict[str, Tensor] = fine.fitted(stats, layers)
        return parts

    def update_with(self, stats: CurvatureStatistics, fitted: Mapping[str, Tensor]) -> None:
        """``update``, with the fine level's parts taken from ``fitted`` (its ``update_with``)."""
        fine: Any = self.fine
        self._update(stats, lambda: fine.update_with(stats, fitted))

    def work_cost(self, layer: CurvatureLayer) -> float:
        """The fine level's ``work_cost``: owners split the fine level's work only."""
        cost = getattr(self.fine, "work_cost", None)
        return layer.kronecker_cost if cost is None else float(cost(layer))

    @property
    def shares_inverses(self) -> bool:
        """Whether the fine level's layer inverses can be sent (``inverse_parts``)."""
        return bool(getattr(self.fine, "shares_inverses", False))

    def inverse_templates(self) -> dict[str, Tensor]:
        """The fine level's ``inverse_templates``."""
        fine: Any = self.fine
        templates: dict[str, Tensor] = fine.inverse_templates()
        return templates

    def inverse_parts(self, damping: float, layers: Collection[str]) -> dict[str, Tensor]:
        """The fine level's packed inverses of ``layers``."""
        fine: Any = self.fine
        parts: dict[str, Tensor] = fine.inverse_parts(damping, layers)
        return parts

    def inverse_from_parts(
        self, damping: float, parts: Mapping[str, Tensor]
    ) -> TwoLevelPreconditioner:
        """``inverse(damping)``, with the fine level rebuilt from every layer's packed inverse."""
        damping = check_damping(damping)
        self._context()
        fine: Any = self.fine
        return self._inverse(damping, fine.inverse_from_parts(damping, parts))

    def _update(self, stats: CurvatureStatistics, update_fine: Callable[[], None]) -> None:
        if not stats.is_finite():
            raise NonFiniteStatisticsError(
                "Statistics contain NaN or Inf; the curvature estimate was left unchanged."
            )
        for name, layer in stats.layers.items():
            have = layer.kinds()
            missing = sorted(k.name for k in self.coarse.required_stats if k not in have)
            if missing:
                raise ValueError(
                    f"{self.coarse!r} needs {missing} statistics for layer {name!r}; create the "
                    "extractor with stats=approx.required_stats."
                )
        samples = {
            name: _cast_io(_first_samples(layer.io, self._sample_limit), self.dtype)
            for name, layer in stats.layers.items()
            if self._uses_samples and layer.io is not None
        }
        update_fine()
        rho = min(1.0 - 1.0 / (self.num_updates + 1), self.decay)
        self.coarse.update(stats, rho)
        self._shapes = {
            name: (layer.layer.out_dim, layer.layer.in_dim_aug)
            for name, layer in stats.layers.items()
        }
        self._samples = samples
        first = next(iter(stats.layers.values())).tensors()[0]
        self._like = torch.empty(0, dtype=self.dtype or first.dtype, device=first.device)
        if self.coarse.is_fixed:
            fisher = self._fisher()
            assert fisher is not None
            vectors = self._vectors_of_fixed_space(self._context())
            new = fisher.restrict(vectors, self._needs_rows, self._restricted, rho)
            if self.num_updates % FLUSH_EVERY == 0:
                # Entries that would turn subnormal before the next flush, at the slowest decay.
                tiny = torch.finfo(new.gram.dtype).tiny
                new = new.flushed(tiny / max(self.decay, 0.5) ** FLUSH_EVERY)
            self._restricted = new
        self.num_updates += 1

    def inverse(self, damping: float) -> TwoLevelPreconditioner:
        r"""A new two-level operator with damping $\lambda$ on both levels.

        Raises:
            ValueError: If ``damping`` is not positive and finite.
            RuntimeError: Before the first ``update``.
        """
        damping = check_damping(damping)
        self._context()  # before the first update: the error of the two-level method
        return self._inverse(damping, self.fine.inverse(damping))

    def _inverse(self, damping: float, fine: Preconditioner) -> TwoLevelPreconditioner:
        context = self._context()
        context = CoarseContext(context.shapes, context.dtype, context.device, fine=fine)
        fisher = self._fisher()
        vectors: dict[str, Tensor] | None = None
        restricted: RestrictedFisher | SampleProjection | None = None
        if self.coarse.is_fixed:
            vectors, restricted = self._vectors_of_fixed_space(context), self._restricted
        elif not self.coarse.gradient_dependent:
            vectors = _complete(self.coarse.vectors(context), context)
            assert fisher is not None
            if self._needs_rows and isinstance(fisher, SampleFisher):
                # Vectors of one inverse: R0 F x as P (U x) on each step, no rows of R0 F.
                restricted = fisher.projection(vectors)
            else:
                restricted = fisher.restrict(vectors, rows=self._needs_rows)
        return TwoLevelPreconditioner(
            fine, context, damping, self.form, self.coarse, fisher, vectors, restricted,
            self._needs_rows, self.max_condition, self.max_correction,
        )  # fmt: skip

    def matvec(self, vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The fine level's $C$ times per-layer matrices."""
        return self.fine.matvec(vectors)

    def to_dense(self, layer: str) -> Tensor:
        """The fine level's dense block of one layer."""
        return self.fine.to_dense(layer)

    def state_dict(self) -> dict[str, Any]:
        """Fine level, space, stored batch, averaged coarse statistics (tensors, plain values)."""
        return {
            "num_updates": self.num_updates,
            "fine": self.fine.state_dict(),
            "coarse": self.coarse.state_dict(),
            "shapes": {name: list(shape) for name, shape in self._shapes.items()},
            "samples": {
                name: {"inputs": io.inputs.clone(), "output_grads": io.output_grads.clone()}
                for name, io in self._samples.items()
            },
            "restricted": None if self._restricted is None else self._restricted.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by ``state_dict()``."""
        self.fine.load_state_dict(state["fine"])
        self.coarse.load_state_dict(state["coarse"])
        self._shapes = {name: (int(s[0]), int(s[1])) for name, s in state["shapes"].items()}
        self._samples = {
            name: PerSampleIO(e["inputs"].clone(), e["output_grads"].clone())
            for name, e in state["samples"].items()
        }
        restricted = state["restricted"]
        self._restricted = None if restricted is None else RestrictedFisher.from_state(restricted)
        self._fixed_vectors = None
        like = None if self._restricted is None else self._restricted.gram
        if self._samples:
            like = next(iter(self._samples.values())).inputs
        self._like = None if like is None else torch.empty(0, dtype=like.dtype, device=like.device)
        self.num_updates = int(state["num_updates"])

    def __repr__(self) -> str:
        fine = type(self.fine).__name__
        return f"TwoLevel(fine={fine}(), coarse={self.coarse!r}, form={self.form.value!r})"


class RefreshableTwoLevel(TwoLevel):
    """A two-level approximation over a fine level with two time scales (e.g. EKFAC).

    ``TwoLevel(fine)`` returns one when ``fine`` is a
    [`RefreshableApprox`][curvlib.core.protocols.RefreshableApprox]; ``refresh``
    refreshes the fine level, so the optimizer's engine runs both time scales.
    """

    def refresh(self) -> None:
        """Refresh the fine level's expensive part."""
        fine = self.fine
        assert isinstance(fine, RefreshableApprox)
        fine.refresh()

    # The fine level's refresh, split by layer in data-parallel training (EKFAC's
    # eigenbases): each owner computes its layers' part, every rank adopts all of them.

    @property
    def splits_refresh(self) -> bool:
        """Whether the fine level's refresh splits by layer (``refresh_due``, ``refreshed``)."""
        return bool(getattr(self.fine, "splits_refresh", False))

    def refresh_due(self) -> dict[str, Tensor]:
        """The fine level's ``refresh_due``."""
        fine: Any = self.fine
        due: dict[str, Tensor] = fine.refresh_due()
        return due

    def refreshed(self, layers: Collection[str]) -> dict[str, Tensor]:
        """The fine level's ``refreshed`` parts of ``layers``."""
        fine: Any = self.fine
        parts: dict[str, Tensor] = fine.refreshed(layers)
        return parts

    def adopt_refresh(self, packed: Mapping[str, Tensor]) -> None:
        """The fine level's ``adopt_refresh``."""
        fine: Any = self.fine
        fine.adopt_refresh(packed)
