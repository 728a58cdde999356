r"""$\mathcal R(F)$ of one layer as a matrix-free operator, and its deflation by Kronecker terms.

The map and its adjoint are defined in [`curvlib.linalg.rearrange`][curvlib.linalg.rearrange];
[`RearrangedOperator`][curvlib.linalg.RearrangedOperator] is what the singular
value solvers need of any such map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from curvlib.core.stats import PerSampleIO
from curvlib.linalg.factors import symmetrize

_TOL_FLOOR = 1e3
r"""Smallest stopping tolerance, in machine epsilons of the operator's dtype.

Products with $\mathcal R$ in float32 resolve the residuals only to about
$10^2\epsilon$: on the MNIST autoencoder's layers the power-iteration residual
stagnates at 1e-5 to 3e-5, so a tolerance of 1e-6 ran every update into the
iteration cap. 1e3 eps is 1.2e-4 in float32 and 2.2e-13 in float64.
"""


def effective_tol(tol: float, dtype: torch.dtype) -> float:
    """``tol``, raised to the round-off level of ``dtype`` (``_TOL_FLOOR`` epsilons)."""
    return max(tol, _TOL_FLOOR * torch.finfo(dtype).eps)


class RearrangedOperator(Protocol):
    """A linear map from ``[in_dim, in_dim]`` to ``[out_dim, out_dim]`` matrices and its adjoint."""

    out_dim: int
    in_dim: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, V: Tensor) -> Tensor:
        """Apply the map to ``[..., in_dim, in_dim]`` matrices."""

    def rmatvec(self, U: Tensor) -> Tensor:
        """Apply the adjoint to ``[..., out_dim, out_dim]`` matrices."""


class RearrangedFisher:
    r"""$\mathcal R(F)$ of one layer, from its per-sample inputs and output gradients.

    With one output position ($T = 1$) $\bar W_{kn} = g_{kn}\bar a_n^\top$ is rank
    one and $\mathcal R(F)\operatorname{vec}(V) = \frac1N\sum_{k,n}
    (\bar a_n^\top V \bar a_n)\, g_{kn} g_{kn}^\top$: a product costs
    $O(N d_i^2 + KN d_o^2)$ and no per-sample gradient is formed. With several
    positions the exact $\bar W_{kn}$ are formed once ($KN d_o d_i$ memory) and a
    product costs $O(KN d_o d_i (d_o + d_i))$.

    Args:
        io: The layer's per-sample inputs and output gradients.
        symmetric: Restrict to symmetric matrices (module docstring): inputs are
            projected onto $(M + M^\top)/2$; the images of symmetric matrices
            are symmetric (up to rounding), so outputs need no projection.
        dtype: Compute in this dtype (default: that of ``io``).
    """

    def __init__(
        self, io: PerSampleIO, symmetric: bool = True, dtype: torch.dtype | None = None
    ) -> None:
        if dtype is not None:
            io = PerSampleIO(io.inputs.to(dtype), io.output_grads.to(dtype))
        self.symmetric = symmetric
        self.out_dim = int(io.output_grads.shape[-1])
        self.in_dim = int(io.inputs.shape[-1])
        self.dtype = io.inputs.dtype
        self.device = io.inputs.device
        self._num_samples = io.inputs.shape[0]
        self._inputs: Tensor | None = None  # [N, in]  (one position)
        self._grads: Tensor | None = None  # [K, N, out]  (one position)
        self._weights: Tensor | None = None  # [K N, out, in]  (several positions)
        if io.inputs.shape[1] == 1:
            self._inputs, self._grads = io.inputs[:, 0, :], io.output_grads[:, :, 0, :]
        else:
            self._weights = io.grads().flatten(0, 1)

    def _project(self, mat: Tensor) -> Tensor:
        return symmetrize(mat) if self.symmetric else mat

    def matvec(self, V: Tensor) -> Tensor:
        r"""$\frac1N\sum_{k,n} \bar W_{kn} V \bar W_{kn}^\top$ for ``[..., in, in]`` $V$."""
        V = self._project(V)
        if self._weights is None:
            assert self._inputs is not None and self._grads is not None
            a, g = self._inputs, self._grads  # [N, in], [K, N, out]
            quad = ((a @ V) * a).sum(-1)  # a_n^T V a_n, [..., N]
            weights = quad.unsqueeze(-2).expand(*quad.shape[:-1], g.shape[0], -1)
            flat = g.flatten(0, 1)  # [K N, out]
            out = (flat.T * weights.flatten(-2).unsqueeze(-2)) @ flat
        else:
            # einsum, not a broadcast matmul: that takes milliseconds on CPU (torch 2.14).
            left = torch.einsum("moi,...ij->...moj", self._weights, V)
            out = torch.einsum("...moj,mpj->...op", left, self._weights)
        return out / self._num_samples

    def rmatvec(self, U: Tensor) -> Tensor:
        r"""$\frac1N\sum_{k,n} \bar W_{kn}^\top U \bar W_{kn}$ for ``[..., out, out]`` $U$."""
        U = self._project(U)
        if self._weights is None:
            assert self._inputs is not None and self._grads is not None
            a, g = self._inputs, self._grads
            quad = ((g @ U.unsqueeze(-3)) * g).sum((-1, -3))  # sum_k g_kn^T U g_kn, [..., N]
            out = (a.T * quad.unsqueeze(-2)) @ a
        else:
            left = torch.einsum("...op,mpj->...moj", U, self._weights)
            out = torch.einsum("moi,...moj->...ij", self._weights, left)
        return out / self._num_samples


class Deflated:
    r"""An operator minus Kronecker terms.

    $\mathcal R - \sum_j \operatorname{vec}(G_j)\operatorname{vec}(A_j)^\top$.
    Deflating by the leading singular pairs $(\sqrt{\sigma_j} U_j, \sqrt{\sigma_j}
    V_j)$ moves the next pair to the top; deflating by a KFAC term $(G, A)$ gives
    the rearranged residual $\mathcal R(F - G\otimes A)$.

    Args:
        op: The operator to deflate.
        terms: Pairs ``(G_j, A_j)`` with shapes ``[out, out]`` and ``[in, in]``.
    """

    def __init__(self, op: RearrangedOperator, terms: Sequence[tuple[Tensor, Tensor]]) -> None:
        self.op, self.terms = op, tuple(terms)
        self.out_dim, self.in_dim = op.out_dim, op.in_dim
        self.dtype, self.device = op.dtype, op.device

    def matvec(self, V: Tensor) -> Tensor:
        r"""$\mathcal R\operatorname{vec}(V) - \sum_j \langle A_j, V\rangle G_j$."""
        out = self.op.matvec(V)
        for G, A in self.terms:
            out = out - (V * A).sum((-2, -1), keepdim=True) * G
        return out

    def rmatvec(self, U: Tensor) -> Tensor:
        r"""$\mathcal R^\top\operatorname{vec}(U) - \sum_j \langle G_j, U\rangle A_j$."""
        out = self.op.rmatvec(U)
        for G, A in self.terms:
            out = out - (U * G).sum((-2, -1), keepdim=True) * A
        return out
