r"""EKFAC: KFAC's eigenbasis with rescaled eigenvalues (George et al. 2018).

KFAC approximates a layer block by $G \otimes A = (Q_G \otimes Q_A)
\operatorname{diag}(s_G \otimes s_A) (Q_G \otimes Q_A)^\top$. EKFAC keeps the
Kronecker-factored eigenbasis $Q = Q_G \otimes Q_A$ and replaces the
eigenvalues by the second moments of the per-sample gradients in that basis,

$$s = \frac1N \sum_{k,n} \bigl(Q_G^\top \bar W_{kn} Q_A\bigr)^{\odot 2},
\qquad \bar W_{kn} = \sum_t g_{knt}\bar a_{nt}^\top,$$

(summed over output positions for convolutions, as in the conventions). With the
statistics of one batch, $\operatorname{diag}(s)$ is the diagonal of
$Q^\top F_\text{layer} Q$: the best approximation of $F_\text{layer}$ among
the matrices diagonal in $Q$, so never further from it in Frobenius norm than
KFAC, which is one of them.

Two time scales ([`RefreshableApprox`][curvlib.core.RefreshableApprox]):
every ``update`` folds $A$, $G$ into their running averages and the projected
second moments into $s$ (cheap: the statistics rotated by $Q_G$ and $Q_A$);
``refresh()``, which the optimizer calls every ``t_inv`` steps before that
step's update, eigendecomposes the running $A$ and $G$; the next ``update``
switches to the new basis $Q'$ and carries the running estimate $C =
Q\operatorname{diag}(s)Q^\top$ over to it before folding in its batch's second
moments,

$$s \leftarrow \operatorname{diag}(Q'^\top C Q') = (R_G \odot R_G)\, s\, (R_A \odot
R_A)^\top, \qquad R_G = Q_G'^\top Q_G,\ R_A = Q_A'^\top Q_A ,$$

the best estimate diagonal in the new basis of what $s$ described in the old
one. So $s$ averages over as many batches as $A$ and $G$ do, also when the basis
is refreshed on every statistics step (the optimizer's default, ``t_cov =
t_inv``). Restarting $s$ from the batch instead (as George et al. re-estimate
the scalings after each eigendecomposition) left it one batch's moments at
every step: with half a batch of 200 digits, EKFAC stalled at the mean image on
two of the six runs of the convergence benchmark's two autoencoders and diverged
on a third, and on none with the carry
([results](../results/convergence.md#ekfac-carries-its-scalings-over)). The
carry costs four products of the factors' size per layer (a statistics step
took up to 14% longer on that benchmark's tasks).

Damping ([`EKFACDamping`][curvlib.approx.ekfac.EKFACDamping]): by default KFAC's
factored damping carried into the eigenbasis, so that EKFAC is damped like the
KFAC it corrects (with the same $\lambda$, exact damping $s + \lambda$ damps far
less than KFAC's $\pi$ split, whose cross terms scale with the factors);
``EXACT`` gives $(C + \lambda I)^{-1} = Q \operatorname{diag}\bigl(1 / (s +
\lambda)\bigr) Q^\top$.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from enum import Enum
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from curvlib.approx.base import (
    DEFAULT_DECAY,
    InverseDraft,
    LayerBlock,
    LayerInverse,
    LayerwiseApprox,
    SplitUpdateBlock,
    check_parts,
    host_values,
    running_average,
    settle_condition,
)
from curvlib.approx.kfac import EigenbasisInverse
from curvlib.core.layout import kronecker_cost
from curvlib.core.stats import LayerStatistics, PerSampleIO, StatKind
from curvlib.linalg.factors import (
    Eigh,
    cpu_live_coordinates,
    eigh,
    embed_live,
    first_eigh,
    flush_below,
    flush_negligible,
    live_block,
    live_size,
    negligible_limit,
    pi_shifts_of_means,
)
from curvlib.linalg.precision import (
    ApplyDtype,
    apply_cost,
    check_apply_dtype,
    condition_free_dtype,
    resolve_apply_dtype,
)

_T = TypeVar("_T")


class EKFACDamping(Enum):
    r"""How EKFAC realises the Tikhonov term.

    Attributes:
        EXACT: $(C + \lambda I)^{-1} = Q\operatorname{diag}\bigl(1/(s +
            \lambda)\bigr)Q^\top$.
        FACTORED: KFAC's factored damping carried into the eigenbasis,
            $Q\operatorname{diag}\bigl(1/(s + \gamma_A\, e_G\otimes\mathbf 1 +
            \gamma_G\,\mathbf 1\otimes e_A + \lambda)\bigr)Q^\top$, with $e_G$,
            $e_A$ the eigenvalues of the factors the basis was computed from and
            $\gamma_A = \pi\sqrt\lambda$, $\gamma_G = \sqrt\lambda/\pi$ the
            $\pi$ split of their traces
            ([`pi_split`][curvlib.linalg.pi_split]). The damped operator is
            $C + \gamma_A G_0\otimes I + \gamma_G I\otimes A_0 + \lambda I$ with
            $G_0 = Q_G\operatorname{diag}(e_G)Q_G^\top$, $A_0$ likewise: where
            $s = e_G\otimes e_A$ it is KFAC's $(G_0 + \gamma_G I)\otimes(A_0 +
            \gamma_A I)$ exactly.
    """

    EXACT = "exact"
    FACTORED = "factored"


def _live_eigh(factor: Tensor, decompose: Callable[[Tensor], tuple[Eigh, _T]]) -> tuple[Eigh, _T]:
    """``decompose`` (an ``eigh`` that returns ``(Eigh, extra)``) of the factor's live block.

    A zero row of the factor (a dead ReLU unit, an input zero on every statistics
    sample) is an eigenvector $e_i$ with eigenvalue 0, decoupled from the others:
    on the CPU only the other rows are decomposed, at the cube of their number
    ([`cpu_live_coordinates`][curvlib.linalg.factors.cpu_live_coordinates]), and
    the basis is the same up to a rotation within the zero eigenvalue's space.
    """
    live = cpu_live_coordinates(factor, eigh=True)
    decomposition, extra = decompose(live_block(factor, live))
    if live is None:
        return decomposition, extra
    size = factor.shape[-1]
    values = decomposition.values.new_zeros(size).index_copy_(0, live, decomposition.values)
    return Eigh(values, embed_live(decomposition.vectors, live, size, 1.0)), extra


def _eigenbasis(factor: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors of a factor, negligible entries of the vectors flushed."""
    decomposition, _ = _live_eigh(factor, lambda live: (eigh(live), None))
    return decomposition.values, flush_negligible(decomposition.vectors)


