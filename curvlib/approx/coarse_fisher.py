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
for one-position layers, whose rows stay factored) and $O(mc)$ per vector $x$
after one $Ux$ ($O(mTP)$). No $P \times P$ matrix and no $N \times P$ tensor
for one-position layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import torch
from torch import Tensor

from curvlib.core.stats import PerSampleIO, PooledIO
from curvlib.linalg.woodbury import LayerRows, layer_rows


class RestrictedFisher(Protocol):
    r"""A Fisher model restricted to fixed coarse vectors $R_0$."""

    @property
    def gram(self) -> Tensor:
        r"""$R_0 F R_0^\top$, ``[c, c]``."""
        ...

    def project(self, x: Mapping[str, Tensor]) -> Tensor:
        r"""$R_0 F x$ for per-layer matrices ``[..., out, in]``, as ``[..., c]``."""
        ...


class CoarseFisher(Protocol):
    r"""The Fisher model a two-level correction uses on its coarse space."""

    def restrict(self, vectors: Mapping[str, Tensor]) -> RestrictedFisher:
        """The model restricted to the coarse vectors (``[c_l, out, in]`` per layer, in order)."""
        ...

    def matvec(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """$F x$ for one per-layer vector ``[out, in]`` (needed by gradient-dependent spaces)."""
        ...


class _RestrictedSamples:
    def __init__(self, fisher: SampleFisher, projections: Tensor) -> None:
        self._fisher = fisher
        self._proj = projections  # [c, m]
        self.gram = projections @ projections.T

    def project(self, x: Mapping[str, Tensor]) -> Tensor:
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

    def restrict(self, vectors: Mapping[str, Tensor]) -> _RestrictedSamples:
        r"""Projections $P$ of the coarse vectors on the rows, for $PP^\top$ and $P(Ux)$."""
        parts = []
        for name, vecs in vectors.items():
            rows = self.rows[name]
            if vecs.shape[0] == 0:
                parts.append(vecs.new_zeros(0, rows.num_rows, dtype=rows.dtype))
            else:
                parts.append(rows.project(vecs))
        if not parts:
            raise ValueError("The coarse space has no layers.")
        return _RestrictedSamples(self, torch.cat(parts))


class _RestrictedCross:
    def __init__(self, gram: Tensor, weights: Tensor, fisher: CrossKroneckerFisher) -> None:
        self.gram = gram
        self._weights = weights
        self._fisher = fisher

    def project(self, x: Mapping[str, Tensor]) -> Tensor:
        fisher = self._fisher
        total = None
        for name, mat in x.items():
            u, v = fisher.u[name], fisher.v[name]
            part = torch.einsum("lo,...oi,li->...l", u, mat.to(u.dtype), v)
            total = part if total is None else total + part
        assert total is not None
        return total * self._weights


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

    def restrict(self, vectors: Mapping[str, Tensor]) -> _RestrictedCross:
        """The model on one constant vector per layer.

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
        return _RestrictedCross(gram, weights, self)

    def matvec(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Not available: the model is only known on the constant vectors.

        Raises:
            NotImplementedError: Always.
        """
        raise NotImplementedError(
            "The cross-layer Kronecker model is only known on Nicolaides vectors; use a coarse "
            "space built on the Fisher of the sample batch for gradient-dependent vectors."
        )
