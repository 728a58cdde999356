r"""Inverse of a damped sum of two Kronecker products.

$K = (G_1 + \gamma_G I) \otimes (A_1 + \gamma_A I) + G_2 \otimes A_2$ is inverted
exactly by whitening with the damped first term and eigendecomposing the
whitened second term. With Cholesky factors $G_1' = C_G C_G^\top$,
$A_1' = C_A C_A^\top$ and eigendecompositions
$C_G^{-1} G_2 C_G^{-\top} = U_G \operatorname{diag}(s_G) U_G^\top$,
$C_A^{-1} A_2 C_A^{-\top} = U_A \operatorname{diag}(s_A) U_A^\top$:

$$K = (C_G U_G \otimes C_A U_A)\,\operatorname{diag}(1 + s_G \otimes s_A)\,
(C_G U_G \otimes C_A U_A)^\top,$$

so with $P_G = C_G^{-\top} U_G$, $P_A = C_A^{-\top} U_A$,
$K^{-1}\operatorname{vec}(V) = \operatorname{vec}\big(P_G [(P_G^\top V P_A) \oslash
(1 + s_G s_A^\top)] P_A^\top\big)$ (row-major vec,
[`curvlib.core.conventions`][curvlib.core.conventions]).

**Indefinite second terms.** When $G_2 \otimes A_2$ is indefinite (the
correction of KFAC-corrected, the second pair of a rank-2 Kronecker
approximation), a whitened eigenvalue $1 + s_G s_A$ can reach zero or below and
$K$ stops being positive definite. The rule: every whitened eigenvalue is
floored at ``min_eig`` ($\epsilon$), i.e. the preconditioner uses
$\max(1 + s_G s_A, \epsilon)$, so it stays positive definite and amplifies no
direction by more than $1/\epsilon$ relative to the damped first term alone.

Cost to build: two Cholesky factorisations, two ``eigh`` of the factor sizes
and six triangular solves (three per side: $C^{-1} S C^{-\top}$ and $C^{-\top}
U$), $3n^3$ flops per side besides the factorisations; no explicit inverse is
formed (which cost $7n^3$: $C^{-1}$ and three products with it). ``eigh`` is
most of the rest: about 60% of the build on the MNIST autoencoder's layers
(``benchmarks/two_term_inverse.py``). Four matrix products to apply.

**Decoupled coordinates.** A coordinate whose row is zero in both terms of a
side (a ReLU unit dead on every statistics sample, an input that is zero on
all of them) is decoupled from the rest: there $C = \sqrt{\gamma}$, $s = 0$
and the basis vector is the unit vector over $\sqrt{\gamma}$. On the CPU,
where at least an eighth of a side of 128 rows or more is dead, the
factorisations run on the other coordinates only
([`cpu_live_coordinates`][curvlib.linalg.factors.cpu_live_coordinates]), at
the cube of their number, and the result is the same operator. On the step-time
benchmark's autoencoder (random inputs), 3% of the encoder's and 43% of the
decoder's hidden units are dead; there the submatrices also spare float32
``eigh`` the cluster of exact zeros on which it failed to converge (and was
retried) on 1,000-row sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from curvlib.linalg.factors import (
    cpu_live_coordinates,
    damped_cholesky,
    eigh,
    embed_live,
    flush_negligible,
    live_block,
    pi_split,
    symmetrize,
)
from curvlib.linalg.precision import (
    ApplyDtype,
    apply_cost,
    check_apply_dtype,
    resolve_apply_dtype,
)


def eigenbasis_apply(left: Tensor, right: Tensor, scale: Tensor, mat: Tensor) -> Tensor:
    r"""$L\,[(L^\top V R) \odot D]\,R^\top$ for ``[..., d_out, d_in]`` matrices $V$.

    An inverse in a Kronecker eigenbasis (KFAC's ``EIGEN``, the two-term
    inverse): four products in the dtype of ``left`` and ``right`` (bfloat16
    copies of the bases, for ``apply_dtype``), the scaling by $D$ = ``scale``
    and the result in ``scale``'s dtype. With the bases in ``scale``'s dtype
    every conversion is a no-op.
    """
    low, dtype = left.dtype, scale.dtype
    rotated = (left.T @ mat.to(low) @ right).to(dtype) * scale
    return (left @ rotated.to(low) @ right.T).to(dtype)


@dataclass(frozen=True)
class KroneckerSumInverse:
    r"""$K^{-1}$ in its eigenbasis: $V \mapsto P_G [(P_G^\top V P_A) \odot D] P_A^\top$.

    Besides applying $K^{-1}$, it gives $\log\det K$ and draws from
    $\mathcal N(0, K^{-1})$ without a $P \times P$ matrix, and carries a cheap
    lower bound of the condition number of $K$.

    Attributes:
        P_G: ``[d_out, d_out]``.
        P_A: ``[d_in, d_in]``.
        scale: $D = 1 / \max(1 + s_G s_A^\top, \epsilon)$, ``[d_out, d_in]``.
        num_floored: How many whitened eigenvalues the floor raised.
        chol_G: Lower Cholesky factor $C_G$ of the damped $G_1'$ (jitter included).
        chol_A: Lower Cholesky factor $C_A$ of the damped $A_1'$ (jitter included).
        condition_number: A lower bound of the condition number of $K$ (floor
            included): $\lambda_\max(K)$ is bounded below by the largest diagonal
            entry of the unfloored $K$ (the floor only raises $K$) and by the
            Rayleigh quotients $D_{pq}^{-1} / (\|P_{G,:p}\|^2 \|P_{A,:q}\|^2)$ of
            $K$ at the columns $P_{G,:p} \otimes P_{A,:q}$ of $P_G \otimes P_A$,
            and $\lambda_\min(K)$ above by the smallest of those quotients.
            Cost $O(d_\text{out}^2 + d_\text{in}^2)$.
        apply_dtype: The dtype the four products of ``__call__`` run in
            ([`curvlib.linalg.precision`][curvlib.linalg.precision]; ``None``:
            ``scale``'s). The scaling and the result stay in ``scale``'s dtype.
    """

    P_G: Tensor
    P_A: Tensor
    scale: Tensor
    num_floored: int
    chol_G: Tensor
    chol_A: Tensor
    condition_number: float
    apply_dtype: torch.dtype | None = None
    _low: tuple[Tensor, Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        low = self.apply_dtype or self.scale.dtype
        object.__setattr__(self, "apply_dtype", low)
        object.__setattr__(self, "_low", (self.P_G.to(low), self.P_A.to(low)))

    def __call__(self, mat: Tensor) -> Tensor:
        """Apply $K^{-1}$ to ``[..., d_out, d_in]`` matrices."""
        return eigenbasis_apply(*self._low, self.scale, mat)

    def logdet(self) -> Tensor:
        r"""$\log\det K$, from the whitening: no $P \times P$ matrix.

        $\log\det K = \log\det(G_1' \otimes A_1') + \sum_{pq} \log \max(1 + s_{G,p}
        s_{A,q}, \epsilon)$.

        The first term is $2 d_\text{in} \sum_i \log C_{G,ii} + 2 d_\text{out}
        \sum_j \log C_{A,jj}$. Cost $O(d_\text{out} d_\text{in})$.
        """
        d_out, d_in = self.scale.shape
        first = (
            d_in * torch.log(self.chol_G.diagonal()).sum()
            + d_out * torch.log(self.chol_A.diagonal()).sum()
        )
        return 2.0 * first - torch.log(self.scale).sum()

    def sample(self, noise: Tensor) -> Tensor:
        r"""Map standard normal ``[..., d_out, d_in]`` to draws from $\mathcal N(0, K^{-1})$.

        $X = P_G (Z \odot D^{1/2}) P_A^\top$: the covariance of its row-major
        vectorisation is $(P_G \otimes P_A) \operatorname{diag}(D) (P_G \otimes
        P_A)^\top = K^{-1}$. Two matrix products per draw.
        """
        return self.P_G @ (noise.to(self.scale.dtype) * self.scale.sqrt()) @ self.P_A.T


def _whitened(chol: Tensor, second: Tensor) -> Tensor:
    r"""$C^{-1} S C^{-\top}$ for the lower Cholesky factor $C$ and a symmetric $S$.

    Two triangular solves from the right ($X = S C^{-\top}$, then $X^\top
    C^{-\top} = C^{-1} S C^{-\top}$, as $S$ is symmetric): $2n^3$ flops against
    $n^3$ for the explicit inverse $C^{-1}$ plus $4n^3$ for two products with
    it. Solves from the right take torch's row-major matrices as they are; the
    same solves from the left cost a third more on the CPU
    (``benchmarks/results/experiments/two_term_floor/``).
    """
    half = torch.linalg.solve_triangular(chol.mT, symmetrize(second), upper=True, left=False)
    whitened: Tensor = torch.linalg.solve_triangular(chol.mT, half.mT, upper=True, left=False)
    return whitened


def _whitened_basis(chol: Tensor, vectors: Tensor) -> Tensor:
    r"""$C^{-\top} U = (U^\top C^{-1})^\top$: one triangular solve from the right, $n^3$ flops.

    A product with $C^{-1}$ would cost $2n^3$ (see ``_whitened`` for the side).
    """
    basis: Tensor = torch.linalg.solve_triangular(chol, vectors.mT, upper=False, left=False).mT
    return basis


def _side(first: Tensor, second: Tensor, damping: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""One side's $C$, whitened eigenvalues $s$ and basis $P = C^{-\top} U$.

    A coordinate whose row is zero in both terms (a dead ReLU unit, a pixel that
    is zero in every image, ...) is decoupled: $C$ has $\sqrt{\gamma}$ there,
    $s$ a zero and $P$ the unit vector over $\sqrt{\gamma}$. On the CPU only the other
    coordinates are factorised and eigendecomposed, at the cube of their number,
    and ``eigh`` no longer meets the cluster of exact zeros that the decoupled
    ones give, on which float32 ``eigh`` failed to converge (and was retried) on
    the MNIST autoencoder's 1,000-row factors.
    """
    live = cpu_live_coordinates(first, second, eigh=True)
    chol, jitter = damped_cholesky(live_block(first, live), damping)
    decomposition = eigh(_whitened(chol, live_block(second, live)), clamp_negative=False)
    basis = _whitened_basis(chol, decomposition.vectors)
    n, root = first.shape[-1], math.sqrt(damping + jitter)
    values = decomposition.values
    if live is not None:
        values = values.new_zeros(n).index_copy_(0, live, values)
    return embed_live(chol, live, n, root), values, embed_live(basis, live, n, 1.0 / root)


def _condition_bound(P_G: Tensor, P_A: Tensor, floored: Tensor, diag_top: float) -> float:
    """The lower bound of ``KroneckerSumInverse.condition_number``."""
    norms = P_G.square().sum(0)[:, None] * P_A.square().sum(0)[None, :]
    quotients = floored / norms
    top = max(diag_top, float(quotients.max()))
    return max(top / float(quotients.min()), 1.0)


def two_term_inverse(
    G1: Tensor,
    A1: Tensor,
    G2: Tensor,
    A2: Tensor,
    damping: float,
    min_eig: float = 0.1,
    apply_dtype: ApplyDtype = None,
) -> KroneckerSumInverse:
    r"""Invert $(G_1 + \gamma_G I)\otimes(A_1 + \gamma_A I) + G_2 \otimes A_2$.

    The damping $\lambda$ is applied to the first term only, split by
    [`pi_split`][curvlib.linalg.factors.pi_split] ($\gamma_A\gamma_G = \lambda$),
    so the operator contains $\lambda I$ plus the factored cross terms.

    Args:
        G1: First term, output side (symmetric PSD).
        A1: First term, input side (symmetric PSD).
        G2: Second term, output side (symmetric, possibly indefinite).
        A2: Second term, input side (symmetric, possibly indefinite).
        damping: $\lambda > 0$.
        min_eig: The floor $\epsilon$ of the whitened eigenvalues (module docstring).
        apply_dtype: The dtype the inverse is applied in: ``None`` the factors'
            dtype, ``"auto"`` bfloat16 where
            [`resolve_apply_dtype`][curvlib.linalg.precision.resolve_apply_dtype]
            judges it safe and faster (by the inverse's condition bound and the
            apply's $d_o d_i (d_o + d_i)$ multiply-adds, as for KFAC's
            eigenbasis inverse), or a dtype.

    Returns:
        The inverse as an operator.

    Raises:
        ValueError: If ``min_eig`` is outside ``(0, 1]`` or ``apply_dtype`` is
            not one of the choices above.
    """
    if not 0.0 < min_eig <= 1.0:
        raise ValueError(f"min_eig must lie in (0, 1], got {min_eig!r}.")
    apply_dtype = check_apply_dtype(apply_dtype)
    gamma_a, gamma_g = pi_split(A1, G1, damping)
    c_g, values_g, P_G = _side(G1, G2, gamma_g)
    c_a, values_a, P_A = _side(A1, A2, gamma_a)
    whitened = 1.0 + values_g[:, None] * values_a[None, :]
    floored = whitened.clamp_min(min_eig)
    # Diagonal of the unfloored K: diag(G1') diag(A1')^T + diag(G2) diag(A2)^T.
    diag = (G1.diagonal() + gamma_g)[:, None] * (A1.diagonal() + gamma_a)[None, :]
    diag = diag + G2.diagonal()[:, None] * A2.diagonal()[None, :]
    condition = _condition_bound(P_G, P_A, floored, float(diag.max()))
    cost = apply_cost(*floored.shape)
    low = resolve_apply_dtype(apply_dtype, floored.dtype, floored.device, cost, condition=condition)
    return KroneckerSumInverse(
        P_G=flush_negligible(P_G),
        P_A=flush_negligible(P_A),
        scale=1.0 / floored,
        num_floored=int((whitened < min_eig).sum()),
        chol_G=c_g,
        chol_A=c_a,
        condition_number=condition,
        apply_dtype=low,
    )