def _first_or_retried_eigh(factor: Tensor) -> tuple[Eigh, Tensor]:
    """``first_eigh``; where LAPACK does not converge, ``eigh``'s jittered retries at once."""
    try:
        return first_eigh(factor)
    except RuntimeError:  # the retries read the device; the failed first attempt is not redone
        done = eigh(factor, first_attempt=1)
        return done, torch.ones((), dtype=torch.bool, device=factor.device)


def _drafted_eigh(factor: Tensor) -> tuple[Eigh, Tensor]:
    """``_first_or_retried_eigh`` of the factor's live block (``_live_eigh``)."""
    return _live_eigh(factor, _first_or_retried_eigh)


class _EigenbasisDraft:
    """``_eigenbasis`` of both factors up to one read: the eigenvalues' check, the flush limits."""

    def __init__(self, A: Tensor, G: Tensor) -> None:
        self.a, finite_a = _drafted_eigh(A)
        self.g, finite_g = _drafted_eigh(G)
        self.numbers = torch.cat([
            torch.stack([finite_a, finite_g]).double(),
            torch.stack([*torch.aminmax(self.a.vectors), *torch.aminmax(self.g.vectors)]).double(),
        ])  # fmt: skip

    def finish(self, v: list[float]) -> _Basis | None:
        """The basis ``_eigenbasis`` gives, or ``None`` where it must retry with jitter."""
        if not (v[0] and v[1]):
            return None
        limit_a = negligible_limit(v[2], v[3], self.a.vectors.dtype)
        limit_g = negligible_limit(v[4], v[5], self.g.vectors.dtype)
        return (
            self.a.values, flush_below(self.a.vectors, limit_a),
            self.g.values, flush_below(self.g.vectors, limit_g),
        )  # fmt: skip


