r"""Symmetric positive semi-definite factors: robust ``eigh`` and damped inverses.

All functions act on one square matrix (or a batch of them) and keep its dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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

    Two passes (``aminmax``, then ``hardshrink``). A matrix with a NaN or Inf
    entry is returned unchanged, for the checks downstream to see. The result
    is contiguous.
    """
    if mat.numel() == 0:
        return mat
    low, high = torch.aminmax(mat)
    limit = torch.finfo(mat.dtype).eps * max(-float(low), float(high))
    if not math.isfinite(limit):
        return mat.contiguous()
    return F.hardshrink(mat, max(limit, _largest_subnormal(mat.dtype))).contiguous()


def symmetrize(mat: Tensor) -> Tensor:
    r"""Return $(M + M^\top) / 2$ (a new tensor)."""
    return torch.add(mat, mat.transpose(-1, -2)).mul_(0.5)


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


def eigh(mat: Tensor, *, clamp_negative: bool = True, retries: int = 4) -> Eigh:
    r"""Eigendecomposition of a symmetric matrix, retried with growing jitter.

    ``torch.linalg.eigh`` can fail to converge on ill-conditioned input; each retry
    adds $\epsilon \cdot 10^{r} \cdot \max(\operatorname{tr}(M)/n, \text{tiny})\, I$ and
    subtracts it from the eigenvalues again, so the result describes ``mat``.

    Args:
        mat: Symmetric matrix ``[n, n]`` (symmetrised inside).
        clamp_negative: Clamp eigenvalues below zero to zero (for PSD factors,
            whose small negative eigenvalues are round-off).
        retries: How many jittered retries before giving up.

    Returns:
        The eigendecomposition.

    Raises:
        FactorizationError: If every attempt fails.
    """
    mat = symmetrize(mat)
    n = mat.shape[-1]
    for attempt in range(retries + 1):
        jitter, shifted = 0.0, mat  # the first attempt adds nothing (and allocates nothing)
        if attempt:
            jitter = _eigh_jitter(mat, attempt)
            shifted = mat + jitter * torch.eye(n, dtype=mat.dtype, device=mat.device)
        try:
            values, vectors = torch.linalg.eigh(shifted)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            continue
        values = values - jitter
        if not bool(torch.isfinite(values).all()):
            continue
        if clamp_negative:
            values = values.clamp_min(0.0)
        return Eigh(values, vectors)
    raise FactorizationError(f"eigh failed on a {n}x{n} matrix after {retries} jittered retries")


def damped_cholesky(
    kernel: Tensor, damping: float, *, retries: int = 4, symmetric: bool = False
) -> tuple[Tensor, float]:
    r"""Lower Cholesky factor of $K + \lambda I$, retried with growing jitter.

    Retry $r$ adds $\epsilon \cdot 10^{r} \cdot \max(\operatorname{tr}(K)/m, \lambda)$ to
    the diagonal.

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
    if symmetric:
        kernel = kernel.clone(memory_format=torch.contiguous_format)
    else:
        kernel = symmetrize(kernel)
    m = kernel.shape[-1]
    eps = torch.finfo(kernel.dtype).eps
    diagonal = kernel.diagonal(dim1=-2, dim2=-1)
    original = diagonal.clone()  # the shift is written into the symmetrised copy's diagonal
    for attempt in range(retries + 1):
        jitter = 0.0
        if attempt:
            scale = max(float(original.abs().sum()) / max(m, 1), damping)
            jitter = eps * 10.0**attempt * scale
        torch.add(original, damping + jitter, out=diagonal)
        chol, info = torch.linalg.cholesky_ex(kernel)
        if int(info) == 0:
            return chol, jitter
    raise FactorizationError(
        f"Cholesky of a damped {m}x{m} matrix failed after {retries} retries; it has NaN/Inf "
        "entries or the damping is far too small for its scale."
    )


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
    mean_a = float(A.diagonal().sum()) / A.shape[-1]
    mean_g = float(G.diagonal().sum()) / G.shape[-1]
    return pi_split_of_means(mean_a, mean_g, damping)


def pi_split_of_means(mean_a: float, mean_g: float, damping: float) -> tuple[float, float]:
    r"""[`pi_split`][curvlib.linalg.pi_split] from the mean diagonal entries of $A$ and $G$.

    For callers that hold the factors' eigenvalues rather than the factors
    (their mean is the mean diagonal entry). $\pi = 1$ when either mean is not
    positive.

    Returns:
        ``(gamma_A, gamma_G)`` with ``gamma_A * gamma_G == damping``.
    """
    pi = 1.0 if mean_a <= 0.0 or mean_g <= 0.0 else (mean_a / mean_g) ** 0.5
    root = damping**0.5
    return pi * root, root / pi
