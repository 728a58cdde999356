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

from curvlib.core.stats import PerSampleIO
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
                f"The Fisher of the whole network needs the same (K, N) in every layer, got {sizes}."
            )
        self.rows: dict[str, LayerRows] = {
            name: layer_rows(io.inputs, io.output_grads, 1.0 / math.sqrt(io.inputs.shape[0]))
            for name, io in samples.items()
        }

    def rows_apply(self, x: Mapping[str, Tensor]) -> Tensor:
        r"""$U x = \sum_l U_l x_l$, ``[..., m]`` (layers missing from ``x`` count as zero)."""
        parts = [self.rows[name].project(mat) for name, mat in x.items()]
        total = parts[0]
        for part in parts[1:]:
            total = total + part
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
