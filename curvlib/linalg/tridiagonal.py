r"""The block-tridiagonal Fisher of a stack of layers, solved in sample space.

With the per-sample gradient rows of $L$ layers, $U = [U_1 \mid \dots \mid U_L]$
($U_l \in \mathbb{R}^{m\times P_l}$, the rows of
[`curvlib.linalg.woodbury`][curvlib.linalg.woodbury]), the Fisher is $F = U^\top U$
with blocks $F_{ll'} = U_l^\top U_{l'}$. Its block-tridiagonal part keeps the
blocks with $|l - l'| \le 1$ and is again a low-rank product,

$$F_\text{tri} = \mathcal U^\top (T \otimes I_m)\, \mathcal U, \qquad
\mathcal U = \operatorname{blockdiag}(U_1, \dots, U_L), \qquad
T_{ll'} = [\,|l - l'| \le 1\,],$$

with $T$ the $L\times L$ tridiagonal matrix of ones. With $S = T\otimes I_m$ and
the block-diagonal kernel $K = \mathcal U\mathcal U^\top =
\operatorname{blockdiag}(K_l)$, $K_l = U_l U_l^\top$, the push-through identity
gives, for $\rho > 0$,

$$(F_\text{tri} + \rho I)^{-1} g = \frac1\rho\Big(g - \mathcal U^\top
(\rho I_{Lm} + S K)^{-1} S\,\mathcal U g\Big),$$

which needs no inverse of $S$ (singular for $L = 2, 5, 8, \dots$) and never forms
a $P\times P$ matrix. Block row $l$ of the $Lm\times Lm$ system reads
$\rho y_l + K_{l-1}y_{l-1} + K_l y_l + K_{l+1} y_{l+1} = b_l$: a block-tridiagonal,
non-symmetric system. It is solved by a pivoted LU factorisation: block
elimination without pivoting breaks down exactly where the system matters (for
$L = 3$ and $\rho\to0$ the second Schur complement vanishes although the system
is regular).

**Singular systems.** $F_\text{tri}$ is the tridiagonal truncation of a positive
semi-definite matrix and is indefinite in general, so $F_\text{tri} + \rho I$ can
be singular for a positive $\rho$; by Sylvester's determinant identity
$\det(\rho I_P + \mathcal U^\top S\mathcal U) = \rho^{P - Lm}
\det(\rho I_{Lm} + SK)$, so it is singular exactly when the sample-space system
is. A factorisation whose smallest pivot is below ``Lm`` machine epsilons of the
largest is refused with a
[`FactorizationError`][curvlib.linalg.factors.FactorizationError] that says why.

Cost with $m$ rows and $P = \sum_l P_l$ parameters: the kernels $O(m^2 P)$
($O(m^2 d_\text{out} + N^2 d_\text{in})$ for one-position layers), the LU
factorisation $O(L^3 m^3)$, and $O(mP + L^2m^2)$ per vector.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from curvlib.linalg.factors import FactorizationError
from curvlib.linalg.woodbury import LayerRows


def pattern_matrix(num_layers: int, dtype: torch.dtype = torch.float64) -> Tensor:
    r"""$T$, the ``num_layers`` square tridiagonal matrix of ones.

    Its eigenvalues are $1 + 2\cos(k\pi/(L+1))$, $k = 1, \dots, L$: it is
    singular exactly when $L + 1$ is a multiple of 3.

    Raises:
        ValueError: If ``num_layers`` is not positive.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be positive, got {num_layers}.")
    idx = torch.arange(num_layers)
    return ((idx[:, None] - idx[None, :]).abs() <= 1).to(dtype)


def pattern_is_singular(num_layers: int) -> bool:
    """Whether the tridiagonal pattern $T$ of ``num_layers`` layers is singular."""
    return (num_layers + 1) % 3 == 0


def _singular_message(num_layers: int, size: int, ratio: float, damping: float) -> str:
    why = (
        f"with damping 0 and L = {num_layers} layers the tridiagonal pattern T is singular "
        "(L + 1 is a multiple of 3), so the undamped block-tridiagonal system has no unique "
        "solution; use damping > 0"
        if damping == 0.0 and pattern_is_singular(num_layers)
        else "the block-tridiagonal Fisher is indefinite in general, so F_tri + damping * I "
        "can be singular or nearly so; change the damping (a larger value moves it away "
        "from the negative eigenvalues of F_tri), or use ExactNaturalGradient or "
        "BlockNaturalGradient, which are positive definite"
    )
    return (
        f"The {size}x{size} block-tridiagonal sample-space system rho*I + (T kron I) K is "
        f"singular to working precision (smallest/largest LU pivot {ratio:.1e}): {why}."
    )


