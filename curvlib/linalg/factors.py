r"""Symmetric positive semi-definite factors: robust ``eigh`` and damped inverses.

All functions act on one square matrix (or a batch of them) and keep its dtype.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy
import torch
import torch.nn.functional as F
from torch import Tensor


class FactorizationError(RuntimeError):
    """A factorisation failed even after adding jitter."""


def _largest_subnormal(dtype: torch.dtype) -> float:
    """The largest subnormal number of ``dtype``: ``tiny * (1 - eps)``, exact in that dtype."""
    info = torch.finfo(dtype)
    return info.tiny * (1.0 - info.eps)


def flush_subnormals(mat: Tensor) -> Tensor:
    r"""``mat`` with its subnormal entries ($0 < |x| <$ ``finfo.tiny``) set to zero.

    Factors fitted by iterations (power iterations, eigendecompositions) pick up
    entries far below the normal range where a direction carries no curvature
    (e.g. a dead ReLU unit); x86 processors multiply those through microcode
    assists, which made every product with such a factor about twice as slow
    (measured on the MNIST autoencoder's KPSVD apply: 256 ms against 129 ms per
    step). They are far below any scale that matters next to the damping.

    One fused pass (``hardshrink`` at the largest subnormal); NaN and Inf entries
    are kept, so the checks downstream still see them. The result is contiguous
    (an eigenbasis comes back from LAPACK in column order).
    """
    return F.hardshrink(mat, _largest_subnormal(mat.dtype)).contiguous()


def flush_subnormals_(mat: Tensor) -> Tensor:
    """[`flush_subnormals`][curvlib.linalg.flush_subnormals] in place: ``mat`` itself, flushed.

    For a tensor the caller has just made: writing into it instead of into a new
    one saves an allocation, which for a factor of a few hundred rows costs
    about as much as the pass itself. The layout of ``mat`` is kept.
    """
    torch.ops.aten.hardshrink.out(mat, _largest_subnormal(mat.dtype), out=mat)
    return mat


def flush_negligible(mat: Tensor) -> Tensor:
    r"""``mat`` with the entries at or below $\epsilon \max_{ij} |m_{ij}|$ set to zero.

    For the matrices a preconditioner multiplies with at every step (inverse
    factors, eigenbases). Changing entries by at most $\epsilon \max|m_{ij}|$
    perturbs a product $MV$ by no more than the rounding error bound of the
    product itself, $n \epsilon \|M\|\|V\|$, but it removes the tiny normal
    entries whose products with small gradient entries land in the subnormal
    range: those made the KPSVD apply on the MNIST autoencoder 40% slower
    although no factor had a subnormal entry.

    Two passes (``aminmax``, then ``hardshrink``) and one host read. A matrix
    with a NaN or Inf entry is returned unchanged, for the checks downstream to
    see. The result is contiguous. Callers that read many numbers at once take
    the extremes themselves and call
    [`flush_below`][curvlib.linalg.factors.flush_below].
    """
    if mat.numel() == 0:
        return mat
    low, high = torch.aminmax(mat)
    return flush_below(mat, negligible_limit(float(low), float(high), mat.dtype))


def negligible_limit(low: float, high: float, dtype: torch.dtype) -> float | None:
    r"""[`flush_negligible`][curvlib.linalg.flush_negligible]'s limit from a matrix's extremes.

    $\max(\epsilon \max(-\text{low}, \text{high}), s)$ with $s$ the largest
    subnormal number of ``dtype``; ``None`` when it is not finite (the matrix
    has a NaN or Inf entry and is to be kept as it is).
    """
    limit = torch.finfo(dtype).eps * max(-low, high)
    if not math.isfinite(limit):
        return None
    return max(limit, _largest_subnormal(dtype))


def device_negligible_limit(low: Tensor, high: Tensor, dtype: torch.dtype) -> Tensor:
    """[`negligible_limit`][curvlib.linalg.factors.negligible_limit] without a host read.

    A 0-dimensional float64 tensor on the extremes' device, ``-1`` where the
    limit is not finite (for [`flush_below`][curvlib.linalg.factors.flush_below]
    to flush nothing). Flushing with it gives the same bits as flushing with
    ``negligible_limit``'s number.
    """
    limit = torch.finfo(dtype).eps * torch.maximum(-low.double(), high.double())
    floor = limit.clamp_min(_largest_subnormal(dtype))
    return torch.where(torch.isfinite(limit), floor, -1.0)


def flush_below(mat: Tensor, limit: float | Tensor | None) -> Tensor:
    """``mat`` (contiguous) with the entries of magnitude at most ``limit`` set to zero.

    ``limit=None`` flushes nothing (see
    [`negligible_limit`][curvlib.linalg.factors.negligible_limit]); so does a
    negative limit given as a 0-dimensional tensor
    ([`device_negligible_limit`][curvlib.linalg.factors.device_negligible_limit]),
    compared on the device in ``mat``'s dtype as ``hardshrink`` compares a number.
    """
    if limit is None:
        return mat.contiguous()
    if isinstance(limit, Tensor):
        return torch.where(mat.abs() <= limit, 0.0, mat).contiguous()
    return F.hardshrink(mat, limit).contiguous()


def flush_below_(mat: Tensor, limit: float | Tensor | None) -> Tensor:
    """[`flush_below`][curvlib.linalg.factors.flush_below] in place, for a matrix just made.

    ``mat`` itself, flushed, where it is contiguous (an inverse fresh from its
    factorisation): the same bits as ``flush_below`` without a new tensor, whose
    first writes cost about as much as the pass itself for a factor of a few
    hundred rows. A matrix that is not contiguous gets ``flush_below``'s new tensor.
    """
    if not mat.is_contiguous():
        return flush_below(mat, limit)
    if limit is None:
        return mat
    if isinstance(limit, Tensor):
        return mat.masked_fill_(mat.abs() <= limit, 0.0)
    torch.ops.aten.hardshrink.out(mat, limit, out=mat)
    return mat


def flush_negligible_(mat: Tensor) -> Tensor:
    """[`flush_negligible`][curvlib.linalg.flush_negligible] in place (``flush_below_``)."""
    if mat.numel() == 0:
        return mat
    low, high = torch.aminmax(mat)
    return flush_below_(mat, negligible_limit(float(low), float(high), mat.dtype))


def symmetrize(mat: Tensor) -> Tensor:
    r"""Return $(M + M^\top) / 2$ (a new tensor)."""
    return torch.add(mat, mat.transpose(-1, -2)).mul_(0.5)


def gram(x: Tensor, blocks: int = 1, right: Tensor | None = None) -> Tensor:
    r"""$x^\top x$ for ``x`` ``[n, d]`` (or $x^\top y$), exactly symmetric when ``blocks > 1``.

    With ``blocks`` $= k > 1$ the columns are split into $k$ blocks and each
    block row is one GEMM with the columns from its diagonal block on; the
    blocks below the diagonal are the transposes of those above. That is
    $(k + 1) / 2k$ of a GEMM's multiply-adds (5/8 at $k = 4$), worth it where
    the GEMMs stay large ([`gram_blocks`][curvlib.linalg.factors.gram_blocks]).
    ``blocks=1`` is the GEMM itself.

    ``right`` ($y$, the shape of $x$) gives $x^\top y$ for a product the caller
    knows to be symmetric, such as $\sum_s x_s^\top C_s x_s$ with symmetric
    $C_s$ ($y_s = C_s x_s$): the upper triangle is computed, and mirrored.
    """
    y = x if right is None else right
    cols = x.shape[-1]
    if blocks <= 1 or cols < blocks:
        return x.mT @ y
    edges = [cols * i // blocks for i in range(blocks + 1)]
    out = x.new_empty(cols, cols)
    for lo, hi in itertools.pairwise(edges):
        row = x[:, lo:hi].mT @ y[:, lo:]  # [hi - lo, cols - lo]
        diagonal = row[:, : hi - lo]
        out[lo:hi, lo:hi] = diagonal.triu().add_(diagonal.triu(1).mT)
        out[lo:hi, hi:] = row[:, hi - lo :]
        out[hi:, lo:hi] = row[:, hi - lo :].mT
    return out


MIN_GRAM_BLOCK_ROWS = 384
r"""The fewest rows ``n`` of ``x`` for which ``gram_blocks`` splits $x^\top x$ on the CPU."""

MIN_GRAM_BLOCK_COLS = 512
r"""The fewest columns ``d`` of ``x`` for which ``gram_blocks`` splits $x^\top x$ on the CPU."""


def gram_blocks(x: Tensor) -> int:
    """The ``blocks`` for [`gram`][curvlib.linalg.factors.gram] of ``x`` ``[n, d]``: 4 or 1.

    4 for a matrix on the CPU with at least ``MIN_GRAM_BLOCK_ROWS`` rows and
    ``MIN_GRAM_BLOCK_COLS`` columns, else 1: below that the smaller GEMMs run
    further from the machine's peak than the saved multiply-adds are worth
    (``benchmarks/results/experiments/factor_gram/``). Other devices keep one GEMM.
    """
    if x.dim() != 2 or x.device.type != "cpu":
        return 1
    rows, cols = x.shape
    return 4 if rows >= MIN_GRAM_BLOCK_ROWS and cols >= MIN_GRAM_BLOCK_COLS else 1


MIN_ZERO_COLUMN_GRAM_COST = 2.0**27
r"""The fewest multiply-adds ($n d^2$) of a product in which ``factor_gram`` looks for zero columns.