def _condition(damped: Tensor) -> Tensor:
    """The condition number of the damped operator from its eigenvalues, on the device."""
    return damped.max() / damped.min()


def _rayleigh(factor: Tensor, basis: Tensor) -> Tensor:
    """``diag(basis.T @ factor @ basis)``: the factor's eigenvalues where ``basis`` is its own."""
    return (basis * (factor @ basis)).sum(0).clamp_min(0.0)


def _carried(
    scalings: Tensor, old_g: Tensor, old_a: Tensor, new_g: Tensor, new_a: Tensor
) -> Tensor:
    r"""The scalings of $C = Q\operatorname{diag}(s)Q^\top$ in the basis $Q'$, ``[d_out, d_in]``.

    $(R_G \odot R_G)\, s\, (R_A \odot R_A)^\top$ with $R = Q'^\top Q$ per factor:
    the entry $(i, j)$ is $\sum_{k,l} (R_G)_{ik}^2 s_{kl} (R_A)_{jl}^2$.
    """
    r_g = (new_g.T @ old_g).square_()
    r_a = (new_a.T @ old_a).square_()
    return r_g @ scalings @ r_a.T


_Basis = tuple[Tensor, Tensor, Tensor, Tensor]
"""An eigenbasis of the two factors: ``(values_a, basis_a, values_g, basis_g)``."""


