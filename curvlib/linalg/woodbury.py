r"""Woodbury solves in sample space: $(U^\top U + \lambda I)^{-1}$ without a $P \times P$ matrix.

$U \in \mathbb{R}^{m \times P}$ holds one per-sample gradient per row, already
scaled so that $U^\top U$ is the curvature (rows $\operatorname{vec}(\bar
W_{kn}) / \sqrt N$ give $F = \frac1N \sum_{k,n} \operatorname{vec}(\bar W_{kn})
\operatorname{vec}(\bar W_{kn})^\top$, [`curvlib.core.conventions`][curvlib.core.conventions]).
The Woodbury identity moves the inverse into the $m$-dimensional sample space,

$$(U^\top U + \lambda I)^{-1} g = \frac1\lambda\left(g - U^\top (\lambda I +
U U^\top)^{-1} U g\right),$$

so only the $m \times m$ kernel $K = U U^\top$ is factorised (Cholesky of
$\lambda I + K$). Cost: $O(m^2 P)$ for the kernel, $O(m^3)$ for the
factorisation, $O(mP + m^2)$ per applied vector; memory $O(mP + m^2)$. When
$m > P$ a direct $P \times P$ solve would be cheaper; these functions always work
in sample space.

The columns of $U$ may come in blocks, one per layer, $U = [U_1 \mid \dots
\mid U_L]$: then $K = \sum_l U_l U_l^\top$, $(Ug) = \sum_l U_l g_l$ and
$(U^\top c)_l = U_l^\top c$, so the layers are never concatenated. A block is a
[`LayerRows`][curvlib.linalg.woodbury.LayerRows] acting on per-layer
$[W \mid b]$ matrices:

* [`FactoredRows`][curvlib.linalg.woodbury.FactoredRows] for layers with one
  output position, whose rows are rank one, $\operatorname{vec}(g_{kn}\bar
  a_n^\top)$: kernel $K = (g g^\top) \odot (\bar a \bar a^\top)$ and products
  through $\bar a$ and $g$, never an ``m x out x in`` tensor;
* [`DenseRows`][curvlib.linalg.woodbury.DenseRows] for everything else (the
  per-sample gradients $\sum_t g_{knt}\bar a_{nt}^\top$ of a convolution).

Rows are indexed $k$-major, row $kN + n$ for column $k$ of sample $n$.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from curvlib.linalg.factors import damped_cholesky


class LayerRows(ABC):
    r"""One block of columns $U_l \in \mathbb{R}^{m \times P_l}$ of $U$, $P_l$ = ``out * in``.

    Row $r$ is the row-major flatten of an ``[out, in]`` matrix; products take
    and return such matrices (with any leading batch dimensions).
    """

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int, int]:
        """``(m, out, in)``: number of rows and the matrix shape of one row."""

    @property
    def num_rows(self) -> int:
        """``m``, the number of rows."""
        return self.shape[0]

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """The dtype products are computed in."""

    @abstractmethod
    def gram(self) -> Tensor:
        r"""The kernel block $U_l U_l^\top$, ``[m, m]``."""

    @abstractmethod
    def project(self, mats: Tensor) -> Tensor:
        r"""$U_l \operatorname{vec}(V)$ for ``mats`` $V$ ``[..., out, in]``, as ``[..., m]``."""

    @abstractmethod
    def expand(self, coeffs: Tensor) -> Tensor:
        r"""$U_l^\top c$ for ``coeffs`` $c$ of shape ``[..., m]``; ``[..., out, in]``."""

    @abstractmethod
    def dense(self) -> Tensor:
        """The rows as matrices, ``[m, out, in]`` (for dense forms and tests only)."""

    def column_sq_norms(self) -> Tensor:
        r"""Squared column norms of $U_l$, the diagonal of $U_l^\top U_l$, as ``[out, in]``.

        Default: from ``dense()``, $O(m P_l)$.
        """
        return self.dense().square().sum(0)

    def row_sq_norms(self) -> Tensor:
        r"""Squared row norms of $U_l$, the diagonal of $U_l U_l^\top$, as ``[m]``.

        Default: from ``dense()``, $O(m P_l)$.
        """
        return self.dense().flatten(1).square().sum(1)

    @property
    def device(self) -> torch.device:
        """The device of the stored rows."""
        return self.dense().device


class FactoredRows(LayerRows):
    r"""Rank-one rows $\operatorname{vec}(g_{kn} \bar a_n^\top)$, kept as their two factors.

    Kernel $K_{kn, k'n'} = (g_{kn}^\top g_{k'n'})(\bar a_n^\top \bar a_{n'})$ in
    $O(m^2\, d_\text{out} + N^2 d_\text{in})$; projections
    $c_{kn} = g_{kn}^\top V \bar a_n$ and expansions
    $\sum_{kn} c_{kn} g_{kn} \bar a_n^\top$ in
    $O(N d_\text{out} d_\text{in} + m\, d_\text{out})$ per vector.

    Args:
        inputs: $\bar a_n$, ``[N, in]``.
        output_grads: $g_{kn}$, ``[K, N, out]``.
        scale: Multiplies every row (e.g. $1/\sqrt N$).
    """

    def __init__(self, inputs: Tensor, output_grads: Tensor, scale: float = 1.0) -> None:
        if inputs.dim() != 2 or output_grads.dim() != 3 or output_grads.shape[1] != inputs.shape[0]:
            raise ValueError(
                f"Expected inputs [N, in] and output_grads [K, N, out], got "
                f"{tuple(inputs.shape)} and {tuple(output_grads.shape)}."
            )
        self.inputs = inputs
        self.output_grads = output_grads * scale

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(K * N, out, in)``."""
        k, n, out = self.output_grads.shape
        return k * n, out, self.inputs.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored factors."""
        return self.inputs.dtype

    def gram(self) -> Tensor:
        """The kernel, a Hadamard product of the two factor Gram matrices."""
        k = self.output_grads.shape[0]
        flat = self.output_grads.reshape(-1, self.output_grads.shape[-1])
        return (flat @ flat.T) * (self.inputs @ self.inputs.T).repeat(k, k)

    def project(self, mats: Tensor) -> Tensor:
        r"""Row products $g_{kn}^\top V \bar a_n$."""
        va = mats.to(self.dtype) @ self.inputs.T  # [..., out, N]
        coeffs = torch.einsum("kno,...on->...kn", self.output_grads, va)
        return coeffs.reshape(*coeffs.shape[:-2], -1)

    def expand(self, coeffs: Tensor) -> Tensor:
        r"""$\sum_{kn} c_{kn} g_{kn} \bar a_n^\top$ as $(\sum_k c_{kn} g_{kn})_n\, \bar A$."""
        k, n, _ = self.output_grads.shape
        c = coeffs.to(self.dtype).reshape(*coeffs.shape[:-1], k, n)
        weighted = torch.einsum("...kn,kno->...on", c, self.output_grads)  # [..., out, N]
        return weighted @ self.inputs

    @property
    def device(self) -> torch.device:
        """The device of the stored factors."""
        return self.inputs.device

    def row_sq_norms(self) -> Tensor:
        r"""$\|g_{kn}\|^2 \|\bar a_n\|^2$, $O(m d_\text{out} + N d_\text{in})$."""
        norms = self.output_grads.square().sum(-1) * self.inputs.square().sum(-1)
        return norms.reshape(-1)

    def column_sq_norms(self) -> Tensor:
        r"""$\sum_{kn} g_{kno}^2 \bar a_{ni}^2$, $O(N d_\text{out} d_\text{in})$."""
        return self.output_grads.square().sum(0).T @ self.inputs.square()

    def dense(self) -> Tensor:
        """The rank-one matrices, ``[K * N, out, in]``."""
        rows = torch.einsum("kno,ni->knoi", self.output_grads, self.inputs)
        return rows.reshape(self.shape)


class DenseRows(LayerRows):
    r"""Rows stored as matrices, ``[m, out, in]``.

    Kernel in $O(m^2 P_l)$, products in $O(m P_l)$ per vector.

    Args:
        rows: The row matrices, ``[m, out, in]``.
        scale: Multiplies every row.
    """

    def __init__(self, rows: Tensor, scale: float = 1.0) -> None:
        if rows.dim() != 3:
            raise ValueError(f"Expected rows [m, out, in], got {tuple(rows.shape)}.")
        self.rows = rows * scale

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(m, out, in)``."""
        m, out, inp = self.rows.shape
        return m, out, inp

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored rows."""
        return self.rows.dtype

    def gram(self) -> Tensor:
        r"""The kernel $U_l U_l^\top$."""
        flat = self.rows.flatten(1)
        return flat @ flat.T

    def project(self, mats: Tensor) -> Tensor:
        r"""Row products $\langle U_{l,r}, V\rangle$."""
        return mats.to(self.dtype).flatten(-2) @ self.rows.flatten(1).T

    def expand(self, coeffs: Tensor) -> Tensor:
        """Weighted sum of the row matrices."""
        flat = coeffs.to(self.dtype) @ self.rows.flatten(1)
        return flat.reshape(*flat.shape[:-1], *self.rows.shape[1:])

    def dense(self) -> Tensor:
        """The stored rows."""
        return self.rows

    @property
    def device(self) -> torch.device:
        """The device of the stored rows."""
        return self.rows.device


class RowsWithGram(LayerRows):
    r"""A layer's rows together with their kernel block $U_l U_l^\top$, computed elsewhere.

    In data-parallel training each layer's kernel block is computed by the rank
    that owns the layer and broadcast
    ([`ExactNaturalGradient.grams`][curvlib.approx.natural_gradient.ExactNaturalGradient.grams]);
    every rank then builds the sample-space inverse from these blocks
    (``gram`` returns the given one) and applies it through its own rows
    (every other method delegates to ``rows``).

    Args:
        rows: The layer's rows.
        gram: Their kernel block, ``[m, m]``.

    Raises:
        ValueError: If ``gram`` is not ``[m, m]``.
    """

    def __init__(self, rows: LayerRows, gram: Tensor) -> None:
        m = rows.num_rows
        if gram.shape != (m, m):
            raise ValueError(f"Expected a [{m}, {m}] kernel block, got {tuple(gram.shape)}.")
        self.rows = rows
        self._gram = gram

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of ``rows``."""
        return self.rows.shape

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of ``rows``."""
        return self.rows.dtype

    def gram(self) -> Tensor:
        """The given kernel block."""
        return self._gram

    def project(self, mats: Tensor) -> Tensor:
        """``rows.project``."""
        return self.rows.project(mats)

    def expand(self, coeffs: Tensor) -> Tensor:
        """``rows.expand``."""
        return self.rows.expand(coeffs)

    def dense(self) -> Tensor:
        """``rows.dense``."""
        return self.rows.dense()

    def column_sq_norms(self) -> Tensor:
        """``rows.column_sq_norms``."""
        return self.rows.column_sq_norms()

    def row_sq_norms(self) -> Tensor:
        """``rows.row_sq_norms``."""
        return self.rows.row_sq_norms()

    @property
    def device(self) -> torch.device:
        """The device of ``rows``."""
        return self.rows.device


def layer_rows(inputs: Tensor, output_grads: Tensor, scale: float = 1.0) -> LayerRows:
    r"""The per-sample gradient rows of one layer from its inputs and output gradients.

    Row $(k, n)$ is $\operatorname{vec}(\sum_t g_{knt} \bar a_{nt}^\top)$ times
    ``scale``. Layers with one output position ($T = 1$) keep the factors
    ([`FactoredRows`][curvlib.linalg.woodbury.FactoredRows]); others form the
    per-sample gradients ([`DenseRows`][curvlib.linalg.woodbury.DenseRows]).

    Args:
        inputs: $\bar a_{nt}$, ``[N, T, in]``.
        output_grads: $g_{knt}$, ``[K, N, T, out]``.
        scale: Multiplies every row.

    Returns:
        The rows, ``m = K * N``.
    """
    if inputs.dim() != 3 or output_grads.dim() != 4 or inputs.shape[:2] != output_grads.shape[1:3]:
        raise ValueError(
            f"Expected inputs [N, T, in] and output_grads [K, N, T, out], got "
            f"{tuple(inputs.shape)} and {tuple(output_grads.shape)}."
        )
    if inputs.shape[1] == 1:
        return FactoredRows(inputs[:, 0], output_grads[:, :, 0], scale)
    grads = torch.einsum("knto,nti->knoi", output_grads, inputs)
    return DenseRows(grads.reshape(-1, *grads.shape[2:]), scale)


class WoodburyInverse:
    r"""$(U^\top U + \lambda I)^{-1}$ for $U = [U_1 \mid \dots \mid U_L]$, in sample space.

    Building it forms the $m \times m$ kernel $\sum_l U_l U_l^\top$ and its
    damped Cholesky factor (module docstring); applying it costs two products
    with $U$ and two triangular solves of size $m$.

    Args:
        blocks: The column blocks of $U$ (one per layer), all with ``m`` rows.
        damping: $\lambda > 0$.

    Raises:
        ValueError: If ``damping`` is not positive and finite, or the blocks have
            different numbers of rows.
        FactorizationError: If the damped kernel cannot be factorised.
    """

    def __init__(self, blocks: Sequence[LayerRows], damping: float) -> None:
        if not 0.0 < damping < float("inf"):
            raise ValueError(f"damping must be positive and finite, got {damping!r}.")
        if not blocks or len({b.num_rows for b in blocks}) != 1:
            raise ValueError(
                f"Need at least one block, all with the same number of rows; got "
                f"{[b.num_rows for b in blocks]}."
            )
        self.blocks = tuple(blocks)
        self.damping = float(damping)
        kernel = blocks[0].gram()
        for block in blocks[1:]:
            kernel = kernel + block.gram()
        self.chol, self.jitter = damped_cholesky(kernel, self.damping)
        self._kernel_diag = kernel.diagonal().clone()

    @property
    def num_params(self) -> int:
        r"""$P = \sum_l P_l$, the number of columns of $U$."""
        return sum(b.shape[1] * b.shape[2] for b in self.blocks)

    def logdet(self) -> Tensor:
        r"""$\log\det(U^\top U + \lambda I)$ by the matrix determinant lemma.

        $\det(\lambda I_P + U^\top U) = \lambda^{P - m} \det(\lambda I_m + UU^\top)$,
        so $\log\det = (P - m)\log\lambda + 2\sum_i \log L_{ii}$ with the stored
        Cholesky factor: $O(m)$ (the jitter of a retried factorisation, if any,
        is included).
        """
        m = self.chol.shape[0]
        return (self.num_params - m) * math.log(self.damping) + 2.0 * torch.log(
            self.chol.diagonal()
        ).sum()

    def condition_estimate(self) -> float:
        r"""A lower bound of the condition number of $U^\top U + \lambda I$.

        $\lambda_\max$ is at least $\lambda$ plus the largest diagonal entry of
        either Gram matrix, $UU^\top$ (the squared row norms) or $U^\top U$ (the
        squared column norms; both have the same nonzero eigenvalues).
        $\lambda_\min$ equals $\lambda$ when $m < P$ ($U^\top U$ is singular):
        then the cost is $O(m)$. When $m \ge P$ it is at most $\lambda$ plus the
        smallest squared column norm, which costs ``column_sq_norms`` of each
        block, $O(mP)$, below the $O(m^2 P)$ of the kernel.
        """
        top = self.damping + float(self._kernel_diag.max())
        bottom = self.damping
        if self.chol.shape[0] >= self.num_params:
            columns = [b.column_sq_norms() for b in self.blocks]
            top = max(top, self.damping + max(float(c.max()) for c in columns))
            bottom += min(float(c.min()) for c in columns)
        return max(top / bottom, 1.0)

    @property
    def kernel_shape(self) -> tuple[int, int]:
        """Shape of the factorised kernel, ``(m, m)``."""
        m, n = self.chol.shape
        return m, n

    def solve_kernel(self, coeffs: Tensor) -> Tensor:
        r"""$(\lambda I + K)^{-1} c$ for ``coeffs`` of shape ``[..., m]``."""
        m = self.chol.shape[0]
        flat = coeffs.reshape(-1, m).T
        solved = torch.cholesky_solve(flat, self.chol)
        return solved.T.reshape(coeffs.shape)

    def __call__(self, mats: Sequence[Tensor]) -> list[Tensor]:
        r"""Apply the inverse to one ``[..., out_l, in_l]`` matrix per block.

        Args:
            mats: $g_l$, in the order of ``blocks``, with the same leading dimensions.

        Returns:
            $((U^\top U + \lambda I)^{-1} g)_l$ per block.
        """
        if len(mats) != len(self.blocks):
            raise ValueError(f"Expected {len(self.blocks)} matrices, got {len(mats)}.")
        coeffs = self.blocks[0].project(mats[0])
        for block, mat in zip(self.blocks[1:], mats[1:], strict=True):
            coeffs = coeffs + block.project(mat)
        solved = self.solve_kernel(coeffs)
        return [
            (mat.to(block.dtype) - block.expand(solved)) / self.damping
            for block, mat in zip(self.blocks, mats, strict=True)
        ]


class WoodburyInverseSqrt:
    r"""$(U^\top U + \lambda I)^{-1/2}$ in sample space: draws from its Gaussian.

    With the eigendecomposition of the kernel $UU^\top = W \operatorname{diag}(s) W^\top$
    (the left singular vectors and squared singular values of the thin SVD
    $U = W \Sigma V^\top$, without forming $V$),

    $$(U^\top U + \lambda I)^{-1/2} z = \frac{z}{\sqrt\lambda} + U^\top W
    \operatorname{diag}(c)\, W^\top U z, \qquad c_i = \frac{-1}{\sqrt\lambda
    \sqrt{\lambda + s_i}\,(\sqrt\lambda + \sqrt{\lambda + s_i})},$$

    since on the right singular vectors $v_i$ it multiplies by
    $1/\sqrt\lambda + s_i c_i = 1/\sqrt{\lambda + s_i}$ and by $1/\sqrt\lambda$
    on their orthogonal complement ($c_i$ is written so that it stays accurate
    for $s_i \to 0$). Applied to standard normal $z$ it gives draws with
    covariance $(U^\top U + \lambda I)^{-1}$. Cost: kernel $O(m^2 P)$ and one
    ``eigh`` $O(m^3)$ to build, two products with $U$, $O(mP)$, per draw.

    Args:
        blocks: The column blocks of $U$, all with ``m`` rows.
        damping: $\lambda > 0$.
    """

    def __init__(self, blocks: Sequence[LayerRows], damping: float) -> None:
        if not 0.0 < damping < float("inf"):
            raise ValueError(f"damping must be positive and finite, got {damping!r}.")
        self.blocks = tuple(blocks)
        self.damping = float(damping)
        kernel = blocks[0].gram()
        for block in blocks[1:]:
            kernel = kernel + block.gram()
        s, self.vectors = torch.linalg.eigh((kernel + kernel.T) / 2)
        s = s.clamp_min(0.0)
        root, shifted = math.sqrt(self.damping), (s + self.damping).sqrt()
        self.coeffs = -1.0 / (root * shifted * (root + shifted))

    def __call__(self, mats: Sequence[Tensor]) -> list[Tensor]:
        """Apply the inverse square root to one ``[..., out_l, in_l]`` matrix per block."""
        coeffs = self.blocks[0].project(mats[0])
        for block, mat in zip(self.blocks[1:], mats[1:], strict=True):
            coeffs = coeffs + block.project(mat)
        coeffs = ((coeffs @ self.vectors) * self.coeffs) @ self.vectors.T
        root = math.sqrt(self.damping)
        return [
            mat.to(block.dtype) / root + block.expand(coeffs)
            for block, mat in zip(self.blocks, mats, strict=True)
        ]


def gram_matvec(blocks: Sequence[LayerRows], mats: Sequence[Tensor]) -> list[Tensor]:
    r"""$(U^\top U) v$ for $U = [U_1 \mid \dots \mid U_L]$: $U_l^\top \sum_{l'} U_{l'} v_{l'}$.

    Cost $O(mP)$ per vector (less for factored blocks).

    Args:
        blocks: The column blocks of $U$.
        mats: One ``[..., out_l, in_l]`` matrix per block.

    Returns:
        The product, one matrix per block.
    """
    if len(mats) != len(blocks) or not blocks:
        raise ValueError(f"Expected {len(blocks)} matrices (at least one), got {len(mats)}.")
    coeffs = blocks[0].project(mats[0])
    for block, mat in zip(blocks[1:], mats[1:], strict=True):
        coeffs = coeffs + block.project(mat)
    return [block.expand(coeffs) for block in blocks]


def woodbury_solve(rows: Tensor, vectors: Tensor, damping: float) -> Tensor:
    r"""$(U^\top U + \lambda I)^{-1} v$ for a dense $U$, without a $P \times P$ matrix.

    Args:
        rows: $U$, ``[m, P]``.
        vectors: $v$, ``[..., P]``.
        damping: $\lambda > 0$.

    Returns:
        ``[..., P]``.
    """
    inverse = WoodburyInverse([DenseRows(rows.unsqueeze(1))], damping)
    return inverse([vectors.unsqueeze(-2)])[0].squeeze(-2)


def dense_gram_matvec(rows: Tensor, vectors: Tensor) -> Tensor:
    r"""$(U^\top U) v = U^\top (U v)$ for a dense $U$ ``[m, P]`` and $v$ ``[..., P]``."""
    return (vectors.to(rows.dtype) @ rows.T) @ rows
