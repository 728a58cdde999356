r"""KFAC: one Kronecker product per layer (Martens & Grosse 2015; KFC for convolutions)."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor

from curvlib.approx.base import LayerBlock, LayerInverse, LayerwiseApprox, running_average
from curvlib.core.stats import LayerStatistics, StatKind
from curvlib.linalg.factors import damped_inverse, eigh, pi_split, symmetrize


class KFACDamping(Enum):
    r"""How KFAC realises the Tikhonov term $F + \lambda I$.

    Attributes:
        PI: Factored damping, $(G + \frac{\sqrt\lambda}{\pi} I) \otimes
            (A + \pi\sqrt\lambda I)$ with the trace-norm $\pi$ (Martens & Grosse
            2015, section 6.3): two Cholesky inverses, no eigendecomposition. It
            adds $\lambda I$ exactly and the cross terms $\frac{\sqrt\lambda}{\pi}
            I\otimes A + \pi\sqrt\lambda\, G\otimes I$ on top.
        EIGEN: Exact damping $(G \otimes A + \lambda I)^{-1}$ in the Kronecker
            eigenbasis, $Q_G [(Q_G^\top V Q_A) \oslash (s_G s_A^\top + \lambda)] Q_A^\top$:
            two eigendecompositions.
    """

    PI = "pi"
    EIGEN = "eigen"


class _KFACBlock(LayerBlock):
    def __init__(
        self, out_dim: int, in_dim: int, dtype: torch.dtype | None, damping: KFACDamping
    ) -> None:
        super().__init__(out_dim, in_dim, dtype)
        self.damping_mode = damping
        self.A: Tensor | None = None
        self.G: Tensor | None = None

    def update(self, stats: LayerStatistics, rho: float) -> None:
        assert stats.kronecker is not None
        self.A = running_average(self.A, symmetrize(self._cast(stats.kronecker.A)), rho)
        self.G = running_average(self.G, symmetrize(self._cast(stats.kronecker.G)), rho)

    def _factors(self) -> tuple[Tensor, Tensor]:
        if self.A is None or self.G is None:
            raise RuntimeError("KFAC block has no estimate yet: update() first.")
        return self.A, self.G

    def matvec(self, mat: Tensor) -> Tensor:
        A, G = self._factors()
        return G @ mat.to(A.dtype) @ A

    def inverse(self, damping: float) -> LayerInverse:
        A, G = self._factors()
        if self.damping_mode is KFACDamping.PI:
            gamma_a, gamma_g = pi_split(A, G, damping)
            a_inv, g_inv = damped_inverse(A, gamma_a), damped_inverse(G, gamma_g)

            def apply_pi(mat: Tensor) -> Tensor:
                return g_inv @ mat.to(a_inv.dtype) @ a_inv

            return apply_pi
        ea, eg = eigh(A), eigh(G)
        scale = 1.0 / (eg.values[:, None] * ea.values[None, :] + damping)

        def apply_eigen(mat: Tensor) -> Tensor:
            rotated = eg.vectors.T @ mat.to(scale.dtype) @ ea.vectors
            return eg.vectors @ (rotated * scale) @ ea.vectors.T

        return apply_eigen

    def to_dense(self) -> Tensor:
        A, G = self._factors()
        return torch.kron(G.contiguous(), A.contiguous())

    def damped_to_dense(self, damping: float) -> Tensor:
        if self.damping_mode is KFACDamping.EIGEN:
            return super().damped_to_dense(damping)
        A, G = self._factors()
        gamma_a, gamma_g = pi_split(A, G, damping)
        eye_a = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        eye_g = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        return torch.kron((G + gamma_g * eye_g).contiguous(), (A + gamma_a * eye_a).contiguous())

    def state_dict(self) -> dict[str, Any]:
        A, G = self._factors()
        return {"A": A.clone(), "G": G.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.A, self.G = state["A"].clone(), state["G"].clone()


class KFAC(LayerwiseApprox):
    r"""Kronecker-factored approximate curvature.

    Each layer's Fisher block is approximated by $G \otimes A$ with the running
    averages of the factors of
    [`curvlib.core.conventions`][curvlib.core.conventions] (KFC's convention for
    convolutions), and inverted with the damping rule of
    [`KFACDamping`][curvlib.approx.kfac.KFACDamping].

    Cost per layer with $d_o$ rows and $d_i$ columns: update $O(d_o^2 + d_i^2)$
    (the factor products are the extractor's); inverse two Cholesky
    factorisations $O(d_o^3 + d_i^3)$ (``PI``) or two eigendecompositions
    (``EIGEN``, several times slower); apply $O(d_o d_i (d_o + d_i))$
    (``EIGEN``: twice that).

    Example:
        >>> approx = KFAC(damping_mode=KFACDamping.PI)
        >>> approx.required_stats == frozenset({StatKind.KRONECKER})
        True

    Args:
        damping_mode: How $\lambda$ is applied.
        decay: Upper bound of the running-average weight on the old estimate.
        dtype: Storage dtype of the factors (default: that of the statistics).

    References:
        J. Martens and R. Grosse, "Optimizing neural networks with Kronecker-factored
        approximate curvature", ICML 2015. R. Grosse and J. Martens, "A
        Kronecker-factored approximate Fisher matrix for convolution layers", ICML 2016.
    """

    required_stats: ClassVar[frozenset[StatKind]] = frozenset({StatKind.KRONECKER})

    def __init__(
        self,
        damping_mode: KFACDamping | str = KFACDamping.PI,
        decay: float = 0.95,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(decay=decay, dtype=dtype)
        self.damping_mode = KFACDamping(damping_mode)

    def _make_block(self, out_dim: int, in_dim: int) -> LayerBlock:
        return _KFACBlock(out_dim, in_dim, self.dtype, self.damping_mode)