Below it (about 1.5 ms on two cores), copying the other columns out and the
product back costs more than the smaller product saves
(``benchmarks/results/experiments/unfold/zero_columns.txt``).
"""

MIN_ZERO_COLUMN_FRACTION = 1 / 4
"""The fraction of zero columns from which ``factor_gram`` leaves them out of the product."""


def factor_gram(x: Tensor) -> Tensor:
    r"""$x^\top x$ for ``x`` ``[n, d]``, as [`gram`][curvlib.linalg.factors.gram] computes it.

    On the CPU, for a product of at least ``MIN_ZERO_COLUMN_GRAM_COST``
    multiply-adds where at least ``MIN_ZERO_COLUMN_FRACTION`` of the columns are
    zero in every row, only the other columns are multiplied and their product
    is embedded with zeros: the same matrix at the square of their number. A
    convolution over a small input gives such columns (kernel elements that
    reach only padding: the examples' CNN's third convolution sees a 2x2 image
    through a 5x5 kernel, so 512 of its 801 input columns are zero), and so do
    dead ReLU units. The columns summing to zero (one pass over ``x``) are the
    candidates, and only they are read in full; the masks are read through
    NumPy (no device read).
    """
    cols = x.shape[-1]
    small = x.shape[0] * cols * cols < MIN_ZERO_COLUMN_GRAM_COST
    if x.device.type != "cpu" or small or x.dim() != 2:
        return gram(x, gram_blocks(x))
    candidates = numpy.flatnonzero(x.sum(0).eq(0).numpy())
    if len(candidates) >= cols * MIN_ZERO_COLUMN_FRACTION:
        index = torch.tensor(candidates, dtype=torch.int64)
        zero = numpy.zeros(cols, dtype=bool)
        zero[candidates] = ~x.index_select(1, index).ne(0).any(0).numpy()
        if zero.sum() >= cols * MIN_ZERO_COLUMN_FRACTION:
            live = torch.tensor(numpy.flatnonzero(~zero), dtype=torch.int64)
            part = x.index_select(1, live)
            return embed_live(gram(part, gram_blocks(part)), live, cols, 0.0)
    return gram(x, gram_blocks(x))


MIN_DECOUPLED_SIZE = 384
"""The fewest rows of a matrix whose dead coordinates a Cholesky inverse leaves out.

