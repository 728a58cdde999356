r"""The precision a preconditioner is applied in: bfloat16 where the hardware makes it pay.

Applying a Kronecker-factored inverse, $V \mapsto G'^{-1} V A'^{-1}$, is two
matrix products per layer on every step (four for an eigenbasis or two-term
inverse, [`KroneckerSumInverse`][curvlib.linalg.KroneckerSumInverse]). On a CPU that multiplies
bfloat16 in hardware oneDNN multiplies bfloat16 matrices faster than float32 ones once
the layer is a few hundred wide: with Intel AMX tiles (Sapphire Rapids and later)
three to four times on one thread and about twice on two, with the AVX-512 bfloat16
instructions on an AMD EPYC Zen 4 about twice on one or two (Intel's Cooper Lake also has
them; not measured);
below that, converting costs more than it saves. The products accumulate in
float32 and the result is returned in the factors' dtype; statistics, factors
and inverses keep their own dtype.

That relative rounding is of each *entry*, not of the direction. A damped
inverse $P$ with condition number $\kappa$ maps a gradient lying in its
high-curvature directions (where $P$ is smallest, and where real gradients
lie) to a direction $\kappa$ times shorter than $\|P\|\|\nabla\|$, while the
rounding of the factors and of the gradient errs by about $2^{-8}\|P\|
\|\nabla\|$: the relative error of the direction grows like $2^{-8}\kappa$,
and past a few hundred the rounded inverse is indefinite and the direction can
point uphill. ``"auto"`` therefore takes bfloat16 only for inverses whose
condition number is at most
[`LOW_PRECISION_MAX_CONDITION`][curvlib.linalg.precision.LOW_PRECISION_MAX_CONDITION].
An inverse applied in an orthogonal eigenbasis (EKFAC's, KFAC's ``EIGEN``) errs
far less: rounding its basis keeps it positive semi-definite, and its error
grows like $2^{-8}\sqrt\kappa$ in the norm that matters, so its bound is
[`LOW_PRECISION_MAX_CONDITION_EIGENBASIS`][curvlib.linalg.precision.LOW_PRECISION_MAX_CONDITION_EIGENBASIS].

``"auto"`` ([`resolve_apply_dtype`][curvlib.linalg.precision.resolve_apply_dtype])
picks bfloat16 only for float32 factors on such a CPU, only for layers whose
apply costs at least
[`LOW_PRECISION_MIN_COST`][curvlib.linalg.precision.LOW_PRECISION_MIN_COST]
multiply-adds and only for inverses conditioned well enough; float64 (the
exactness tests), GPUs and other CPUs keep the factors' dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal, TypeAlias

import torch

ApplyDtype: TypeAlias = torch.dtype | Literal["auto"] | None
"""``"auto"``, ``None`` (the factors' dtype) or a floating dtype to multiply in."""

LOW_PRECISION_MIN_COST = 2.0**24
r"""The smallest apply, $d_o d_i (d_o + d_i)$ multiply-adds, that ``"auto"`` runs in bfloat16.

Measured on a 2-core Intel Xeon with AMX, two threads, the two products of a
layer with the conversions, float32 time over bfloat16 time (best of 100,
interleaved): $512\times257$ and $256\times513$ (101 million) 1.6x to 1.9x,
$512\times65$ and $64\times513$ (19 million) 1.2x to 1.4x, $128\times257$ and
$256\times129$ (12.7 million) 1.0x, $16\times129$ (0.3 million) 0.2x. On one
thread bfloat16 gains more (3.9x at $512\times513$, 1.5x at $128\times257$).
On a 2-core AMD EPYC Zen 4 (AVX-512 bfloat16, no AMX; 2026-12-06, two threads, the same
measurement): 2.0x and 2.0x at 101 million, 1.5x and 1.5x at 19 million,
1.4x and 1.2x at 12.7 million, 1.0x at $64\times257$ (5.3 million), 0.3x at
$16\times129$, 2.0x to 2.2x at $400\times785$ and $784\times401$ (372 million); on one
thread 1.6x at 12.7 million.
"""


LOW_PRECISION_MAX_CONDITION = 64.0
r"""The largest condition number of a damped inverse that ``"auto"`` applies in bfloat16.

$2^{-8}\kappa \le 1/4$: the direction's rounding error stays a fraction of
the direction whatever the gradient. Measured on the CURVES autoencoder
(784-400-200-100-50-25-6 mirrored, ReLU, sigmoid output and ``BCELoss``,
batch 50, ``--preset paper``, $\lambda = 10^{-3}$, the gradients and factors
of step 100; 2-core Intel Xeon with AMX, 2026-12-05): the bfloat16 direction's
relative error against float64 was 0.7% to 8.6% on the six layers whose
condition estimate ([`factor_condition`][curvlib.approx.kfac.factor_condition],
multiplied) was 34 to 41, 21% to 93% on the four at 68 to 258, and 138% and 213% on the
last two layers (estimates 340 and 1477, exact condition numbers 7.5e3 and
3.1e4), whose bfloat16 directions pointed uphill (cosines with the gradient
$-0.009$ and $-0.049$ against $+0.087$ and $+0.038$ in float32).
"""


LOW_PRECISION_MAX_CONDITION_EIGENBASIS = 4096.0
r"""The largest condition number of an eigenbasis inverse that ``"auto"`` applies in bfloat16.

An inverse $P = Q\operatorname{diag}(d)^{-1}Q^\top$ in an orthogonal Kronecker
eigenbasis is applied as $Q[(Q^\top V Q) \odot d^{-1}]Q^\top$ (written for
one $Q$; EKFAC's and KFAC's ``EIGEN`` have $Q_G$ on the left and $Q_A$ on the
right). In bfloat16 the same rounded basis $\tilde Q$ multiplies on both
sides, so the operator applied stays symmetric positive semi-definite: the
rounding of the basis tilts the eigendirections by about $2^{-8}$, it does not
make the inverse indefinite as rounding an explicit inverse does. What remains
is the rounding of $V$ and of the rotated matrix: a perturbation $E$ of
$Q^\top V Q$ with $\|E\|_F \approx 2^{-8}\|V\|_F$ ($Q$ keeps norms), against
which the scaled entries keep their relative rounding. In the norm
$\|x\|_{P^{-1}}$, in which a step's effect on the quadratic model is measured,
the direction then errs by $\sqrt{\sum_{ij} E_{ij}^2/d_{ij}}$ against at least
$\|V\|_F/\sqrt{d_\max}$: by at most $2^{-8}\sqrt\kappa$ relative, not
$2^{-8}\kappa$, and it descends while that is below 1. $2^{-8}\sqrt\kappa \le 1/4$
gives 4096, where an explicit inverse stops at 64.

Measured with EKFAC at its defaults on the gradient of step 99 (2-core AMD EPYC
Zen 4, 2026-12-07; the bases, the gradient and the rotated matrix rounded as the
apply rounds them, against float64;
`benchmarks/results/experiments/eigenbasis_bfloat16/`): on the convergence
benchmark's CURVES autoencoder, condition numbers 53 to 253 and relative errors
0.7% to 1.4% (0.6% to 1.1% in the $P^{-1}$-norm); on its ReLU autoencoder and
MLP, condition numbers 153 to 3,480 and errors 0.8% to 1.5% (0.7% to 1.4%,
against bounds of 5% to 23%); the cosines of the directions with the gradient
agreed to three digits on every layer.
"""


def apply_cost(d_out: int, d_in: int) -> float:
    r"""Multiply-adds of one Kronecker apply to a ``[d_out, d_in]`` matrix, $d_o d_i (d_o + d_i)$.

    The measure ``cost`` of [`resolve_apply_dtype`][curvlib.linalg.precision.resolve_apply_dtype]
    and [`LOW_PRECISION_MIN_COST`][curvlib.linalg.precision.LOW_PRECISION_MIN_COST]
    (two products; an eigenbasis or two-term inverse is judged by the same measure).
    """
    return float(d_out) * d_in * (d_out + d_in)


_BFLOAT16_PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
"""torch's checks for the CPU features with which oneDNN multiplies bfloat16 in hardware."""


@functools.cache
def cpu_multiplies_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware, with oneDNN.

    AMX tiles or the AVX-512 bfloat16 instructions (``AVX512_BF16``), as torch
    reports them.
    """
    probes = [getattr(torch.cpu, n, None) for n in _BFLOAT16_PROBES]
    if not any(probe is not None and probe() for probe in probes):
        return False
    return bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]


def condition_free_dtype(resolve: Callable[[float], torch.dtype]) -> torch.dtype | None:
    """The dtype ``resolve(condition)`` gives whatever the condition number, else ``None``.

    For an inverse built ahead of its condition number (read later with the
    other numbers of the step): where the choice depends on it, the inverse
    cannot be built yet.
    """
    chosen = resolve(math.inf)
    return chosen if chosen == resolve(1.0) else None


def check_apply_dtype(choice: ApplyDtype) -> ApplyDtype:
    """``choice`` if it is ``"auto"``, ``None`` or a floating dtype; a clear error otherwise."""
    if choice is None or choice == "auto":
        return choice
    if not isinstance(choice, torch.dtype) or not choice.is_floating_point:
        raise ValueError(
            f"apply_dtype must be 'auto', None (the factors' dtype) or a floating torch.dtype "
            f"such as torch.bfloat16; got {choice!r}."
        )
    return choice


def resolve_apply_dtype(
    choice: ApplyDtype,
    dtype: torch.dtype,
    device: torch.device,
    cost: float,
    *,
    condition: float,
    eigenbasis: bool = False,
) -> torch.dtype:
    r"""The dtype to apply one layer's inverse in.

    Args:
        choice: ``"auto"``, ``None`` or a dtype
            ([`ApplyDtype`][curvlib.linalg.precision.ApplyDtype]).
        dtype: The inverse's own dtype.
        device: Where it lives.
        cost: Multiply-adds of one apply
            ([`apply_cost`][curvlib.linalg.precision.apply_cost] for a Kronecker inverse).
        condition: The damped inverse's condition number (or a lower bound of it).
        eigenbasis: Whether the inverse is applied in an orthogonal eigenbasis,
            judged by the eigenbasis bound.

    Returns:
        ``dtype`` for ``None``; ``choice`` when a dtype is given; for ``"auto"``,
        bfloat16 when ``dtype`` is float32, ``device`` a CPU that multiplies
        bfloat16 in hardware and ``cost`` at least
        [`LOW_PRECISION_MIN_COST`][curvlib.linalg.precision.LOW_PRECISION_MIN_COST]
        and ``condition`` at most
        [`LOW_PRECISION_MAX_CONDITION`][curvlib.linalg.precision.LOW_PRECISION_MAX_CONDITION]
        ([`LOW_PRECISION_MAX_CONDITION_EIGENBASIS`][curvlib.linalg.precision.LOW_PRECISION_MAX_CONDITION_EIGENBASIS]
        with ``eigenbasis``), else ``dtype``.
    """
    if choice is None:
        return dtype
    if choice != "auto":
        assert isinstance(choice, torch.dtype)
        return choice
    bound = LOW_PRECISION_MAX_CONDITION_EIGENBASIS if eigenbasis else LOW_PRECISION_MAX_CONDITION
    fast = (
        dtype == torch.float32
        and device.type == "cpu"
        and cost >= LOW_PRECISION_MIN_COST
        and condition <= bound
        and cpu_multiplies_bfloat16()
    )
    return torch.bfloat16 if fast else dtype
