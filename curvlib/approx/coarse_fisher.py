r"""The Fisher restricted to a coarse space: $R_0 F R_0^\top$ and $R_0 F x$ without forming $F$.

[`SampleFisher`][curvlib.approx.coarse_fisher.SampleFisher] holds the rows
$U = [U_1 \mid \dots \mid U_L]$ of one statistics batch
($U^\top U = F = \frac1N \sum_{k,n} \operatorname{vec}(\bar W_{kn})
\operatorname{vec}(\bar W_{kn})^\top$, the whole network's Fisher with every
cross-layer block; [`curvlib.approx.natural_gradient`][curvlib.approx.natural_gradient]).
With coarse vectors $z_j$ living in layer $l(j)$, the projections
$(P)_{j,kn} = \langle U_{l(j),kn}, z_j \rangle$ give

$$R_0 F R_0^\top = P P^\top, \qquad R_0 F x = P\,(U x),$$

at the cost of one projection per vector ($O(mTP_l)$; $O(m\, d_\text{out} d_\text{in})$
for one-position layers, whose rows stay factored). No $P \times P$ matrix and
no $N \times P$ tensor for one-position layers.

Two ways to get $R_0 F x$ on every step:

* [`RestrictedFisher`][curvlib.approx.coarse_fisher.RestrictedFisher] holds
  the rows $R_0 F = PU$ ($c \times P$, built once in $O(cmP)$): $O(cP)$ per
  product, and, being linear in $F$, it is running-averaged together with
  $R_0 F R_0^\top$, so both stay the restriction of one averaged Fisher;
* [`SampleProjection`][curvlib.approx.coarse_fisher.SampleProjection] keeps
  $P$ only: $O(mP)$ per product through $Ux$, for vectors used on one step
  ([`ResidualSpace`][curvlib.approx.coarse.ResidualSpace]) or between two
  inverses (the spaces that move with the fine level).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from curvlib.approx.base import running_average
from curvlib.core.stats import PerSampleIO, PooledIO
from curvlib.linalg.woodbury import FactoredRows, LayerRows, layer_rows


@dataclass(frozen=True)
class RestrictedFisher:
    r"""A Fisher model restricted to coarse vectors $R_0$: $R_0 F R_0^\top$ and the rows $R_0 F$.

    Both are linear in $F$, so the running average of the restrictions of
    several batches' Fishers to the same vectors
    ([`averaged`][curvlib.approx.coarse_fisher.RestrictedFisher.averaged]) is
    the restriction of the averaged Fisher $\bar F$: the coarse matrix and the
    residual $R_0 \bar F x$ always come from one and the same model.

    Attributes:
        gram: $R_0 F R_0^\top$, ``[c, c]``.
        rows: The block of $R_0 F$ in each layer, ``[c, out, in]`` (all $c$
            rows, since $F$ couples the layers), in the vectorisation order;
            ``None`` when only ``gram`` was asked for (the additive form).
    """

    gram: Tensor
    rows: dict[str, Tensor] | None = None

    def project(self, x: Mapping[str, Tensor]) -> Tensor:
        r"""$R_0 F x$ for per-layer matrices ``[..., out, in]``, as ``[..., c]`` ($O(cP)$).

        Raises:
            RuntimeError: If the rows were not computed.
        """
        if self.rows is None:
            raise RuntimeError("These coarse statistics hold R0 F R0^T only: restrict with rows.")
        return rows_times({name: rows.flatten(1) for name, rows in self.rows.items()}, x)

    def averaged(self, old: RestrictedFisher | None, rho: float) -> RestrictedFisher:
        r"""``rho * old + (1 - rho) * self``, entry by entry (``self`` without ``old``).

        Raises:
            ValueError: If ``old`` has other layers or shapes, or rows where this has none.
        """
        if old is None:
            return self
        old.check_like(
            self.gram.shape[0],
            None if self.rows is None else {k: tuple(v.shape) for k, v in self.rows.items()},
        )
        rows = None
        if self.rows is not None and old.rows is not None:
            rows = {
                name: torch.lerp(old.rows[name], new.to(old.rows[name].dtype), 1.0 - rho)
                for name, new in self.rows.items()
            }
        return RestrictedFisher(running_average(old.gram, self.gram, rho), rows)

    def check_like(self, size: int, row_shapes: Mapping[str, tuple[int, ...]] | None) -> None:
        """Raise unless ``size`` vectors with rows of ``row_shapes`` match these statistics.

        Raises:
            ValueError: If they do not (another coarse space).
        """
        mine = None if self.rows is None else {k: tuple(v.shape) for k, v in self.rows.items()}
        theirs = None if row_shapes is None else {k: tuple(v) for k, v in row_shapes.items()}
        if self.gram.shape[0] != size or mine != theirs:
            raise ValueError(
                "Coarse statistics of different coarse spaces cannot be averaged: the space's "
                "vectors must stay the same between statistics steps."
            )

    def flushed(self, threshold: float) -> RestrictedFisher:
        r"""The statistics with entries of the rows below ``threshold`` in magnitude set to zero.

        Averaged rows of a dead unit decay geometrically into the subnormal
        range, where x86 products slow down (microcode assists). One
        ``hardshrink`` pass over the $cP$ rows.
        """
        if self.rows is None:
            return self
        rows = {name: torch.nn.functional.hardshrink(r, threshold) for name, r in self.rows.items()}
        return RestrictedFisher(self.gram, rows)

    def state_dict(self) -> dict[str, Any]:
        """Tensors only: ``gram`` and ``rows`` (``None`` when absent)."""
        rows = None if self.rows is None else {k: v.clone() for k, v in self.rows.items()}
        return {"gram": self.gram.clone(), "rows": rows}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RestrictedFisher:
        """The statistics saved by ``state_dict``."""
        rows = state["rows"]
        return cls(
            state["gram"].clone(),
            None if rows is None else {k: v.clone() for k, v in rows.items()},
        )


def rows_times(rows: Mapping[str, Tensor], x: Mapping[str, Tensor]) -> Tensor:
    r"""$\sum_l M_l x_l$, ``[..., c]``, for rows $M_l$ ``[c, P_l]``, ``x_l`` ``[..., out, in]``."""
    total: Tensor | None = None
    for name, block in rows.items():
        part = x[name].to(block.dtype).flatten(-2) @ block.T
        total = part if total is None else total + part
    assert total is not None
    return total


class CoarseFisher(Protocol):
    r"""The Fisher model a two-level correction uses on its coarse space."""

    def restrict(
        self,
        vectors: Mapping[str, Tensor],
        rows: bool = True,
        previous: RestrictedFisher | None = None,
        rho: float = 0.0,
    ) -> RestrictedFisher:
        """The model restricted to the coarse vectors (``[c_l, out, in]`` per layer, in order).

        ``rows=False`` computes ``gram`` only. With ``previous``, the result is
        ``rho * previous + (1 - rho) * restriction``.
        """
        ...

    def matvec(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """$F x$ for one per-layer vector ``[out, in]`` (needed by gradient-dependent spaces)."""
        ...


def _expand_averaged(layer: LayerRows, coeffs: Tensor, old: Tensor, rho: float) -> Tensor:
    r"""``rho * old + (1 - rho) * layer.expand(coeffs)``, ``[c, out, in]``.

    For factored rows $g_{kn}\bar a_n^\top$ one GEMM with accumulation:
    $\rho M + (1-\rho)\,[\sum_k c_{kn} g_{kn}]_{n}\,\bar A$.
    """
    if not isinstance(layer, FactoredRows):
        return torch.lerp(old, layer.expand(coeffs).to(old.dtype), 1.0 - rho)
    k, n, _ = layer.output_grads.shape
    c = coeffs.to(layer.dtype).reshape(-1, k, n)
    weighted = torch.einsum("ckn,kno->con", c, layer.output_grads)  # [c, out, N]
    flat = torch.addmm(
        old.reshape(-1, old.shape[-1]),
        weighted.reshape(-1, n).to(old.dtype),
        layer.inputs.to(old.dtype),
        beta=rho,
        alpha=1.0 - rho,
    )
    return flat.reshape(old.shape)


class SampleProjection:
    r"""The sample Fisher on vectors used for a few steps: $R_0 F x = P\,(U x)$ per call.

    For gradient-dependent spaces (vectors of one step) and moving ones (vectors
    of one inverse): the projections $P$ of the vectors on the rows ($O(mP)$
    for one vector per layer) instead of the rows of $R_0 F$ ($O(cmP)$, and
    $cP$ numbers to read per product), and one $Ux$ per product, shared with
    $F x$.
    """

    def __init__(self, fisher: SampleFisher, projections: Tensor) -> None:
        self._fisher = fisher
        self._proj = projections  # [c, m]
        self.gram = projections @ projections.T

    def project(self, x: Mapping[str, Tensor]) -> Tensor:
        r"""$R_0 F x$, ``[..., c]``."""
        return self._fisher.rows_apply(x) @ self._proj.T


class SampleFisher:
    r"""The Fisher of one statistics batch, as the rows of its per-sample gradients.

    Args:
        samples: Per-sample inputs and output gradients of every layer, in the
            vectorisation order; all with the same ``K`` and ``N``.

    Raises:
        ValueError: If the layers disagree on ``K`` and ``N``.
    """

    def __init__(self, samples: Mapping[str, PerSampleIO]) -> None:
        sizes = {name: tuple(io.output_grads.shape[:2]) for name, io in samples.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(
                "The Fisher of the whole network needs the same (K, N) in every layer, "
                f"got {sizes}."
            )
        self._last: tuple[Mapping[str, Tensor], Tensor] | None = None
        self.rows: dict[str, LayerRows] = {
            name: layer_rows(io.inputs, io.output_grads, 1.0 / math.sqrt(io.inputs.shape[0]))
            for name, io in samples.items()
        }

    def rows_apply(self, x: Mapping[str, Tensor]) -> Tensor:
        r"""$U x = \sum_l U_l x_l$, ``[..., m]`` (layers missing from ``x`` count as zero).

        The result for the last mapping object is kept: a step that needs both
        $F\zeta$ and $R_0 F\zeta$ pays for one $U\zeta$.
        """
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        parts = [self.rows[name].project(mat) for name, mat in x.items()]
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        self._last = (x, total)
        return total

    def matvec(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        r"""$F x = U^\top (U x)$ per layer."""
        coeffs = self.rows_apply(x)
        return {name: self.rows[name].expand(coeffs) for name in x}

    def _projections(self, vectors: Mapping[str, Tensor]) -> Tensor:
        parts = []
        for name, vecs in vectors.items():
            rows = self.rows[name]
            if vecs.shape[0] == 0:
                parts.append(vecs.new_zeros(0, rows.num_rows, dtype=rows.dtype))
            else:
                parts.append(rows.project(vecs))
        if not parts:
            raise ValueError("The coarse space has no layers.")
        return torch.cat(parts)

    def restrict(
        self,
        vectors: Mapping[str, Tensor],
        rows: bool = True,
        previous: RestrictedFisher | None = None,
        rho: float = 0.0,
    ) -> RestrictedFisher:
        r"""$PP^\top$ and, with ``rows``, $R_0 F = P U$ per layer ($O(cmP)$).

        $P$ are the projections of the coarse vectors on the rows. With
        ``previous``, the running average ``rho * previous + (1 - rho) * new``;
        for one-position layers the average is fused into the product that
        forms the rows ($\rho M + (1-\rho)\,\hat G^\top \bar A$, one GEMM).

        Raises:
            ValueError: If ``previous`` belongs to another coarse space.
        """
        proj = self._projections(vectors)
        gram = proj @ proj.T
        if previous is None:
            expanded = None
            if rows:
                expanded = {name: layer.expand(proj) for name, layer in self.rows.items()}
            return RestrictedFisher(gram, expanded)
        shapes = {name: (proj.shape[0], *layer.shape[1:]) for name, layer in self.rows.items()}
        previous.check_like(proj.shape[0], shapes if rows else None)
        averaged = None
        if rows and previous.rows is not None:
            averaged = {
                name: _expand_averaged(layer, proj, previous.rows[name], rho)
                for name, layer in self.rows.items()
            }
        return RestrictedFisher(running_average(previous.gram, gram, rho), averaged)

    def projection(self, vectors: Mapping[str, Tensor]) -> SampleProjection:
        r"""The projections $P$ only, for vectors used on one step."""
        return SampleProjection(self, self._projections(vectors))


class CrossKroneckerFisher:
    r"""The Fisher with Kronecker-factored cross-layer blocks, on Nicolaides vectors.

    Every block, cross-layer ones included, is $F_{lm} \approx G_{lm} \otimes
    A_{lm}$ with the factors of
    [`cross_layer_factors`][curvlib.core.stats.cross_layer_factors]. On constant
    vectors $z_l = w_l \mathbf 1$ only sums of the factors are needed:

    $$z_l^\top F_{lm} z_m
    = w_l w_m\, (\mathbf 1^\top G_{lm}\mathbf 1)(\mathbf 1^\top A_{lm}\mathbf 1),
    \qquad z_l^\top \textstyle\sum_m F_{lm} x_m = w_l \sum_m u_{lm}^\top X_m v_{lm},$$

    with $u_{lm} = G_{lm}^\top\mathbf 1$ and $v_{lm} = A_{lm}^\top\mathbf 1$, all
    from per-sample sums: $O(L^2 N K + L N (d_\text{in} + K d_\text{out}))$ to
    build, no $d \times d$ factor and no per-sample gradient; $O(LP)$ per
    product $R_0 F x$.

    Args:
        pooled: The pooled statistics of every layer, in the vectorisation order.
    """

    def __init__(self, pooled: Mapping[str, PooledIO]) -> None:
        items = list(pooled.values())
        n = items[0].inputs.shape[0]
        sums_a = torch.stack([p.inputs.sum(-1) for p in items])  # [L, N]
        sums_g = torch.stack([p.output_grads.sum(-1) for p in items])  # [L, K, N]
        self.sums_a = sums_a @ sums_a.T / n
        self.sums_g = torch.einsum("lkn,mkn->lm", sums_g, sums_g) / n
        self.u = {
            name: torch.einsum("lkn,kno->lo", sums_g, p.output_grads) / n
            for name, p in pooled.items()
        }
        self.v = {name: sums_a @ p.inputs / n for name, p in pooled.items()}

    def restrict(
        self,
        vectors: Mapping[str, Tensor],
        rows: bool = True,
        previous: RestrictedFisher | None = None,
        rho: float = 0.0,
    ) -> RestrictedFisher:
        r"""The model on one constant vector per layer (averaged with ``previous`` if given).

        With ``rows``, the block of $R_0 F$ in layer $m$ has the rows
        $w_l\, u_{lm} v_{lm}^\top$ ($O(LP)$).

        Raises:
            ValueError: If a layer does not have exactly one vector.
        """
        counts = {name: int(v.shape[0]) for name, v in vectors.items()}
        if any(c != 1 for c in counts.values()):
            raise ValueError(
                "Cross-layer Kronecker factors restrict to one constant vector per layer, "
                f"got {counts}."
            )
        weights = torch.stack([v.flatten()[0] for v in vectors.values()]).to(self.sums_a.dtype)
        gram = self.sums_g * self.sums_a * torch.outer(weights, weights)
        expanded = None
        if rows:
            expanded = {
                name: weights[:, None, None] * self.u[name][:, :, None] * self.v[name][:, None, :]
                for name in vectors
            }
        return RestrictedFisher(gram, expanded).averaged(previous, rho)

    def matvec(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Not available: the model is only known on the constant vectors.

        Raises:
            NotImplementedError: Always.
        """
        raise NotImplementedError(
            "The cross-layer Kronecker model is only known on Nicolaides vectors; use a coarse "
            "space built on the Fisher of the sample batch for gradient-dependent vectors."
        )
