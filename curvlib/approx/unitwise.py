r"""Unit-wise natural gradient: one Fisher block per output unit of every layer.

The incoming weights and the bias of output unit $o$ of a layer form row $o$ of
its $[W \mid b]$ matrix ([`curvlib.core.conventions`][curvlib.core.conventions]).
The unit-wise Fisher keeps, for every unit, the exact block of its row and
drops everything between units and layers:

$$F_o = \frac1N\sum_{k,n} w_{kno} w_{kno}^\top, \qquad
w_{kno} = \sum_t g_{knto}\,\bar a_{nt} \in \mathbb{R}^{d_\text{in}+1},$$

the row $o$ of the per-sample gradient $\bar W_{kn}$. For a layer with one output
position ($T = 1$, ``Linear``) it factorises as $F_o = \frac1N\sum_n
\big(\sum_k g_{kno}^2\big)\bar a_n\bar a_n^\top$, which is formed from the
per-sample inputs and output gradients without any per-sample gradient; for
convolutions the per-sample gradients are formed.

**Normalisation layers.** The affine parameters $[\gamma_e \mid \beta_e]$ of
eval-mode ``BatchNorm1d``/``2d``/``3d`` (per channel), ``LayerNorm`` (per
element of ``normalized_shape``) and ``GroupNorm`` (per channel) get one
$2\times2$ block per normalised feature (the ``NORM_KINDS`` are in
``supported_kinds``; the extractor answers ``PER_SAMPLE_IO`` for them with
their per-sample gradients). ``LayerNorm`` and ``GroupNorm`` normalise each
sample by its own statistics, so their per-sample gradients exist in train
mode too. Train-mode ``BatchNorm`` couples the samples, so no per-sample
block exists and the extractor refuses the step, as for the diagonal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from curvlib.approx.base import (
    DEFAULT_DECAY,
    LayerBlock,
    LayerInverse,
    LayerwiseApprox,
    check_damping,
    running_average,
    standard_normal,
)
from curvlib.core.layout import KRONECKER_KINDS, NORM_KINDS, CurvatureLayer, LayerKind
from curvlib.core.stats import LayerStatistics, StatKind
from curvlib.linalg.factors import FactorizationError


def unit_blocks(stats: LayerStatistics) -> Tensor:
    r"""The per-unit Fisher blocks $F_o$ of one layer's statistics, ``[out, in_aug, in_aug]``.

    Cost $O(N d_\text{out} d_\text{in}^2)$ for one output position, plus the
    per-sample gradients $O(KNT d_\text{out} d_\text{in})$ and
    $O(KN d_\text{out} d_\text{in}^2)$ otherwise.

    Normalisation layers (``NORM_KINDS``), whose statistics hold per-sample
    gradients $[K, N, E, 2]$ instead, give their $2\times2$ blocks per
    normalised feature, $O(KNE)$.

    Raises:
        ValueError: Without per-sample inputs and output gradients (or gradients).
    """
    if stats.io is None and stats.grads is not None:  # normalisation: per-sample gradients
        grads = stats.grads.grads
        return torch.einsum("knoi,knoj->oij", grads, grads) / grads.shape[1]
    io = stats.io
    if io is None:
        raise ValueError(
            f"UnitWiseNaturalGradient needs ['PER_SAMPLE_IO'] statistics for layer "
            f"{stats.layer.name!r}; create the extractor with stats={{StatKind.PER_SAMPLE_IO}}."
        )
    n, t = io.inputs.shape[:2]
    if t == 1:
        weights = io.output_grads[:, :, 0].square().sum(0)  # [N, out]
        inputs = io.inputs[:, 0]  # [N, in]
        weighted = weights.unsqueeze(-1) * inputs.unsqueeze(1)  # [N, out, in]
        return torch.einsum("noi,nj->oij", weighted, inputs) / n
    grads = io.grads()  # [K, N, out, in]
    return torch.einsum("knoi,knoj->oij", grads, grads) / n


def _unit_rows(stats: LayerStatistics) -> tuple[Tensor, Tensor | None]:
    r"""The rows of one layer's units: ``(g, a)`` or ``(w, None)``.

    For one output position, ``g`` $[K, N, d_\text{out}]$ and ``a`` $[N,
    d_\text{in}+1]$ with $w_{kno} = g_{kno}\bar a_n$ (no per-sample gradient is
    formed); otherwise the per-sample gradients ``w`` $[K, N, d_\text{out},
    d_\text{in}+1]$ (normalisation layers: their stored ones).
    """
    if stats.io is None and stats.grads is not None:  # normalisation: per-sample gradients
        return stats.grads.grads, None
    io = stats.io
    if io is None:
        raise ValueError(
            f"The unit-wise Fisher needs ['PER_SAMPLE_IO'] statistics for layer "
            f"{stats.layer.name!r}; create the extractor with stats={{StatKind.PER_SAMPLE_IO}}."
        )
    if io.inputs.shape[1] == 1:
        return io.output_grads[:, :, 0], io.inputs[:, 0]
    return io.grads(), None


def unit_kernels(stats: LayerStatistics) -> Tensor:
    r"""The per-unit sample kernels $\Theta_o = U_oU_o^\top$ of one layer, ``[out, KN, KN]``.

    Row $(k, n)$ of $U_o$, at index $kN + n$, is $w_{kno}/\sqrt N$ (module
    docstring), so $U_o^\top U_o = F_o$ is the unit's block of
    [`unit_blocks`][curvlib.approx.unitwise.unit_blocks] and

    $$\Theta_o[(k,n),(k',n')] = \frac1N\,w_{kno}^\top w_{k'n'o}
    \;\Big(= \frac1N\,g_{kno}\,g_{k'n'o}\,\bar a_n^\top\bar a_{n'}
    \text{ for one position}\Big),$$

    the kernels of the unit-wise step in function space
    ([`function_space_direction`][curvlib.approx.wide.function_space_direction]
    with ``FunctionSpaceForm.UNIT_WISE``). Cost $O(d_\text{out}K^2N^2)$ after
    the input Gram matrix $O(N^2 d_\text{in})$ for one position,
    $O(d_\text{out}K^2N^2 d_\text{in})$ from per-sample gradients otherwise;
    memory $O(d_\text{out}K^2N^2)$.

    Raises:
        ValueError: Without per-sample inputs and output gradients (or gradients).
    """
    rows, inputs = _unit_rows(stats)
    k, n = rows.shape[:2]
    if inputs is not None:
        gram = inputs @ inputs.T  # [N, N]
        kernel = torch.einsum("kno,jmo->oknjm", rows, rows) * gram[None, None, :, None, :]
    else:
        kernel = torch.einsum("knoi,jmoi->oknjm", rows, rows)
    return kernel.reshape(-1, k * n, k * n) / n


def unit_expand(stats: LayerStatistics, coeffs: Tensor) -> Tensor:
    r"""$U_o^\top c_o$ for every unit: ``[out, KN]`` coefficients to an ``[out, in_aug]`` matrix.

    Row $o$ is $\sum_{k,n} c_{o,kN+n}\,w_{kno}/\sqrt N$, $O(KNd_\text{out}d_\text{in})$.
    """
    rows, inputs = _unit_rows(stats)
    k, n = rows.shape[:2]
    c = coeffs.reshape(-1, k, n).to(rows) / n**0.5
    if inputs is not None:
        return torch.einsum("kno,okn,ni->oi", rows, c, inputs)
    return torch.einsum("knoi,okn->oi", rows, c)


class _UnitInverse:
    r"""$(F_o + \lambda I)^{-1}$ unit by unit, from batched Cholesky factors."""

    def __init__(self, chol: Tensor) -> None:
        self.chol = chol

    def __call__(self, mat: Tensor) -> Tensor:
        out, inp = self.chol.shape[:2]
        lead = mat.shape[:-2]
        cols = mat.to(self.chol.dtype).reshape(-1, out, inp).permute(1, 2, 0)  # [out, in, B]
        solved = torch.cholesky_solve(cols, self.chol)
        return solved.permute(2, 0, 1).reshape(*lead, out, inp)


class _UnitBlock(LayerBlock):
    cheap_condition: ClassVar[bool] = False

    def __init__(self, out_dim: int, in_dim: int, dtype: torch.dtype | None) -> None:
        super().__init__(out_dim, in_dim, dtype)
        self.fisher: Tensor | None = None

    def update(self, stats: LayerStatistics, rho: float) -> None:
        self.fisher = running_average(self.fisher, self._cast(unit_blocks(stats)), rho)

    def _fisher(self) -> Tensor:
        if self.fisher is None:
            raise RuntimeError("Unit-wise block has no estimate yet: update() first.")
        return self.fisher

    def matvec(self, mat: Tensor) -> Tensor:
        fisher = self._fisher()
        return torch.einsum("oij,...oj->...oi", fisher, mat.to(fisher.dtype))

    def _cholesky(self, damping: float) -> Tensor:
        fisher = self._fisher()
        damped = fisher + damping * torch.eye(self.in_dim, dtype=fisher.dtype, device=fisher.device)
        chol, info = torch.linalg.cholesky_ex((damped + damped.mT) / 2)
        if bool((info != 0).any()):
            units = torch.nonzero(info).flatten().tolist()[:5]
            raise FactorizationError(
                f"The damped unit blocks {units} are not positive definite; increase the damping."
            )
        result: Tensor = chol
        return result

    def inverse(self, damping: float) -> LayerInverse:
        return _UnitInverse(self._cholesky(check_damping(damping)))

    def to_dense(self) -> Tensor:
        fisher = self._fisher()
        size = self.num_params
        dense = fisher.new_zeros(self.out_dim, self.in_dim, self.out_dim, self.in_dim)
        units = torch.arange(self.out_dim, device=fisher.device)
        dense[units, :, units, :] = fisher
        return dense.reshape(size, size)

    def trace(self) -> Tensor:
        r"""$\sum_o \operatorname{tr} F_o$, $O(d_\text{out} d_\text{in})$."""
        return torch.diagonal(self._fisher(), dim1=-2, dim2=-1).sum()

    def logdet(self, damping: float) -> Tensor:
        r"""$\sum_o \log\det(F_o + \lambda I)$ from Cholesky factors.

        Cost $O(d_\text{out} d_\text{in}^3)$.
        """
        chol = self._cholesky(check_damping(damping))
        return 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum()

    def sample(
        self, damping: float, num_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""Draws $x_o = L_o^{-\top} z_o$ unit by unit, $O(d_\text{out} d_\text{in}^3)$ once."""
        chol = self._cholesky(check_damping(damping))
        z = standard_normal((num_samples, self.out_dim, self.in_dim), chol, generator)
        draws: Tensor = torch.linalg.solve_triangular(chol.mT, z.permute(1, 2, 0), upper=True)
        return draws.permute(2, 0, 1)

    def condition_number(self, damping: float) -> float:
        r"""Exact: largest over smallest eigenvalue of all $F_o + \lambda I$.

        Cost $O(d_\text{out} d_\text{in}^3)$.
        """
        fisher = self._fisher()
        values = torch.linalg.eigvalsh((fisher + fisher.mT) / 2)
        return float((values.max() + damping) / (values.min().clamp_min(0.0) + damping))

    def _device(self) -> torch.device:
        return self.fisher.device if self.fisher is not None else torch.device("cpu")

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self._fisher().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.fisher = state["fisher"].clone()


class UnitWiseNaturalGradient(LayerwiseApprox):
    r"""Unit-wise natural gradient: one exact Fisher block per output unit.

    The block of unit $o$ (its incoming weights and bias) is $F_o =
    \frac1N\sum_{k,n} w_{kno}w_{kno}^\top$ (module docstring), running-averaged
    over updates like the other layer-wise approximations, and damped exactly:
    row $o$ of the step is $(F_o + \lambda I)^{-1}\nabla_o$. It sits between the
    diagonal ($d_\text{in} = 1$ per block) and the layer blocks of
    [`BlockNaturalGradient`][curvlib.approx.natural_gradient.BlockNaturalGradient].

    Cost per layer: ``update`` $O(N d_\text{out} d_\text{in}^2)$ (one output
    position; convolutions form the per-sample gradients first), ``inverse``
    $d_\text{out}$ Cholesky factorisations, $O(d_\text{out} d_\text{in}^3)$,
    apply $O(d_\text{out} d_\text{in}^2)$ per vector; memory
    $O(d_\text{out} d_\text{in}^2)$. So it suits layers with moderate fan-in: a
    $4096\times4096$ layer would need $2^{36}$ entries.

    Example:
        >>> approx = UnitWiseNaturalGradient()
        >>> sorted(kind.name for kind in approx.required_stats)
        ['PER_SAMPLE_IO']

    Args:
        decay: Upper bound of the running-average weight on the old estimate.
        dtype: Storage dtype of the blocks (default: that of the statistics).

    References:
        N. Le Roux, P.-A. Manzagol and Y. Bengio, "Topmoumoute online natural
        gradient algorithm", NeurIPS 2007. Y. Ollivier, "Riemannian metrics for
        neural networks I: feedforward networks", Information and Inference
        4(2), 2015. R. Karakida and K. Osawa, "Understanding approximate Fisher
        information for fast convergence of natural gradient descent in wide
        neural networks", NeurIPS 2020.
    """

    required_stats: ClassVar[frozenset[StatKind]] = frozenset({StatKind.PER_SAMPLE_IO})
    supported_kinds: ClassVar[frozenset[LayerKind]] = KRONECKER_KINDS | NORM_KINDS

    def __init__(self, decay: float = DEFAULT_DECAY, dtype: torch.dtype | None = None) -> None:
        super().__init__(decay=decay, dtype=dtype)

    def work_cost(self, layer: CurvatureLayer) -> float:
        r"""$d_\text{out} d_\text{in}^3$: one Cholesky factorisation per unit."""
        return float(layer.out_dim) * float(layer.in_dim_aug) ** 3

    def _make_block(self, out_dim: int, in_dim: int) -> LayerBlock:
        return _UnitBlock(out_dim, in_dim, self.dtype)

    def _check_has_required(self, name: str, stats: LayerStatistics) -> None:
        if stats.layer.kind in NORM_KINDS and stats.grads is not None:
            return  # normalisation layers answer PER_SAMPLE_IO with per-sample gradients
        super()._check_has_required(name, stats)