class TridiagonalKernel:
    r"""The factorised sample-space system $\rho I_{Lm} + (T\otimes I_m) K$.

    Args:
        blocks: The column blocks $U_l$ of the layers, in the order that defines
            the neighbours, all with ``m`` rows.
        damping: $\rho \ge 0$ (0 for the function-space form).
        kernel_shift: Optional ``[m, m]`` matrix added to every $K_l$ (the
            projector onto a known common null space of the kernels, see
            [`function_space_direction`][curvlib.approx.wide.function_space_direction]).

    Raises:
        ValueError: If ``damping`` is negative or not finite, or the blocks have
            different numbers of rows.
        FactorizationError: If the system is singular to working precision.
    """

    def __init__(
        self, blocks: Sequence[LayerRows], damping: float, kernel_shift: Tensor | None = None
    ) -> None:
        if not 0.0 <= damping < math.inf:
            raise ValueError(f"damping must be non-negative and finite, got {damping!r}.")
        if not blocks or len({b.num_rows for b in blocks}) != 1:
            raise ValueError(
                "Need at least one block, all with the same number of rows; got "
                f"{[b.num_rows for b in blocks]}."
            )
        self.blocks = tuple(blocks)
        self.damping = float(damping)
        num_layers, m = len(blocks), blocks[0].num_rows
        kernels = [b.gram() for b in blocks]
        if kernel_shift is not None:
            kernels = [k + kernel_shift.to(k.dtype) for k in kernels]
        dtype, device = kernels[0].dtype, kernels[0].device
        system = torch.zeros(num_layers * m, num_layers * m, dtype=dtype, device=device)
        for row in range(num_layers):
            for col in range(max(0, row - 1), min(num_layers, row + 2)):
                system[row * m : (row + 1) * m, col * m : (col + 1) * m] = kernels[col]
        system.diagonal().add_(self.damping)
        self.lu, self.pivots, info = torch.linalg.lu_factor_ex(system)
        pivots = self.lu.diagonal().abs()
        top = float(pivots.max()) if pivots.numel() else 0.0
        ratio = float(pivots.min()) / top if top > 0.0 else 0.0
        tol = system.shape[0] * torch.finfo(dtype).eps
        if int(info) != 0 or not ratio > tol:
            raise FactorizationError(
                _singular_message(num_layers, system.shape[0], ratio, self.damping)
            )
        self.pivot_ratio = ratio
        """Smallest over largest LU pivot: a cheap indicator of how close to singular."""

    @property
    def num_rows(self) -> int:
        """``m``, the rows of each block."""
        return self.blocks[0].num_rows

    def solve(self, rhs: Tensor) -> Tensor:
        r"""$(\rho I + SK)^{-1} b$ for ``rhs`` $b$ of shape ``[..., L, m]``."""
        num_layers, m = len(self.blocks), self.num_rows
        flat = rhs.reshape(-1, num_layers * m).T
        solved: Tensor = torch.linalg.lu_solve(self.lu, self.pivots, flat)
        return solved.T.reshape(rhs.shape)

    def neighbour_sums(self, coeffs: Tensor) -> Tensor:
        r"""$S c$: $(Sc)_l = c_{l-1} + c_l + c_{l+1}$ over ``[..., L, m]``."""
        out = coeffs.clone()
        out[..., 1:, :] += coeffs[..., :-1, :]
        out[..., :-1, :] += coeffs[..., 1:, :]
        return out


class BlockTridiagonalInverse:
    r"""$(F_\text{tri} + \rho I)^{-1}$ for $\rho > 0$, by the push-through identity.

    See the module docstring for the formula, the singular cases and the cost.

    Args:
        blocks: The column blocks $U_l$, in the order that defines the neighbours.
        damping: $\rho > 0$.

    Raises:
        ValueError: If ``damping`` is not positive and finite.
        FactorizationError: If $F_\text{tri} + \rho I$ is singular to working precision.
    """

    def __init__(self, blocks: Sequence[LayerRows], damping: float) -> None:
        if not 0.0 < damping < math.inf:
            raise ValueError(f"damping must be positive and finite, got {damping!r}.")
        self.kernel = TridiagonalKernel(blocks, damping)
        self.blocks = self.kernel.blocks
        self.damping = float(damping)

    def __call__(self, mats: Sequence[Tensor]) -> list[Tensor]:
        """Apply the inverse to one ``[..., out_l, in_l]`` matrix per block."""
        if len(mats) != len(self.blocks):
            raise ValueError(f"Expected {len(self.blocks)} matrices, got {len(mats)}.")
        coeffs = torch.stack(
            [block.project(mat) for block, mat in zip(self.blocks, mats, strict=True)], dim=-2
        )
        solved = self.kernel.solve(self.kernel.neighbour_sums(coeffs))
        return [
            (mat.to(block.dtype) - block.expand(solved[..., index, :])) / self.damping
            for index, (block, mat) in enumerate(zip(self.blocks, mats, strict=True))
        ]


def tridiagonal_matvec(blocks: Sequence[LayerRows], mats: Sequence[Tensor]) -> list[Tensor]:
    r"""$F_\text{tri} v$: $(F_\text{tri}v)_l = U_l^\top\sum_{|l'-l|\le1} U_{l'}v_{l'}$, $O(mP)$."""
    if len(mats) != len(blocks) or not blocks:
        raise ValueError(f"Expected {len(blocks)} matrices (at least one), got {len(mats)}.")
    coeffs = [block.project(mat) for block, mat in zip(blocks, mats, strict=True)]
    out = []
    for index, block in enumerate(blocks):
        total = coeffs[index]
        if index > 0:
            total = total + coeffs[index - 1]
        if index + 1 < len(blocks):
            total = total + coeffs[index + 1]
        out.append(block.expand(total))
    return out