class _EKFACBlock(SplitUpdateBlock):
    cheap_condition = True

    def __init__(
        self,
        out_dim: int,
        in_dim: int,
        dtype: torch.dtype | None,
        damping: EKFACDamping,
        apply_dtype: ApplyDtype = "auto",
    ) -> None:
        super().__init__(out_dim, in_dim, dtype)
        self.damping_mode = damping
        self.apply_dtype = apply_dtype
        self.A: Tensor | None = None
        self.G: Tensor | None = None
        self.basis_a: Tensor | None = None
        self.basis_g: Tensor | None = None
        self.values_a: Tensor | None = None
        self.values_g: Tensor | None = None
        self.scalings: Tensor | None = None
        # (values_a, basis_a, values_g, basis_g) of the next basis.
        self.pending: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self.stale = False

    def factorisation_cost(self) -> float:
        """$d^3$ of the sides decomposed: their live coordinates where dead ones are decoupled."""
        if self.A is None or self.G is None:
            return super().factorisation_cost()
        live_g, live_a = (cpu_live_coordinates(f, eigh=True) for f in (self.G, self.A))
        return kronecker_cost(live_size(live_g, self.out_dim), live_size(live_a, self.in_dim))

    def _factors_after(self, stats: LayerStatistics, rho: float) -> tuple[Tensor, Tensor]:
        """The running factors ``(A, G)`` with this step's statistics folded in."""
        assert stats.kronecker is not None
        A = running_average(self.A, self._cast(stats.kronecker.A), rho, symmetrize=True)
        G = running_average(self.G, self._cast(stats.kronecker.G), rho, symmetrize=True)
        return A, G

    def _basis(self, A: Tensor, G: Tensor) -> _Basis:
        """The basis this update rotates into: the pending one, the first one, or the current."""
        if self.pending is not None:
            return self.pending
        if self.basis_a is None or self.basis_g is None:
            return (*_eigenbasis(A), *_eigenbasis(G))
        assert self.values_a is not None and self.values_g is not None
        return self.values_a, self.basis_a, self.values_g, self.basis_g

    def _scalings(self, stats: LayerStatistics, rho: float, basis: _Basis) -> Tensor:
        """The running scalings with this step's second moments in ``basis`` folded in."""
        assert stats.io is not None
        _, basis_a, _, basis_g = basis
        io = stats.io
        rotated = PerSampleIO(
            inputs=self._cast(io.inputs) @ basis_a,
            output_grads=self._cast(io.output_grads) @ basis_g,
        )
        moments = rotated.squared_grads_sum() / io.inputs.shape[0]
        old = self.scalings
        if old is not None and self.pending is not None:  # carried over to the new basis
            assert self.basis_a is not None and self.basis_g is not None
            old = _carried(old, self.basis_g, self.basis_a, basis_g, basis_a)
        return running_average(old, moments, rho)

    def _assign(self, A: Tensor, G: Tensor, basis: _Basis, scalings: Tensor) -> None:
        self.stale = self.basis_a is not None
        self.A, self.G = A, G
        self.values_a, self.basis_a, self.values_g, self.basis_g = basis
        self.scalings, self.pending = scalings, None

    def update(self, stats: LayerStatistics, rho: float) -> None:
        assert stats.kronecker is not None and stats.io is not None
        A, G = self._factors_after(stats, rho)
        basis = self._basis(A, G)
        # Assign at the end: a failure above leaves the block as it was.
        self._assign(A, G, basis, self._scalings(stats, rho, basis))

    # The split update's part: the new scalings (the per-sample statistics rotated into
    # the basis, the expensive part of every update), preceded by the first eigenbasis
    # while the block has none.

    def fit_size(self) -> int:
        first = sum(self._packed_sizes()) if self.basis_a is None else 0
        return first + self.out_dim * self.in_dim

    def fit_dtype(self, stats: LayerStatistics) -> torch.dtype:
        assert stats.kronecker is not None
        return self.dtype or stats.kronecker.A.dtype

    def fit(self, stats: LayerStatistics, rho: float) -> Tensor:
        A, G = self._factors_after(stats, rho)
        dtype = self.fit_dtype(stats)
        try:
            basis = self._basis(A, G)
            scalings = self._scalings(stats, rho, basis)
        except (RuntimeError, ValueError):
            return A.new_full((self.fit_size(),), torch.nan, dtype=dtype)
        parts = [*basis] if self.basis_a is None else []
        return torch.cat([t.reshape(-1).to(dtype) for t in (*parts, scalings)])

    def update_fitted(self, stats: LayerStatistics, rho: float, packed: Tensor) -> None:
        A, G = self._factors_after(stats, rho)
        a, g = self.in_dim, self.out_dim
        scalings = packed[-g * a :].reshape(g, a).clone()
        basis: _Basis
        if self.basis_a is None:
            values_a, basis_a, values_g, basis_g = torch.split(
                packed[: -g * a], self._packed_sizes()
            )
            basis = (
                values_a.clone(),
                basis_a.reshape(a, a).clone(),
                values_g.clone(),
                basis_g.reshape(g, g).clone(),
            )
        else:
            basis = self._basis(A, G)
        self._assign(A, G, basis, scalings)

    @property
    def refresh_due(self) -> bool:
        """Whether ``refresh`` computes a new basis (the factors changed since the last one)."""
        return self.stale and self.A is not None and self.G is not None

    def refresh(self) -> None:
        """Eigenbasis of the running factors, switched to at the next update."""
        if not self.refresh_due:
            return
        assert self.A is not None and self.G is not None
        self.pending = (*_eigenbasis(self.A), *_eigenbasis(self.G))
        self.stale = False

    def draft_refresh(self) -> _EigenbasisDraft | None:
        """``refresh`` up to one host read (``adopt_draft``), or ``None``.

        ``None`` when no refresh is due. A factor whose unjittered ``eigh`` does
        not converge is decomposed with the jittered retries right away.
        """
        if not self.refresh_due:
            return None
        assert self.A is not None and self.G is not None
        return _EigenbasisDraft(self.A, self.G)

    def adopt_draft(self, draft: _EigenbasisDraft, values: list[float]) -> bool:
        """Take a finished ``draft_refresh`` as the next basis; ``False`` if it failed."""
        basis = draft.finish(values)
        if basis is None:
            return False
        self.pending = basis
        self.stale = False
        return True

    def _packed_sizes(self) -> list[int]:
        a, g = self.in_dim, self.out_dim
        return [a, a * a, g, g * g]

    def packed_template(self) -> Tensor:
        """An empty flat tensor of the packed basis' size, dtype and device."""
        assert self.A is not None
        return self.A.new_empty(sum(self._packed_sizes()))

    def packed_refresh(self) -> Tensor:
        """The next basis as one flat tensor: ``values_a``, ``basis_a``, ``values_g``, ``basis_g``.

        The bases are contiguous, so their row-major reshape is their layout.
        NaN where an eigendecomposition fails.
        """
        assert self.A is not None and self.G is not None
        try:
            parts = (*_eigenbasis(self.A), *_eigenbasis(self.G))
        except (RuntimeError, ValueError):
            return self.packed_template().fill_(torch.nan)
        return torch.cat([part.reshape(-1) for part in parts])

    def adopt(self, packed: Tensor) -> None:
        """Take a ``packed_refresh`` as the next basis, as ``refresh`` would."""
        sizes = self._packed_sizes()
        a, g = sizes[0], sizes[2]
        values_a, basis_a, values_g, basis_g = torch.split(packed, sizes)
        self.pending = (
            values_a.clone(),
            basis_a.reshape(a, a).clone(),
            values_g.clone(),
            basis_g.reshape(g, g).clone(),
        )
        self.stale = False

    def _estimate(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.basis_a is None or self.basis_g is None or self.scalings is None:
            raise RuntimeError("EKFAC block has no estimate yet: update() first.")
        return self.basis_a, self.basis_g, self.scalings

    def matvec(self, mat: Tensor) -> Tensor:
        basis_a, basis_g, scalings = self._estimate()
        rotated = basis_g.T @ mat.to(scalings.dtype) @ basis_a
        return basis_g @ (rotated * scalings) @ basis_a.T

    def _damped(self, damping: float) -> Tensor:
        """The eigenvalues of the damped operator, ``[d_out, d_in]`` (see ``EKFACDamping``).

        No host read: the ``FACTORED`` shifts stay on the device
        ([`pi_shifts_of_means`][curvlib.linalg.pi_shifts_of_means]).
        """
        scalings = self._estimate()[2]
        if self.damping_mode is EKFACDamping.EXACT:
            return scalings + damping
        assert self.values_a is not None and self.values_g is not None
        e_a, e_g = self.values_a.to(scalings.dtype), self.values_g.to(scalings.dtype)
        gamma_a, gamma_g = pi_shifts_of_means(e_a.mean(), e_g.mean(), damping)
        return scalings + (gamma_a * e_g[:, None] + gamma_g * e_a[None, :]) + damping

    def inverse(self, damping: float) -> LayerInverse:
        built = self.draft_inverse(damping).read()
        assert built is not None  # this block's drafts cannot fail
        return built

    def draft_inverse(self, damping: float) -> InverseDraft:
        """The inverse, and its condition number to read (``condition_number``)."""
        basis_a, basis_g, _ = self._estimate()
        damped = self._damped(damping)
        scale = 1.0 / damped
        ratio = _condition(damped).reshape(1).double()

        def inverse(condition: float) -> EigenbasisInverse:
            low = self._apply_dtype(scale, condition)
            # The bases were flushed when they were computed (``_eigenbasis``).
            return EigenbasisInverse(basis_g, basis_a, scale, low, condition, flush=False)

        def ahead() -> EigenbasisInverse | None:
            if condition_free_dtype(lambda c: self._apply_dtype(scale, c)) is None:
                return None  # the condition number chooses it
            return inverse(math.nan)

        return InverseDraft(ratio, lambda v: inverse(v[0]), ahead, settle_condition)

    def _apply_dtype(self, scale: Tensor, condition: float) -> torch.dtype:
        """The dtype of the inverse's four products (``EKFAC(apply_dtype=)``)."""
        cost = apply_cost(self.out_dim, self.in_dim)
        return resolve_apply_dtype(
            self.apply_dtype, scale.dtype, scale.device, cost, condition=condition,
            eigenbasis=True,
        )  # fmt: skip

    def damped_to_dense(self, damping: float) -> Tensor:
        r"""$Q\operatorname{diag}(d)Q^\top$ with $d$ the damped eigenvalues (``EKFACDamping``)."""
        if self.damping_mode is EKFACDamping.EXACT:
            return super().damped_to_dense(damping)
        basis_a, basis_g, _ = self._estimate()
        q = torch.kron(basis_g.contiguous(), basis_a.contiguous())
        return (q * self._damped(damping).flatten()) @ q.T

    def trace(self) -> Tensor:
        r"""$\sum s$ (the basis is orthogonal), $O(P)$."""
        return self._estimate()[2].sum()

    def logdet(self, damping: float) -> Tensor:
        r"""$\sum \log$ of the damped eigenvalues ($s + \lambda$ for ``EXACT``), $O(P)$."""
        return torch.log(self._damped(damping)).sum()

    def sample(
        self, damping: float, num_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""$Q_G \bigl(Z \oslash \sqrt{d}\bigr) Q_A^\top$ with $d$ the damped eigenvalues."""
        basis_a, basis_g, _ = self._estimate()
        scalings = self._damped(damping)
        z = torch.randn(
            (num_samples, *scalings.shape),
            generator=generator,
            dtype=scalings.dtype,
            device=scalings.device,
        )
        return basis_g @ (z * torch.rsqrt(scalings)) @ basis_a.T

    def condition_number(self, damping: float) -> float:
        r"""Exact: the ratio of the largest to the smallest damped eigenvalue, $O(P)$."""
        return float(_condition(self._damped(damping)))

    def state_dict(self) -> dict[str, Any]:
        basis_a, basis_g, scalings = self._estimate()
        assert self.A is not None and self.G is not None
        pending = None if self.pending is None else [p.clone() for p in self.pending]
        return {
            "A": self.A.clone(),
            "G": self.G.clone(),
            "basis_a": basis_a.clone(),
            "basis_g": basis_g.clone(),
            "values_a": None if self.values_a is None else self.values_a.clone(),
            "values_g": None if self.values_g is None else self.values_g.clone(),
            "scalings": scalings.clone(),
            "pending": pending,
            "stale": self.stale,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.A, self.G = state["A"].clone(), state["G"].clone()
        self.basis_a, self.basis_g = state["basis_a"].clone(), state["basis_g"].clone()
        self.scalings = state["scalings"].clone()
        # States written before the eigenvalues were kept: the factors' Rayleigh
        # quotients in the stored basis stand in for them.
        values_a, values_g = state.get("values_a"), state.get("values_g")
        self.values_a = _rayleigh(self.A, self.basis_a) if values_a is None else values_a.clone()
        self.values_g = _rayleigh(self.G, self.basis_g) if values_g is None else values_g.clone()
        pending = state["pending"]
        if pending is None:
            self.pending = None
        elif len(pending) == 4:
            self.pending = (
                pending[0].clone(),
                pending[1].clone(),
                pending[2].clone(),
                pending[3].clone(),
            )
        else:  # (basis_a, basis_g) from before the eigenvalues were kept
            basis_a, basis_g = pending[0].clone(), pending[1].clone()
            self.pending = (
                _rayleigh(self.A, basis_a),
                basis_a,
                _rayleigh(self.G, basis_g),
                basis_g,
            )
        self.stale = bool(state["stale"])


class EKFAC(LayerwiseApprox):
    r"""Eigenvalue-corrected KFAC: KFAC's eigenbasis, per-sample second moments as eigenvalues.

    The estimate, its two time scales and the damping rules
    ([`EKFACDamping`][curvlib.approx.ekfac.EKFACDamping]) are described in
    [`curvlib.approx.ekfac`][curvlib.approx.ekfac]. In the
    optimizer the eigenbasis is refreshed every ``t_inv`` steps and the
    scalings every ``t_cov`` steps; each statistics step also rebuilds the
    inverse, which costs nothing beyond the reciprocal of the damped eigenvalues.

    Cost per layer with $d_o$ rows and $d_i$ columns: update
    $O(K N T (d_o^2 + d_i^2))$ to rotate the per-sample statistics plus the
    second moments (one GEMM for a ``Linear`` layer; per-sample matrices in
    chunks for convolutions), and at the first update after a refresh the
    scalings carried to the new basis, $O(d_o^3 + d_i^3 + d_o d_i (d_o + d_i))$;
    refresh two eigendecompositions $O(d_o^3 + d_i^3)$; apply four products,
    $O(2 d_o d_i (d_o + d_i))$.

    Example:
        >>> sorted(k.name for k in EKFAC().required_stats)
        ['KRONECKER', 'PER_SAMPLE_IO']

    Args:
        damping: How $\lambda$ enters (``FACTORED``, KFAC's $\pi$ split in the
            eigenbasis, or ``EXACT``).
        decay: Upper bound of the running-average weight on the old estimate
            (the same for $A$, $G$ and $s$).
        dtype: Storage dtype of the estimate (default: that of the statistics).
        apply_dtype: The dtype the inverse is applied in on every step:
            ``"auto"`` (the default) multiplies in bfloat16 for float32
            estimates on CPUs that multiply bfloat16 in hardware, layers large
            enough to gain and damped operators with condition numbers of at
            most 4096 (an eigenbasis inverse errs by $2^{-8}\sqrt\kappa$,
            [`LOW_PRECISION_MAX_CONDITION_EIGENBASIS`][curvlib.linalg.precision.LOW_PRECISION_MAX_CONDITION_EIGENBASIS]),
            else in the estimate's dtype; ``None`` always in the estimate's
            dtype; or a dtype such as ``torch.bfloat16``.

    Raises:
        ValueError: If ``damping`` or ``apply_dtype`` is not one of its choices.

    References:
        T. George, C. Laurent, X. Bouthillier, N. Ballas and P. Vincent, "Fast
        approximate natural gradient descent in a Kronecker-factored eigenbasis",
        NeurIPS 2018.
    """

    required_stats: ClassVar[frozenset[StatKind]] = frozenset(
        {StatKind.KRONECKER, StatKind.PER_SAMPLE_IO}
    )

    default_kl_clip: ClassVar[float] = 1.5e-3
    r"""The optimizer's KL clip over EKFAC when none is given, half of KFAC's $3\cdot10^{-3}$.

    ([`default_kl_clip`][curvlib.optim.defaults.default_kl_clip].) EKFAC's
    scalings sit below KFAC's $e_G \otimes e_A$ in some directions, where its
    steps are longer for the same bound. At KFAC's bound it stalled at the mean
    image on two of three seeds of the convergence benchmark's ReLU autoencoder
    ([results](../results/convergence.md#ekfacs-own-defaults-and-its-bfloat16-apply)).
    """

    default_max_move: ClassVar[float | None] = 0.1
    r"""A layer's largest step when none is given: $0.1$ of its weights' norm, half of KFAC's.

    ([`default_max_move`][curvlib.optim.defaults.default_max_move].) At KFAC's
    $0.2$ (and without any bound) the examples' CNN stayed at chance
    level on one seed of five (``python examples/cnn.py --optim ekfac --num-train
    3000 --num-epochs 3 --threads 1 --seed 0``: test accuracy 0.094), and at
    $0.1$ every seed trained (0.895 to 0.921, against 0.8275 to 0.905 on the
    other four at $0.2$)
    ([results](../results/convergence.md#a-bound-on-each-layers-step)).
    """

    default_t_inv: ClassVar[int] = 20
    """Steps between refreshes of the eigenbasis when none is given, twice KFAC's 10.

    ([`default_t_inv`][curvlib.optim.defaults.default_t_inv].) The scalings
    are still updated on every statistics step (every ``t_cov``, 10 by default);
    only the two eigendecompositions per layer wait.
    """

    def __init__(
        self,
        damping: EKFACDamping | str = EKFACDamping.FACTORED,
        decay: float = DEFAULT_DECAY,
        dtype: torch.dtype | None = None,
        apply_dtype: ApplyDtype = "auto",
    ) -> None:
        super().__init__(decay=decay, dtype=dtype)
        self.damping_mode = EKFACDamping(damping)
        self.apply_dtype = check_apply_dtype(apply_dtype)

    def _make_block(self, out_dim: int, in_dim: int) -> LayerBlock:
        return _EKFACBlock(out_dim, in_dim, self.dtype, self.damping_mode, self.apply_dtype)

    def refresh(self) -> None:
        """Recompute every layer's eigenbasis from its running factors (two ``eigh`` each).

        The new bases take effect at the next ``update``, which carries the
        scalings over to them before folding in its batch's second moments
        (module docstring); until then ``matvec``
        and ``inverse`` keep the current estimate. Layers whose factors have
        not changed since their basis was computed are skipped. All layers are
        refreshed or none: if an eigendecomposition fails, nothing changes and
        the error propagates.
        """

        def draft(_: str, block: LayerBlock) -> _EigenbasisDraft | None:
            assert isinstance(block, _EKFACBlock)
            return block.draft_refresh()

        def refresh(_: str, block: LayerBlock) -> None:
            assert isinstance(block, _EKFACBlock)
            block.refresh()

        with self._all_or_none():
            # The eigendecompositions checked with one host read; those that fail retry.
            drafts = {n: d for n, d in self._each_block(draft).items() if d is not None}
            values = host_values({name: d.numbers for name, d in drafts.items()})
            done = {
                name
                for name, d in drafts.items()
                if self._blocks[name].adopt_draft(d, values[name])  # type: ignore[attr-defined]
            }
            self._each_block(refresh, [name for name in self._blocks if name not in done])

    # -- a refresh split by layer (data-parallel training) ---------------------------------

    splits_update: ClassVar[bool] = True
    """Each layer's new scalings (and first eigenbasis) are computed by its owner (``fitted``)."""
    owner_statistics: ClassVar[frozenset[StatKind]] = frozenset({StatKind.PER_SAMPLE_IO})
    """Only the scalings read the per-sample statistics; ``update_with`` reads the factors."""

    splits_refresh: ClassVar[bool] = True
    """Whether ``refresh`` can be split by layer: ``refresh_due``, ``refreshed``, ``adopt_refresh``.

    In data-parallel training with ``DataParallel(split_inverses=True)`` each
    layer's owner computes its new basis (``refreshed``), the owners broadcast
    them, and every rank adopts all of them (``adopt_refresh``): every rank ends
    with the estimate that ``refresh`` gives
    ([Distributed training](../distributed.md)).
    """

    def refresh_due(self) -> dict[str, Tensor]:
        """An empty tensor for every layer whose basis ``refresh`` would recompute.

        Shaped, typed and placed like that layer's packed basis (``refreshed``);
        the layers whose factors changed since their basis was computed, in the
        order of the blocks. Ranks that hold the same estimate list the same ones.
        """
        return {
            name: block.packed_template()
            for name, block in self._ekfac_blocks().items()
            if block.refresh_due
        }

    def refreshed(self, layers: Collection[str]) -> dict[str, Tensor]:
        r"""The next eigenbasis of each of ``layers``, packed flat; the estimate is unchanged.

        Packed as the eigenvalues of $A$, its eigenvectors (row-major), then those
        of $G$: $d_i + d_i^2 + d_o + d_o^2$ numbers. A layer whose
        eigendecomposition fails comes back filled with NaN, so that its owner
        still sends it; ``adopt_refresh`` then refuses it on every rank alike.

        Raises:
            ValueError: For a layer that ``refresh_due`` does not list.
        """
        due = self.refresh_due()
        unknown = [name for name in layers if name not in due]
        if unknown:
            raise ValueError(
                f"No refresh is due for layers {unknown}: pass names from refresh_due()."
            )

        def part(_: str, block: LayerBlock) -> Tensor:
            assert isinstance(block, _EKFACBlock)
            return block.packed_refresh()

        return self._each_block(part, set(layers))

    def adopt_refresh(self, packed: Mapping[str, Tensor]) -> None:
        """Switch to bases that ``refreshed`` computed, here or on another rank, at the next update.

        Afterwards the estimate is the one ``refresh`` would leave. All layers
        are taken or none.

        Args:
            packed: The packed basis of every layer that ``refresh_due`` lists.

        Raises:
            ValueError: If ``packed`` does not hold exactly the due layers with
                their sizes, or holds a non-finite basis (an eigendecomposition
                that failed on the rank that computed it); then nothing changes.
        """
        check_parts(
            packed, self.refresh_due(), "new eigenbases", "adopt_refresh", "refresh_due()",
            failure=ValueError,
        )  # fmt: skip
        blocks = self._ekfac_blocks()
        for name, part in packed.items():
            blocks[name].adopt(part)

    def _ekfac_blocks(self) -> dict[str, _EKFACBlock]:
        blocks: dict[str, _EKFACBlock] = {}
        for name, block in self._blocks.items():
            assert isinstance(block, _EKFACBlock)
            blocks[name] = block
        return blocks
