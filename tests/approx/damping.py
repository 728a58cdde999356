r"""The damped operators each approximation documents, written out independently.

References for ``damped_to_dense`` and everything built on it (inverse,
log-determinant, condition number, sampling), from the papers' formulas and the
table of ``docs/concepts/damping.md``; nothing here calls ``curvlib.linalg``.

* Factored Tikhonov damping (Martens & Grosse 2015, section 6.3):
  $(G + \frac{\sqrt\lambda}{\pi} I)\otimes(A + \pi\sqrt\lambda I)$ with
  $\pi = \sqrt{(\operatorname{tr}A/\dim A)/(\operatorname{tr}G/\dim G)}$.
* Factored damping without the split, as the KPSVD papers' K-FAC code writes it
  (``pi=False``): $\bar A = A/T$ the mean over a layer's $T$ output positions,
  both factors shifted by $\sqrt{\lambda/T}$, the preconditioned gradient divided
  by $T$: $T\,(G + \sqrt{\lambda/T} I)\otimes(\bar A + \sqrt{\lambda/T} I)$.
* Two-term methods: the factored rule on the first term plus the second term,
  $K = D_1 + G_2\otimes A_2$; whitened by any square root $D_1 = LL^\top$, the
  eigenvalues $w$ of $L^{-1}KL^{-\top}$ are floored at $\epsilon$ (``min_eig``),
  $L\,V\max(w, \epsilon)V^\top L^\top$ (the same for every square root $L$).
* Exact Tikhonov damping $C + \lambda I$: KFAC's eigenbasis mode, EKFAC, the
  diagonal, the exact block natural gradient, the unit-wise natural gradient.
* The KPSVD paper's per-layer heuristic: $F_l + \lambda_l I$ with
  $\lambda_l = \lambda + \sqrt\lambda(\|A_l\|_2 + \|G_l\|_2)$, $A_l$, $G_l$ the
  KFAC factors of the stored batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvlib.approx.base import LayerwiseApprox


def _eye(size: int) -> Tensor:
    return torch.eye(size, dtype=torch.float64)


def paper_pi(A: Tensor, G: Tensor) -> float:
    r"""$\pi = \sqrt{(\operatorname{tr}A / \dim A) / (\operatorname{tr}G / \dim G)}$."""
    mean_a = float(torch.trace(A)) / A.shape[0]
    mean_g = float(torch.trace(G)) / G.shape[0]
    assert mean_a > 0.0 and mean_g > 0.0, "the factored rule needs factors of positive trace"
    return math.sqrt(mean_a / mean_g)


def paper_pi_split(A: Tensor, G: Tensor, damping: float) -> tuple[float, float]:
    r"""$(\gamma_A, \gamma_G) = (\pi\sqrt\lambda, \sqrt\lambda/\pi)$."""
    pi = paper_pi(A, G)
    return pi * math.sqrt(damping), math.sqrt(damping) / pi


def factored(G: Tensor, A: Tensor, damping: float) -> Tensor:
    r"""$(G + \frac{\sqrt\lambda}{\pi} I)\otimes(A + \pi\sqrt\lambda I)$, dense."""
    gamma_a, gamma_g = paper_pi_split(A, G, damping)
    return torch.kron(G + gamma_g * _eye(G.shape[0]), A + gamma_a * _eye(A.shape[0]))


def floored_two_term(
    G1: Tensor, A1: Tensor, G2: Tensor, A2: Tensor, damping: float, min_eig: float
) -> Tensor:
    """The factored first term plus the second, whitened eigenvalues floored at ``min_eig``."""
    first = factored(G1, A1, damping)
    total = first + torch.kron(G2, A2)
    root = torch.linalg.cholesky(first)
    white = torch.linalg.solve_triangular(root, total, upper=False)
    white = torch.linalg.solve_triangular(root, white.T, upper=False)
    values, vectors = torch.linalg.eigh((white + white.T) / 2)
    left = root @ vectors
    return left @ torch.diag(values.clamp_min(min_eig)) @ left.T


def kfac_factors_of_batch(inputs: Tensor, output_grads: Tensor) -> tuple[Tensor, Tensor]:
    r"""$A = \frac1N\sum_{n,t}\bar a\bar a^\top$, $G = \frac1{NT}\sum_{k,n,t} g g^\top$."""
    n, t = inputs.shape[:2]
    A = torch.einsum("nti,ntj->ij", inputs, inputs) / n
    G = torch.einsum("knto,kntp->op", output_grads, output_grads) / (n * t)
    return A, G


def documented_damped(case: str, approx: LayerwiseApprox, layer: str, damping: float) -> Tensor:
    """The damped operator that case ``case`` documents for ``layer``, built in the test."""
    block = approx.blocks[layer]
    state = block.state_dict()
    size = block.num_params
    if case in ("kfac_pi", "kpsvd"):
        return factored(state["G"], state["A"], damping)
    if case == "kfac_sqrt_per_position":
        t = float(state["positions"])
        mean_a = state["A"] / t
        shift = math.sqrt(damping / t)
        return t * torch.kron(
            state["G"] + shift * _eye(state["G"].shape[0]),
            mean_a + shift * _eye(size // len(state["G"])),
        )
    if case == "kpsvd_sqrt":
        root = math.sqrt(damping)
        G, A = state["G"], state["A"]
        return torch.kron(G + root * _eye(G.shape[0]), A + root * _eye(A.shape[0]))
    if case == "kfac_eigen":
        return torch.kron(state["G"], state["A"]) + damping * _eye(size)
    if case in ("deflation", "kfac_corrected", "lanczos"):
        min_eig = float(block.min_eig)  # type: ignore[attr-defined]
        return floored_two_term(
            state["G1"], state["A1"], state["G2"], state["A2"], damping, min_eig
        )
    if case == "block_ng_heuristic":
        A, G = kfac_factors_of_batch(state["inputs"], state["output_grads"])
        norm_a = float(torch.linalg.eigvalsh(A)[-1])
        norm_g = float(torch.linalg.eigvalsh(G)[-1])
        layer_damping = damping + math.sqrt(damping) * (norm_a + norm_g)
        return approx.to_dense(layer) + layer_damping * _eye(size)
    if case == "ekfac":
        # KFAC's pi-split cross terms with the factors the basis was computed from.
        g0 = state["basis_g"] @ torch.diag(state["values_g"]) @ state["basis_g"].T
        a0 = state["basis_a"] @ torch.diag(state["values_a"]) @ state["basis_a"].T
        gamma_a, gamma_g = paper_pi_split(a0, g0, damping)
        eye_g, eye_a = _eye(g0.shape[0]), _eye(a0.shape[0])
        cross = gamma_a * torch.kron(g0, eye_a) + gamma_g * torch.kron(eye_g, a0)
        return approx.to_dense(layer) + cross + damping * _eye(size)
    if case in ("ekfac_exact", "diagonal", "block_ng_exact", "unit_wise_ng"):
        return approx.to_dense(layer) + damping * _eye(size)
    raise KeyError(f"No damping rule for case {case!r}: write it out in tests/approx/damping.py.")