Below it the copies in and out of the live block (about a third of a millisecond
at 257 rows on one core) are a large part of what the smaller factorisation saves,
and a step's gain is within the timing noise; at 801 rows with 257 dead the
Cholesky inverse takes a third of the whole one's time
(``benchmarks/results/experiments/dead_units/copies.py``).
"""

MIN_DECOUPLED_EIGH_SIZE = 128
"""The same for an eigendecomposition, several times dearer than a Cholesky inverse."""

MIN_DEAD_FRACTION = 1 / 8
"""The fraction of dead coordinates from which ``cpu_live_coordinates`` decouples them."""


def _live(mats: tuple[Tensor, ...], least: float) -> Tensor | None:
    """The live coordinates where at least ``least`` (and one) are dead, else ``None``.

    A zero row has a zero diagonal entry: the diagonals give the candidates, and
    only their rows are read in full. The masks come to the host through NumPy,
    from the tensors' own memory on the CPU (no read that ``host_reads`` counts)
    and after a copy elsewhere.
    """
    device = mats[0].device

    def host(mask: Tensor) -> numpy.ndarray:
        return (mask if device.type == "cpu" else mask.cpu()).numpy()

    zero = mats[0].diagonal().eq(0)
    for mat in mats[1:]:
        zero &= mat.diagonal().eq(0)
    candidates = numpy.flatnonzero(host(zero))
    if not len(candidates) or len(candidates) < least:
        return None
    index = torch.tensor(candidates, dtype=torch.int64, device=device)
    dead = numpy.ones(len(candidates), dtype=bool)
    for mat in mats:
        dead &= host(mat.index_select(0, index).eq(0).all(-1))
    if not dead.any() or dead.sum() < least:
        return None
    live = numpy.ones(mats[0].shape[-1], dtype=bool)
    live[candidates[dead]] = False
    # A copy: a tensor of torch's own, not one that keeps a NumPy array alive.
    return torch.tensor(numpy.flatnonzero(live), dtype=torch.int64, device=device)


def live_coordinates(*mats: Tensor) -> Tensor | None:
    r"""The coordinates where some of the symmetric ``mats`` has a nonzero row; ``None`` if all.

    A coordinate whose row (and so column) is zero in each matrix is decoupled
    from the others in any damped combination of them: its factorisations are
    those of the damping alone, and the others' are those of the submatrices on
    the live coordinates, at the cube of their number. Dead ReLU units (a zero row of the
    next layer's input factor and of the layer's own output-gradient factor) and
    inputs that are zero on every sample, such as an image's border pixels, give
    such coordinates. A zero row has a zero diagonal entry, so only the rows
    with one are read in full. Off the CPU, up to two host reads (synchronisations;
    [`cpu_live_coordinates`][curvlib.linalg.factors.cpu_live_coordinates] makes
    none there).

    Returns:
        The live coordinates in increasing order (possibly none), or ``None``
        where every coordinate is live.
    """
    return _live(mats, 0.0)


def cpu_live_coordinates(*mats: Tensor, eigh: bool = False) -> Tensor | None:
    """[`live_coordinates`][curvlib.linalg.live_coordinates] where decoupling them pays.

    On the CPU, for matrices of at least ``MIN_DECOUPLED_SIZE`` rows
    (``MIN_DECOUPLED_EIGH_SIZE`` for an ``eigh``) of which at least
    ``MIN_DEAD_FRACTION`` are dead, the live coordinates, read through NumPy on
    the tensors' own memory (a host computation: no device read, and none that
    [`host_reads`][curvlib.optim.syncs.host_reads] counts, since a GPU step makes
    none); otherwise ``None`` (every coordinate taken as live), so that an
    inverse built on another device keeps its reads.
    """
    size = mats[0].shape[-1]
    smallest = MIN_DECOUPLED_EIGH_SIZE if eigh else MIN_DECOUPLED_SIZE
    if mats[0].device.type != "cpu" or size < smallest:
        return None
    return _live(mats, size * MIN_DEAD_FRACTION)


def live_size(live: Tensor | None, size: int) -> int:
    """The rows a factorisation works on: ``len(live)``, or ``size`` where ``live`` is ``None``."""
    return size if live is None else len(live)


def live_block(mat: Tensor, live: Tensor | None) -> Tensor:
    """``mat`` on the coordinates ``live`` (rows and columns); ``mat`` itself where ``None``."""
    return mat if live is None else mat.index_select(0, live).index_select(1, live)


def embed_live(block: Tensor, live: Tensor | None, size: int, fill: Tensor | float) -> Tensor:
    r"""``block`` on the coordinates ``live`` of a ``size``-square matrix, ``fill`` elsewhere.

    ``fill`` goes on the other coordinates' diagonal, zeros everywhere else: the
    inverse of [`live_block`][curvlib.linalg.factors.live_block] for a factorisation
    of a matrix whose other coordinates are decoupled
    ([`live_coordinates`][curvlib.linalg.live_coordinates]).

    ``block`` itself where ``live`` is ``None``. ``fill`` is converted to ``block``'s dtype
    first, so a float and a 0-dimensional tensor of the same value fill the same bits.
    """
    if live is None:
        return block
    rows = block.new_zeros(block.shape[0], size).index_copy_(1, live, block)
    out = block.new_zeros(size, size).index_copy_(0, live, rows)
    dead = torch.ones(size, dtype=torch.bool, device=block.device).index_fill_(0, live, False)
    out.diagonal().masked_fill_(dead, torch.as_tensor(fill, dtype=block.dtype))
    return out


def cholesky_inverse(chol: Tensor) -> Tensor:
    r"""$(LL^\top)^{-1}$ from the lower Cholesky factor $L$, exactly symmetric.

    On the CPU ``torch.cholesky_inverse`` computes one triangle (LAPACK's
    ``potri``) and mirrors it, so its result is symmetric to the bit: it is
    returned as it is (transposed, a free view, where LAPACK left it in column
    order, so that the result is contiguous); elsewhere it is symmetrised.
    """
    inverse = torch.cholesky_inverse(chol)
    if inverse.device.type != "cpu":
        return symmetrize(inverse)
    return inverse.mT if inverse.mT.is_contiguous() else inverse


@dataclass(frozen=True)
class Eigh:
    r"""An eigendecomposition $M = Q \operatorname{diag}(\lambda) Q^\top$.

    Attributes:
        values: Eigenvalues in ascending order, ``[n]``.
        vectors: Orthonormal eigenvectors as columns, ``[n, n]``.
    """

    values: Tensor
    vectors: Tensor


def _eigh_jitter(mat: Tensor, attempt: int) -> float:
    r"""The shift of retry ``attempt``: $\epsilon 10^r \max(\sum_i |m_{ii}|/n, \text{tiny})$."""
    info = torch.finfo(mat.dtype)
    scale = max(float(mat.diagonal().abs().sum()) / max(mat.shape[-1], 1), info.tiny)
    return info.eps * 10.0**attempt * scale


def eigh(
    mat: Tensor, *, clamp_negative: bool = True, retries: int = 4, first_attempt: int = 0
) -> Eigh:
    r"""Eigendecomposition of a symmetric matrix, retried with growing jitter.

    ``torch.linalg.eigh`` can fail to converge on ill-conditioned input; each retry
    adds $\epsilon \cdot 10^{r} \cdot \max(\operatorname{tr}(M)/n, \text{tiny})\, I$ and
    subtracts it from the eigenvalues again, so the result describes ``mat``.

    Args:
        mat: Symmetric matrix ``[n, n]`` (symmetrised inside).
        clamp_negative: Clamp eigenvalues below zero to zero (for PSD factors,
            whose small negative eigenvalues are round-off).
        retries: How many jittered retries before giving up.
        first_attempt: Start with this retry (1: the caller's own unjittered attempt,
            [`first_eigh`][curvlib.linalg.first_eigh], failed already).

    Returns:
        The eigendecomposition.

    Raises:
        FactorizationError: If every attempt fails.
    """
    mat = symmetrize(mat)
    n = mat.shape[-1]
    for attempt in range(first_attempt, retries + 1):
        try:
            decomposition, finite = _eigh_attempt(mat, attempt, clamp_negative)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            continue
        if bool(finite):
            return decomposition
    raise FactorizationError(f"eigh failed on a {n}x{n} matrix after {retries} jittered retries")


def first_eigh(mat: Tensor, *, clamp_negative: bool = True) -> tuple[Eigh, Tensor]:
    """The first attempt of [`eigh`][curvlib.linalg.eigh], its check left on the device.

    Returns:
        ``(decomposition, finite)``: where the 0-dimensional boolean ``finite``
        is true, ``decomposition`` is exactly what ``eigh`` returns.

    Raises:
        RuntimeError: Where ``torch.linalg.eigh`` raises (``eigh`` would retry).
    """
    return _eigh_attempt(symmetrize(mat), 0, clamp_negative)


def _eigh_attempt(mat: Tensor, attempt: int, clamp_negative: bool) -> tuple[Eigh, Tensor]:
    """``eigh``'s attempt ``attempt`` on the symmetric ``mat``, and whether its values are finite.

    Attempt 0 adds nothing (and allocates nothing); retry ``r`` adds ``_eigh_jitter``
    and subtracts it from the eigenvalues again. Raises where ``torch.linalg.eigh`` does.
    """
    jitter, shifted = 0.0, mat
    if attempt:
        jitter = _eigh_jitter(mat, attempt)
        n = mat.shape[-1]
        shifted = mat + jitter * torch.eye(n, dtype=mat.dtype, device=mat.device)
    values, vectors = torch.linalg.eigh(shifted)
    values = values - jitter
    finite = torch.isfinite(values).all()
    if clamp_negative:
        values = values.clamp_min(0.0)
    return Eigh(values, vectors), finite


def damped_cholesky(
    kernel: Tensor, damping: float, *, retries: int = 4, symmetric: bool = False
) -> tuple[Tensor, float]:
    r"""Lower Cholesky factor of $K + \lambda I$, retried with growing jitter.

    Retry $r$ adds $\epsilon \cdot 10^{r} \cdot \max(\operatorname{tr}(K)/m, \lambda)$ to
    the diagonal. Each attempt reads its ``info`` on the host; the first attempt
    alone, unread, is [`first_cholesky`][curvlib.linalg.factors.first_cholesky].

    Args:
        kernel: Symmetric positive semi-definite ``[m, m]`` (symmetrised inside).
        damping: $\lambda > 0$.
        retries: How many retries, each adding ten times more jitter.
        symmetric: ``kernel`` is symmetric to the bit (e.g. a running average of
            symmetrised statistics): it is copied, not symmetrised again.

    Returns:
        ``(L, jitter)``: the factor and the jitter that was added (``0.0`` unless
        the first attempt failed).

    Raises:
        FactorizationError: If every attempt fails.
    """
    kernel, diagonal, original = _shiftable(kernel, symmetric)
    m = kernel.shape[-1]
    eps = torch.finfo(kernel.dtype).eps
    for attempt in range(retries + 1):
        jitter = 0.0
        if attempt:
            scale = max(float(original.abs().sum()) / max(m, 1), damping)
            jitter = eps * 10.0**attempt * scale
        chol, info = _shifted_cholesky(kernel, diagonal, original, damping + jitter)
        if int(info) == 0:
            return chol, jitter
    raise FactorizationError(
        f"Cholesky of a damped {m}x{m} matrix failed after {retries} retries; it has NaN/Inf "
        "entries or the damping is far too small for its scale."
    )


def first_cholesky(
    kernel: Tensor, damping: Tensor | float, *, symmetric: bool = False
) -> tuple[Tensor, Tensor]:
    r"""The first attempt of [`damped_cholesky`][curvlib.linalg.damped_cholesky], unread.

    For callers that check many factorisations with one host read and take
    ``damped_cholesky`` only where one failed: where ``info`` is 0, ``L`` is
    exactly what ``damped_cholesky`` returns (with no jitter).

    Args:
        kernel: Symmetric positive semi-definite ``[m, m]`` (symmetrised inside).
        damping: $\lambda$, a float or a 0-dimensional tensor on ``kernel``'s
            device (e.g. [`pi_shifts`][curvlib.linalg.factors.pi_shifts]).
        symmetric: As for ``damped_cholesky``.

    Returns:
        ``(L, info)``: ``info`` is LAPACK's (0 on success), a tensor left on the device.
    """
    return _shifted_cholesky(*_shiftable(kernel, symmetric), damping)


def _shiftable(kernel: Tensor, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    """A symmetric copy of ``kernel``, its diagonal (a view) and a copy of that diagonal."""
    if symmetric:
        kernel = kernel.clone(memory_format=torch.contiguous_format)
    else:
        kernel = symmetrize(kernel)
    diagonal = kernel.diagonal(dim1=-2, dim2=-1)
    return kernel, diagonal, diagonal.clone()


def _shifted_cholesky(
    kernel: Tensor, diagonal: Tensor, original: Tensor, shift: Tensor | float
) -> tuple[Tensor, Tensor]:
    """``cholesky_ex`` of ``kernel`` with ``original + shift`` written into its diagonal."""
    torch.add(original, shift, out=diagonal)
    chol, info = torch.linalg.cholesky_ex(kernel)
    return chol, info


def damped_inverse(mat: Tensor, damping: float, *, retries: int = 4) -> Tensor:
    r"""$(M + \delta I)^{-1}$ through a Cholesky factorisation, with jittered retries.

    Cheaper than an eigendecomposition when only the inverse is needed.

    Args:
        mat: Symmetric positive semi-definite matrix ``[n, n]``.
        damping: $\delta > 0$.
        retries: How many retries, each adding ten times more jitter.

    Returns:
        The symmetric inverse.

    Raises:
        FactorizationError: If every attempt fails.
    """
    chol, _ = damped_cholesky(mat, damping, retries=retries)
    return cholesky_inverse(chol)


def pi_split(A: Tensor, G: Tensor, damping: float) -> tuple[float, float]:
    r"""Factored Tikhonov damping of Martens & Grosse (2015), section 6.3.

    Splits $\lambda$ between the factors as $(A + \pi\sqrt\lambda I)$ and
    $(G + \sqrt\lambda/\pi\, I)$ with $\pi = \sqrt{(\operatorname{tr}A / d_A) /
    (\operatorname{tr}G / d_G)}$, so that the cross terms of
    $(G + \gamma_G I)\otimes(A + \gamma_A I) = G\otimes A + \gamma_G I \otimes A
    + G \otimes \gamma_A I + \gamma_G\gamma_A I$ have balanced norms and the
    constant term is exactly $\lambda I$.

    Args:
        A: Input factor.
        G: Output-gradient factor.
        damping: $\lambda > 0$.

    Returns:
        ``(gamma_A, gamma_G)`` with ``gamma_A * gamma_G == damping``.
    """
    gamma_a, gamma_g = pi_shifts(A, G, damping)
    return float(gamma_a), float(gamma_g)


def pi_shifts(A: Tensor, G: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    r"""[`pi_split`][curvlib.linalg.pi_split] on the factors' device, without a host read.

    Returns:
        ``(gamma_A, gamma_G)`` as 0-dimensional float64 tensors; ``pi_split``
        returns their values.
    """
    mean_a = A.diagonal().sum().double() / A.shape[-1]
    mean_g = G.diagonal().sum().double() / G.shape[-1]
    return pi_shifts_of_means(mean_a, mean_g, damping)


def pi_split_of_means(mean_a: float, mean_g: float, damping: float) -> tuple[float, float]:
    r"""[`pi_split`][curvlib.linalg.pi_split] from the mean diagonal entries of $A$ and $G$.

    For callers that hold the factors' eigenvalues rather than the factors
    (their mean is the mean diagonal entry). $\pi = 1$ when either mean is not
    positive.

    Returns:
        ``(gamma_A, gamma_G)`` with ``gamma_A * gamma_G == damping``.
    """
    pi = 1.0 if mean_a <= 0.0 or mean_g <= 0.0 else math.sqrt(mean_a / mean_g)
    root = damping**0.5
    return pi * root, root / pi


def pi_shifts_of_means(mean_a: Tensor, mean_g: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    r"""[`pi_split_of_means`][curvlib.linalg.pi_split_of_means] on the device, without a host read.

    Args:
        mean_a: The mean diagonal entry of $A$, a 0-dimensional tensor.
        mean_g: That of $G$, on the same device.
        damping: $\lambda > 0$.

    Returns:
        ``(gamma_A, gamma_G)`` as 0-dimensional float64 tensors.
    """
    mean_a, mean_g = mean_a.double(), mean_g.double()
    # pi = 1 when either mean is not positive (a NaN mean gives a NaN pi, as it should).
    pi = torch.where((mean_a <= 0.0) | (mean_g <= 0.0), 1.0, (mean_a / mean_g).sqrt())
    root = damping**0.5
    return pi * root, pi.new_full((), root) / pi


MIN_BLOCKWISE_SIZE = 384
"""The fewest rows of a factor that ``independent_blocks`` looks for independent blocks in."""

MAX_BLOCK_FRACTION = 1 / 2
"""The largest block, as a fraction of the rows, for which ``independent_blocks`` splits."""


def independent_blocks(mat: Tensor) -> list[Tensor] | None:
    r"""Groups of coordinates of a symmetric matrix that no nonzero entry joins, the last one aside.

    A transposed convolution's input factor is block diagonal up to the bias:
    output $t$ receives input $i$ through kernel element $k = t + p - is$ only,
    so elements of different residues modulo the stride never meet in one
    window (four blocks at stride 2), and on a 1x1 input no two elements do
    (one block per element). The bias column's row, the last, meets every
    coordinate and is left out of the groups; any last coordinate may be, as
    [`blockwise_damped_inverse`][curvlib.linalg.factors.blockwise_damped_inverse]
    eliminates it last. A dead coordinate (a zero row) is a group of its own:
    a convolution over an input smaller than its kernel has hundreds (the
    examples' CNN's third convolution, 512 of 801), so no step below loops
    over the groups in Python. Where the live coordinates form one group,
    ``None``: that is the dead-coordinate decoupling of
    [`cpu_live_coordinates`][curvlib.linalg.factors.cpu_live_coordinates].

    Each coordinate is labelled by following its row's first nonzero entry to
    the least coordinate it leads to; the labels are the groups where no
    nonzero entry joins two of them (checked by counting the nonzero entries
    inside the groups against all of them). A block whose own pattern is
    sparse may fail that check: it is then left to the dense factorisation.
    Groups no larger than ``MAX_BLOCK_FRACTION`` of the $n$ coordinates hold
    at most that fraction of the $n^2$ entries, so a matrix with more nonzero
    entries is left whole before any labelling.

    Returns:
        On the CPU, for a matrix of at least ``MIN_BLOCKWISE_SIZE`` rows whose
        largest group holds at most ``MAX_BLOCK_FRACTION`` of the coordinates,
        the groups, those of one size stacked: one ``[groups, size]`` index
        tensor per size, each row ascending; otherwise ``None``. Read on the
        host through NumPy (no device read).
    """
    size = mat.shape[-1] - 1
    if mat.device.type != "cpu" or size + 1 < MIN_BLOCKWISE_SIZE or mat.dim() != 2:
        return None
    # A row's nonzero entries lie in its own group: one row with more than a
    # largest group's share rules the split out before the whole pattern is read.
    widest = int(mat.diagonal()[:size].argmax())
    if int(mat[widest, :size].count_nonzero()) > MAX_BLOCK_FRACTION * size:
        return None
    pattern = mat[:size, :size].ne(0).numpy()
    entries = numpy.count_nonzero(pattern)
    if entries > MAX_BLOCK_FRACTION * size * size:
        return None  # more entries than groups of that size can hold
    counts = numpy.count_nonzero(pattern, axis=1)
    live = pattern.diagonal()  # a zero diagonal entry of a PSD matrix: a zero row
    if (counts[live] == live.sum()).all():
        return None  # the live coordinates form one dense block
    labels = numpy.where(live, pattern.argmax(1), numpy.arange(size)).astype(numpy.int32)
    while True:  # pointer jumping: each label to the least coordinate it leads to
        jumped = labels[labels]
        if (jumped == labels).all():
            break
        labels = jumped
    order = numpy.argsort(labels, kind="stable")  # ascending within each group
    starts = numpy.flatnonzero(numpy.diff(labels[order], prepend=-1))
    sizes = numpy.diff(starts, append=size)
    if sizes.max() > size * MAX_BLOCK_FRACTION or len(sizes) - live.size + live.sum() < 2:
        return None  # one live group: dead coordinates are ``cpu_live_coordinates``' work
    if numpy.count_nonzero(pattern & (labels[:, None] == labels[None, :])) != entries:
        return None  # a nonzero entry joins two labels: not independent blocks
    return [
        torch.from_numpy(order[starts[sizes == n][:, None] + numpy.arange(n)].astype(numpy.int64))
        for n in numpy.unique(sizes).tolist()
    ]


def blockwise_damped_inverse(
    mat: Tensor, shift: Tensor | float, blocks: list[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    r"""$(M + sI)^{-1}$ of a matrix whose coordinates but the last form independent blocks.

    With the blocks $B_j$ of [`independent_blocks`][curvlib.linalg.factors.independent_blocks]
    and the last coordinate's column $v$ and entry $c$, $M + sI$ is, up to a
    permutation, $\begin{pmatrix} B + sI & v \\ v^\top & c + s \end{pmatrix}$ with
    $B$ block diagonal. ``blocks`` holds them as ``independent_blocks`` returns
    them, one ``[blocks, rows]`` index tensor per size; those of one size are
    factorised as one batch (Cholesky and its inverse), then
    $u = (B + sI)^{-1} v$ and the last pivot $\sigma = c + s - v^\top u$, and

    $$(M + sI)^{-1} = \begin{pmatrix} (B + sI)^{-1} + uu^\top/\sigma & -u/\sigma \\
    -u^\top/\sigma & 1/\sigma \end{pmatrix},$$

    exactly symmetric. The cost is that of the blocks' factorisations and
    $O(n^2)$, not $O(n^3)$.

    Returns:
        The inverse, the least squared pivot of the permuted Cholesky
        factorisation (the blocks' $L_{ii}^2$ and $\sigma$: each at least
        $\lambda_\min$, as in [`factor_condition`][curvlib.approx.kfac.factor_condition]),
        and a failure flag (true where a block's Cholesky failed or $\sigma$
        is not positive), all left on the device.
    """
    size = mat.shape[-1]
    shift = torch.as_tensor(shift, dtype=mat.dtype, device=mat.device)
    inverse = mat.new_zeros(size * size)
    v = mat[:-1, -1]
    u = torch.zeros_like(v)
    pivots: list[Tensor] = []
    failed: list[Tensor] = []
    for index in blocks:  # [blocks, rows], one size
        block = mat[index[:, :, None], index[:, None, :]]  # a copy
        block.diagonal(dim1=-2, dim2=-1).add_(shift)
        chol, info = torch.linalg.cholesky_ex(block)
        block_inverse = torch.cholesky_inverse(chol)
        if block_inverse.device.type != "cpu":
            block_inverse = symmetrize(block_inverse)
        flat = (index[:, :, None] * size + index[:, None, :]).flatten()
        inverse.index_copy_(0, flat, block_inverse.flatten())
        u[index] = (block_inverse @ v[index][..., None])[..., 0]
        pivots.append(chol.diagonal(dim1=-2, dim2=-1).square().min())
        failed.append(info.ne(0).any())
    inverse = inverse.view(size, size)
    sigma = mat[-1, -1] + shift - v @ u
    inverse[:-1, :-1].add_(torch.outer(u, u).div_(sigma))
    edge = -u / sigma
    inverse[:-1, -1] = edge
    inverse[-1, :-1] = edge
    inverse[-1, -1] = sigma.reciprocal()
    least = torch.stack([*pivots, sigma]).min()
    return inverse, least, torch.stack([*failed, sigma.le(0)]).any()
