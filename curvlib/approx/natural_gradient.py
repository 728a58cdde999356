r"""Exact and block-diagonal natural gradient through Woodbury solves in sample space.

Both approximations keep the per-sample gradient rows of the latest statistics
batch, $U \in \mathbb{R}^{m \times P}$ with $m = KN$ rows
$\operatorname{vec}(\bar W_{kn}) / \sqrt N$ ($N$ = the rows of the per-sample
inputs, which is ``stats.num_samples``), so that
$U^\top U = F = \frac1N\sum_{k,n}\operatorname{vec}(\bar W_{kn})
\operatorname{vec}(\bar W_{kn})^\top$
([`curvlib.core.conventions`][curvlib.core.conventions]), and invert
$F + \lambda I$ in the $m$-dimensional sample space
([`curvlib.linalg.woodbury`][curvlib.linalg.woodbury]): no $P \times P$ matrix is
ever formed, except by the ``to_dense*`` methods that exist for small nets and
tests.

**Latest batch only.** The running average $\rho F_{k-1} + (1-\rho)\hat F_k$ of
the other approximations is the Gram matrix of *all* past rows (each batch's rows
times the square root of its running-average weight), so its sample space grows
with every update and the $O(m^2 P + m^3)$ inverse grows with it; a truncated
window of $W$ batches would cost $W^2$ to $W^3$ times more. Both classes
therefore hold the rows of the last ``update`` only, have no ``decay`` argument,
and a larger statistics batch is the way to a smoother estimate. This is what
the reference implementation of the KPSVD paper does too (statistics refreshed
on every step).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from enum import Enum
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from curvlib.approx.base import (
    LayerBlock,
    LayerwiseApprox,
    NonFiniteStatisticsError,
    check_parts,
    check_sampling,
    standard_normal,
)
from curvlib.core.checkpoint import RECORD_KEY, check_record, writer_record
from curvlib.core.layout import CurvatureLayer, LayerKind
from curvlib.core.stats import CurvatureStatistics, LayerStatistics, PerSampleIO, StatKind
from curvlib.linalg.woodbury import (
    LayerRows,
    RowsWithGram,
    WoodburyInverse,
    WoodburyInverseSqrt,
    gram_matvec,
    layer_rows,
)

ALL_LAYERS = "*"
"""The key of the one condition estimate of the exact natural-gradient inverse."""


def _rows(io: PerSampleIO) -> LayerRows:
    r"""The rows $\operatorname{vec}(\bar W_{kn}) / \sqrt N$ of one layer."""
    return layer_rows(io.inputs, io.output_grads, 1.0 / math.sqrt(io.inputs.shape[0]))


def _cast_io(io: PerSampleIO, dtype: torch.dtype | None) -> PerSampleIO:
    """A private copy (never an alias of the caller's tensors) in the storage dtype."""
    return PerSampleIO(
        inputs=io.inputs.detach().to(dtype=dtype or io.inputs.dtype, copy=True),
        output_grads=io.output_grads.detach().to(dtype=dtype or io.output_grads.dtype, copy=True),
    )


def _check_damping(damping: float) -> None:
    if not 0.0 < damping < float("inf"):
        raise ValueError(f"damping must be positive and finite, got {damping!r}.")


def _missing_io(owner: str, name: str) -> ValueError:
    return ValueError(
        f"{owner} needs ['PER_SAMPLE_IO'] statistics for layer {name!r}; create the "
        "extractor with stats={StatKind.PER_SAMPLE_IO}."
    )


def gram_cost(layer: CurvatureLayer) -> float:
    r"""The cost of a layer's kernel block $U_l U_l^\top$, in units of $m^2$.

    $d_\text{out} + d_\text{in}$ for a ``Linear`` layer, whose rows stay
    factored ($O(m^2 d_\text{out} + N^2 d_\text{in})$), and $P_l =
    d_\text{out} d_\text{in}$ for the others, whose per-sample gradients are
    formed ($O(m^2 P_l)$; forming them, $O(mTP_l)$, is left out: the positions
    $T$ depend on the input). $d_\text{in}$ counts the bias column. The layout
    does not know the inputs' shape, so a ``Linear`` layer applied to sequences
    (several positions, whose per-sample gradients are formed too) is counted
    as if it had one position. What data-parallel training balances the owners
    by ([`curvlib.distributed.ownership`][curvlib.distributed.ownership]).
    """
    if layer.kind is LayerKind.LINEAR:
        return float(layer.out_dim + layer.in_dim_aug)
    return float(layer.out_dim * layer.in_dim_aug)


def _top_gram_eigenvalue(rows: Tensor) -> float:
    r"""$\|X^\top X\|_2 = \sigma_\max(X)^2$, through the smaller of the two Gram matrices."""
    gram = rows.T @ rows if rows.shape[0] >= rows.shape[1] else rows @ rows.T
    return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0))


class SampleSpaceInverse(Protocol):
    """A factorised inverse over the column blocks of $U$, applied to one matrix per block.

    [`WoodburyInverse`][curvlib.linalg.woodbury.WoodburyInverse] (the full Fisher)
    or [`BlockTridiagonalInverse`][curvlib.linalg.tridiagonal.BlockTridiagonalInverse].
    """

    @property
    def blocks(self) -> tuple[LayerRows, ...]:
        """The column blocks, one per layer."""
        ...

    def __call__(self, mats: Sequence[Tensor]) -> list[Tensor]:
        """Apply the inverse to one ``[..., out_l, in_l]`` matrix per block."""
        ...


class WoodburyPreconditioner:
    r"""$(F + \lambda I)^{-1}$ of a Fisher that couples several layers, in sample space.

    Returned by
    [`ExactNaturalGradient.inverse`][curvlib.approx.natural_gradient.ExactNaturalGradient.inverse]
    (the full Fisher) and
    [`BlockTridiagonalNaturalGradient.inverse`][curvlib.approx.wide.BlockTridiagonalNaturalGradient]
    (its block-tridiagonal part).

    Args:
        layers: Layer names in the order of the column blocks of ``woodbury``.
        woodbury: The factorised sample-space inverse.
    """

    def __init__(self, layers: Sequence[str], woodbury: SampleSpaceInverse) -> None:
        self._layers = tuple(layers)
        self.woodbury = woodbury
        self.condition_numbers: dict[str, float] = (
            {ALL_LAYERS: woodbury.condition_estimate()}
            if isinstance(woodbury, WoodburyInverse)
            else {}
        )
        r"""For the full Fisher, one lower bound of the condition number of the whole
        $F + \lambda I$, keyed ``"*"`` (the operator couples the layers):
        [`WoodburyInverse.condition_estimate`][curvlib.linalg.woodbury.WoodburyInverse.condition_estimate];
        empty for the block-tridiagonal Fisher, which may be indefinite."""

    @property
    def layers(self) -> tuple[str, ...]:
        """The layers this preconditioner couples, in the vectorisation order."""
        return self._layers

    def apply(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Multiply per-layer gradient matrices by the damped inverse of the full Fisher.

        Args:
            grads: One ``[..., out, in_aug]`` matrix for *every* layer (the inverse
                couples them), with the same leading dimensions.

        Returns:
            The preconditioned matrices, keyed like ``grads``.

        Raises:
            KeyError: If a layer is missing or unknown.
        """
        _check_keys(grads, self._layers)
        out = self.woodbury([grads[name] for name in self._layers])
        result = dict(zip(self._layers, out, strict=True))
        return {name: result[name] for name in grads}

    def matvec(self, vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The same as ``apply``: this operator *is* the inverse."""
        return self.apply(vectors)

    def to_dense(self, layer: str) -> Tensor:
        r"""The diagonal block of $(F + \lambda I)^{-1}$ for one layer, ``[P_l, P_l]``.

        Not the inverse of the layer's block of $F + \lambda I$: the other layers
        are coupled in. $P_l$ applications, for small nets and tests.

        Raises:
            KeyError: If the layer is unknown.
        """
        if layer not in self._layers:
            raise KeyError(f"Unknown layer {layer!r}; the layers are {list(self._layers)}.")
        return self._dense_columns(layer)[layer]

    def to_dense_full(self) -> Tensor:
        r"""The whole $(F + \lambda I)^{-1}$, ``[P, P]`` in the order of ``layers``."""
        columns = [
            torch.cat([cols[name] for name in self._layers], dim=0)
            for cols in (self._dense_columns(layer) for layer in self._layers)
        ]
        return torch.cat(columns, dim=1)

    def _dense_columns(self, layer: str) -> dict[str, Tensor]:
        """Rows of the inverse for the columns of ``layer``: ``{name: [P_name, P_layer]}``."""
        shapes = {n: b.shape[1:] for n, b in zip(self._layers, self.woodbury.blocks, strict=True)}
        rows = self.woodbury.blocks[self._layers.index(layer)]
        out_dim, in_dim = shapes[layer]
        size = out_dim * in_dim
        basis = torch.eye(size, dtype=rows.dtype, device=rows.device).reshape(size, out_dim, in_dim)
        zeros = {
            n: torch.zeros(size, *shape, dtype=rows.dtype, device=rows.device)
            for n, shape in shapes.items()
        }
        applied = self.apply({**zeros, layer: basis})
        return {n: applied[n].reshape(size, -1).T for n in self._layers}


def _noise(rows: LayerRows, num_samples: int, generator: torch.Generator | None) -> Tensor:
    _, out_dim, in_dim = rows.shape
    like = torch.empty(0, dtype=rows.dtype, device=rows.device)
    return standard_normal((num_samples, out_dim, in_dim), like, generator)


def _check_keys(vectors: Mapping[str, Tensor], layers: Sequence[str]) -> None:
    if not layers:
        raise RuntimeError("No curvature estimate yet: update() first.")
    missing = [name for name in layers if name not in vectors]
    unknown = [name for name in vectors if name not in layers]
    if missing or unknown:
        raise KeyError(
            f"This Fisher couples all layers {list(layers)}: pass a matrix for each "
            f"(missing {missing}, unknown {unknown})."
        )


class ExactNaturalGradient:
    r"""Natural gradient with the full Fisher matrix, all cross-layer blocks included.

    With the rows $U = [U_1 \mid \dots \mid U_L]$ of the latest batch (module
    docstring), $F = U^\top U$ and the damping is exact Tikhonov damping,

    $$(F + \lambda I)^{-1} g = \frac1\lambda\left(g - U^\top(\lambda I + UU^\top)^{-1}
    Ug\right), \qquad UU^\top = \sum_l U_l U_l^\top \in \mathbb{R}^{m\times m}.$$

    **Layer order.** The parameter vector stacks the row-major $[W \mid b]$ of each
    layer in the order of ``stats.layers`` of the latest ``update``: the extractor
    fills it in the layout's ``named_modules()`` order, which is also the order of
    ``to_dense_full()`` and of
    [`layers`][curvlib.approx.natural_gradient.ExactNaturalGradient.layers].

    Cost with $m = KN$ rows and $P = \sum_l P_l$ parameters: ``update`` stores the
    statistics ($O(1)$ work); ``inverse`` forms the rows of convolutions
    ($O(mTP_l)$; layers with one output position keep $\bar a$ and $g$), the kernel
    ($O(m^2 P)$, $O(m^2 d_\text{out} + N^2 d_\text{in})$ for one-position layers) and
    its Cholesky factor ($O(m^3)$); ``apply`` and ``matvec`` $O(mP + m^2)$ per
    vector. Memory $O(mP + m^2)$; worthwhile while $m \ll P$.

    Example:
        ```python
        approx = ExactNaturalGradient()
        extractor = CurvatureExtractor(model, loss_fn, stats=approx.required_stats)
        with extractor.collect():
            loss_fn(model(x), y).backward()
        approx.update(extractor.statistics())
        grads = {layer.name: layer.grad_matrix() for layer in extractor.layout.layers}
        step = approx.inverse(damping=1e-3).apply(grads)
        ```

    Args:
        dtype: Storage dtype of the statistics (default: theirs).

    References:
        S. Amari, "Natural gradient works efficiently in learning", Neural
        Computation 10(2), 1998. Y. Ren and D. Goldfarb, "Efficient subsampled
        Gauss-Newton and natural gradient methods for training neural networks",
        arXiv:1906.02353, 2019 (the sample-space Woodbury solve). A. Koroko et
        al., "Efficient approximations of the Fisher matrix in neural networks
        using Kronecker product singular value decomposition", ESAIM: Proceedings
        and Surveys 73, 2023 (exact NG as the reference of KPSVD).
    """

    required_stats: ClassVar[frozenset[StatKind]] = frozenset({StatKind.PER_SAMPLE_IO})
    couples_layers: ClassVar[bool] = True
    """Cross-layer blocks included: one layer's direction may oppose its gradient."""
    splits_grams: ClassVar[bool] = True
    """In data-parallel training with ``split_inverses``, each layer's kernel block
    is computed by one rank and broadcast (``grams``, ``inverse(grams=...)``)."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype
        self.num_updates = 0
        self._io: dict[str, PerSampleIO] = {}
        self._rows_cache: dict[str, LayerRows] | None = None

    @property
    def layers(self) -> tuple[str, ...]:
        """The layers of the estimate, in the vectorisation order."""
        return tuple(self._io)

    @property
    def num_rows(self) -> int:
        """``m = K * N``, the dimension of the sample space (0 before ``update``)."""
        if not self._io:
            return 0
        io = next(iter(self._io.values()))
        return int(io.output_grads.shape[0] * io.output_grads.shape[1])

    def update(self, stats: CurvatureStatistics) -> None:
        """Replace the estimate by the rows of this batch (no running average).

        Raises:
            NonFiniteStatisticsError: If any statistic has NaN/Inf entries; then
                nothing is changed.
            ValueError: If per-sample inputs and output gradients are missing, or
                the layers disagree on the number of samples or columns.
        """
        if not stats.is_finite():
            raise NonFiniteStatisticsError(
                "Statistics contain NaN or Inf; the curvature estimate was left unchanged."
            )
        if not stats.layers:
            raise ValueError("The statistics hold no layers.")
        ios: dict[str, PerSampleIO] = {}
        for name, layer_stats in stats.layers.items():
            if layer_stats.io is None:
                raise _missing_io(type(self).__name__, name)
            ios[name] = _cast_io(layer_stats.io, self.dtype)
        sizes = {name: tuple(io.output_grads.shape[:2]) for name, io in ios.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(
                "The full Fisher needs the same samples and columns (K, N) in every layer, "
                f"got {sizes}."
            )
        self._io = ios
        self._rows_cache = None
        self.num_updates += 1

    def _rows(self) -> dict[str, LayerRows]:
        if not self._io:
            raise RuntimeError("No curvature estimate yet: update() first.")
        if self._rows_cache is None:
            self._rows_cache = {name: _rows(io) for name, io in self._io.items()}
        return self._rows_cache

    def inverse(
        self, damping: float, *, grams: Mapping[str, Tensor] | None = None
    ) -> WoodburyPreconditioner:
        r"""A new operator applying $(F + \lambda I)^{-1}$ exactly.

        Args:
            damping: $\lambda > 0$.
            grams: Every layer's kernel block $U_l U_l^\top$ (``grams``), where
                other ranks computed them: the inverse is built from these
                instead of computing the blocks again, and is the same to the
                bit when they are the same.

        Raises:
            ValueError: If ``damping`` is not positive and finite, or ``grams``
                does not hold exactly the layers of ``gram_templates()`` in
                their shapes.
            OwnerFailedError: If a block in ``grams`` is not finite (computing
                it failed on the rank that owns it); nothing is changed.
            RuntimeError: Before the first ``update``.
        """
        _check_damping(damping)
        rows = self._rows()
        blocks = list(rows.values())
        if grams is not None:
            like = self.gram_templates()
            check_parts(grams, like, "kernel blocks", "inverse", "gram_templates()")
            blocks = [RowsWithGram(rows[name], grams[name]) for name in rows]
        return WoodburyPreconditioner(tuple(rows), self._solver(blocks, damping))

    def work_cost(self, layer: CurvatureLayer) -> float:
        r"""The cost of ``layer``'s kernel block, in units of $m^2$.

        See [`gram_cost`][curvlib.approx.natural_gradient.gram_cost]. What
        data-parallel training balances the layers' owners by: the blocks
        ($O(m^2 P)$ in all) are the inverse's expensive part; the $m \times m$
        factorisation of their sum is built on every rank.
        """
        return gram_cost(layer)

    def gram_templates(self) -> dict[str, Tensor]:
        """An empty ``[m, m]`` tensor per layer, in the dtype and device of the kernel blocks.

        Raises:
            RuntimeError: Before the first ``update``.
        """
        rows = self._rows()
        return {
            name: torch.empty(r.num_rows, r.num_rows, dtype=r.dtype, device=r.device)
            for name, r in rows.items()
        }

    def grams(self, layers: Collection[str]) -> dict[str, Tensor]:
        r"""The kernel blocks $U_l U_l^\top$ of ``layers``, ``[m, m]`` each.

        In data-parallel training with ``split_inverses`` each rank computes
        those of the layers it owns and broadcasts them; every rank passes all
        of them to ``inverse(damping, grams=...)``. Cost $O(m^2 P_l)$ per layer
        ($O(m^2 d_\text{out} + N^2 d_\text{in})$ for one output position).

        Raises:
            KeyError: For a layer without an estimate.
            RuntimeError: Before the first ``update``.
        """
        rows = self._rows()
        return {name: rows[self._check_layer(name)].gram() for name in layers}

    def _solver(self, blocks: list[LayerRows], damping: float) -> SampleSpaceInverse:
        """The sample-space inverse of this Fisher (a hook for the block-tridiagonal one)."""
        return WoodburyInverse(blocks, damping)

    def _product(self, blocks: list[LayerRows], mats: list[Tensor]) -> list[Tensor]:
        """The product with this Fisher (a hook for the block-tridiagonal one)."""
        return gram_matvec(blocks, mats)

    def matvec(self, vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        r"""Multiply by the full $F$: $(Fv)_l = U_l^\top \sum_{l'} U_{l'} v_{l'}$.

        Args:
            vectors: One ``[..., out, in_aug]`` matrix for every layer.

        Raises:
            KeyError: If a layer is missing or unknown.
        """
        rows = self._rows()
        _check_keys(vectors, tuple(rows))
        out = self._product(list(rows.values()), [vectors[name] for name in rows])
        result = dict(zip(rows, out, strict=True))
        return {name: result[name] for name in vectors}

    def trace(self, layer: str | None = None) -> Tensor:
        r"""$\operatorname{tr} F = \sum_{k,n,l} \|U_{l,kn}\|^2$, or of one layer's diagonal block.

        Cost $O(m(d_\text{out} + d_\text{in}))$ per one-position layer, $O(mP_l)$
        otherwise.

        Raises:
            KeyError: If ``layer`` is unknown.
            RuntimeError: Before the first ``update``.
        """
        rows = self._rows()
        names = tuple(rows) if layer is None else (self._check_layer(layer),)
        return torch.stack([rows[name].row_sq_norms().sum() for name in names]).sum()

    def logdet(self, damping: float, layer: str | None = None) -> Tensor:
        r"""$\log\det(F + \lambda I)$ by the matrix determinant lemma, in sample space.

        $\log\det = (P - m)\log\lambda + \log\det(\lambda I_m + UU^\top)$
        ([`WoodburyInverse.logdet`][curvlib.linalg.woodbury.WoodburyInverse.logdet]):
        the cost of building the inverse, $O(m^2 P + m^3)$. With ``layer``, the
        log-determinant of that layer's diagonal block $F_{ll} + \lambda I$ (the
        layers are coupled, so these do not add up to the whole).

        Raises:
            ValueError: If ``damping`` is not positive and finite.
            KeyError: If ``layer`` is unknown.
            RuntimeError: Before the first ``update``.
        """
        _check_damping(damping)
        rows = self._rows()
        blocks = list(rows.values()) if layer is None else [rows[self._check_layer(layer)]]
        return WoodburyInverse(blocks, damping).logdet()

    def sample(
        self, damping: float, num_samples: int = 1, *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        r"""Joint draws from $\mathcal N(0, (F + \lambda I)^{-1})$ over all layers.

        Through the eigendecomposition of the kernel $UU^\top$, i.e. the thin
        SVD of the per-sample gradient matrix
        ([`WoodburyInverseSqrt`][curvlib.linalg.woodbury.WoodburyInverseSqrt]):
        $O(m^2 P + m^3)$ once, $O(mP)$ per draw; never a $P\times P$ matrix. The
        layers are correlated, as in $F$.

        Args:
            damping: $\lambda > 0$.
            num_samples: Number of draws.
            generator: Source of randomness (noise drawn layer by layer, in the
                order of ``layers``).

        Returns:
            ``[num_samples, out, in]`` per layer.

        Raises:
            ValueError: If ``damping`` or ``num_samples`` is not positive.
            TypeError: If ``generator`` is not a ``torch.Generator``.
            RuntimeError: Before the first ``update``.
        """
        _check_damping(damping)
        check_sampling(num_samples, generator)
        rows = self._rows()
        sqrt = WoodburyInverseSqrt(list(rows.values()), damping)
        noise = [_noise(block, num_samples, generator) for block in rows.values()]
        return dict(zip(rows, sqrt(noise), strict=True))

    def _check_layer(self, layer: str) -> str:
        if layer not in self._io:
            raise KeyError(f"No curvature estimate for layer {layer!r}: update() first.")
        return layer

    def to_dense(self, layer: str) -> Tensor:
        r"""The diagonal block $U_l^\top U_l$ of one layer, ``[P_l, P_l]``."""
        rows = self._rows()
        if layer not in rows:
            raise KeyError(f"No curvature estimate for layer {layer!r}: update() first.")
        flat = rows[layer].dense().flatten(1)
        return flat.T @ flat

    def to_dense_full(self) -> Tensor:
        r"""The whole Fisher $U^\top U$, ``[P, P]`` in the order of ``layers`` (small nets only)."""
        flat = torch.cat([r.dense().flatten(1) for r in self._rows().values()], dim=1)
        return flat.T @ flat

    def state_dict(self) -> dict[str, Any]:
        """The counter and the stored rows, as the inputs and output gradients they come from.

        The layer order is the order of ``"io"``.
        """
        return {
            RECORD_KEY: writer_record(self),
            "num_updates": self.num_updates,
            "io": {
                name: {"inputs": io.inputs.clone(), "output_grads": io.output_grads.clone()}
                for name, io in self._io.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the estimate saved by ``state_dict()``.

        Raises:
            ValueError: If another approximation wrote ``state``; nothing is changed then.
        """
        check_record(state, writer_record(self), f"this {type(self).__name__}")
        io = {
            name: PerSampleIO(
                inputs=entry["inputs"].clone(), output_grads=entry["output_grads"].clone()
            )
            for name, entry in state["io"].items()
        }
        num_updates = int(state["num_updates"])
        self._io, self._rows_cache, self.num_updates = io, None, num_updates


class NGDamping(Enum):
    r"""How the block-diagonal natural gradient damps each layer.

    Used by [`BlockNaturalGradient`][curvlib.approx.natural_gradient.BlockNaturalGradient].

    Attributes:
        EXACT: Exact Tikhonov damping, $F_l + \lambda I$ in every layer.
        HEURISTIC: The per-layer heuristic of the KPSVD paper's reference code,
            $F_l + \lambda_l I$ with
            $\lambda_l = \big\|(G_l + \sqrt\lambda I)\otimes(A_l + \sqrt\lambda I)
            - G_l \otimes A_l\big\|_2 = \lambda + \sqrt\lambda\,(\|A_l\|_2 + \|G_l\|_2)$,
            the spectral norm of the terms that unsplit factored KFAC damping adds
            to the layer, used as one isotropic term. $A_l$, $G_l$ are the KFAC factors of
            the stored batch ([`curvlib.core.conventions`][curvlib.core.conventions]).
            The reference (``heuristic_damping`` in ``optimizers/exact_natural_gradient.py``
            of Koroko's ``natural-gradients``) computes
            $\gamma\sigma_\max(A) + \gamma\sigma_\max(G) + \gamma^2$ for its damping
            $\gamma$: curvlib's $\lambda$ is the constant term, so $\lambda = \gamma^2$
            reproduces it; its $A$ of a convolution averages over the $T$ output
            positions, where curvlib's KFC factor sums over them, so for
            convolutions the $A$ term here is $T$ times the reference's (identical
            for ``Linear`` layers). $\lambda_l \ge \lambda$: the damped operator
            always contains $\lambda I$.
    """

    EXACT = "exact"
    HEURISTIC = "heuristic"


class WoodburyLayerInverse:
    r"""$(F_l + \lambda_l I)^{-1}$ of one layer, applied to ``[..., out, in_aug]`` matrices.

    Args:
        woodbury: The factorised sample-space inverse of the layer.
    """

    def __init__(self, woodbury: WoodburyInverse) -> None:
        self.woodbury = woodbury
        self.condition_number = woodbury.condition_estimate()
        r"""A lower bound of the condition number of $F_l + \lambda_l I$."""

    def __call__(self, mat: Tensor) -> Tensor:
        """Apply the damped inverse."""
        return self.woodbury([mat])[0]


class _NGBlock(LayerBlock):
    def __init__(
        self, out_dim: int, in_dim: int, dtype: torch.dtype | None, damping: NGDamping
    ) -> None:
        super().__init__(out_dim, in_dim, dtype)
        self.damping_mode = damping
        self.io: PerSampleIO | None = None
        self._rows_cache: LayerRows | None = None
        self._norms: tuple[float, float] | None = None

    def update(self, stats: LayerStatistics, rho: float) -> None:
        # rho is ignored: the block keeps the latest batch (module docstring).
        assert stats.io is not None
        self._set(_cast_io(stats.io, self.dtype))

    def _set(self, io: PerSampleIO) -> None:
        self.io, self._rows_cache, self._norms = io, None, None

    def _io(self) -> PerSampleIO:
        if self.io is None:
            raise RuntimeError("Natural-gradient block has no estimate yet: update() first.")
        return self.io

    def rows(self) -> LayerRows:
        if self._rows_cache is None:
            self._rows_cache = _rows(self._io())
        return self._rows_cache

    def factor_norms(self) -> tuple[float, float]:
        r"""$(\|A\|_2, \|G\|_2)$ of the KFAC factors of the stored batch."""
        if self._norms is None:
            io = self._io()
            n, t = io.inputs.shape[:2]
            a_rows = io.inputs.reshape(n * t, -1) / math.sqrt(n)
            g_rows = io.output_grads.reshape(-1, io.output_grads.shape[-1]) / math.sqrt(n * t)
            self._norms = (_top_gram_eigenvalue(a_rows), _top_gram_eigenvalue(g_rows))
        return self._norms

    def layer_damping(self, damping: float) -> float:
        if self.damping_mode is NGDamping.EXACT:
            return float(damping)
        norm_a, norm_g = self.factor_norms()
        return float(damping + math.sqrt(damping) * (norm_a + norm_g))

    def matvec(self, mat: Tensor) -> Tensor:
        return gram_matvec([self.rows()], [mat])[0]

    def inverse(self, damping: float) -> WoodburyLayerInverse:
        _check_damping(damping)
        return WoodburyLayerInverse(WoodburyInverse([self.rows()], self.layer_damping(damping)))

    def trace(self) -> Tensor:
        r"""$\operatorname{tr} F_l$, the sum of the squared row norms: $O(m(d_o + d_i))$."""
        return self.rows().row_sq_norms().sum()

    def logdet(self, damping: float) -> Tensor:
        r"""$\log\det(F_l + \lambda_l I)$ by the determinant lemma, $O(m^2 P_l + m^3)$."""
        _check_damping(damping)
        return WoodburyInverse([self.rows()], self.layer_damping(damping)).logdet()

    def sample(
        self, damping: float, num_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""Draws from $\mathcal N(0, (F_l + \lambda_l I)^{-1})$ through the thin SVD of $U_l$.

        [`WoodburyInverseSqrt`][curvlib.linalg.woodbury.WoodburyInverseSqrt]:
        $O(m^2 P_l + m^3)$ once, $O(mP_l)$ per draw.
        """
        _check_damping(damping)
        rows = self.rows()
        sqrt = WoodburyInverseSqrt([rows], self.layer_damping(damping))
        return sqrt([_noise(rows, num_samples, generator)])[0]

    def condition_number(self, damping: float) -> float:
        r"""A lower bound of the condition number of $F_l + \lambda_l I$.

        [`WoodburyInverse.condition_estimate`][curvlib.linalg.woodbury.WoodburyInverse.condition_estimate],
        with the cost of building the inverse.
        """
        return self.inverse(damping).condition_number

    def _device(self) -> torch.device:
        return self.io.inputs.device if self.io is not None else torch.device("cpu")

    def to_dense(self) -> Tensor:
        flat = self.rows().dense().flatten(1)
        return flat.T @ flat

    def damped_to_dense(self, damping: float) -> Tensor:
        r"""$F_l + \lambda_l I$ with $\lambda_l$ of the damping mode."""
        dense = self.to_dense()
        eye = torch.eye(dense.shape[0], dtype=dense.dtype, device=dense.device)
        return dense + self.layer_damping(damping) * eye

    def state_dict(self) -> dict[str, Any]:
        io = self._io()
        return {"inputs": io.inputs.clone(), "output_grads": io.output_grads.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._set(
            PerSampleIO(inputs=state["inputs"].clone(), output_grads=state["output_grads"].clone())
        )


class BlockNaturalGradient(LayerwiseApprox):
    r"""Natural gradient with the block-diagonal Fisher: one exact block per layer.

    Each layer's block is $F_l = U_l^\top U_l$ with the rows of the latest batch
    (module docstring), inverted in its own sample space,

    $$(F_l + \lambda_l I)^{-1} g_l = \frac1{\lambda_l}\left(g_l - U_l^\top
    (\lambda_l I + U_l U_l^\top)^{-1} U_l g_l\right),$$

    with $\lambda_l = \lambda$ (``NGDamping.EXACT``) or the per-layer heuristic of
    [`NGDamping.HEURISTIC`][curvlib.approx.natural_gradient.NGDamping];
    ``damped_to_dense(layer, damping)`` returns $F_l + \lambda_l I$. Cross-layer
    blocks are dropped, so this is the exact block-diagonal reference that KFAC,
    KPSVD and Deflation approximate. The running average of
    [`LayerwiseApprox`][curvlib.approx.base.LayerwiseApprox] does not apply: every
    ``update`` replaces the blocks (``decay`` is fixed at 0).

    Cost per layer with $m = KN$ rows and $P_l$ parameters: ``update`` stores the
    statistics; ``inverse`` $O(mTP_l)$ to form convolution rows, $O(m^2 P_l)$ for
    the kernel ($O(m^2 d_\text{out} + N^2 d_\text{in})$ with one output position)
    and $O(m^3)$ for its Cholesky factor, plus $O(NT d_\text{in}^2 + mT
    d_\text{out}^2)$ and two small ``eigvalsh`` for ``HEURISTIC``; apply
    $O(mP_l + m^2)$ per vector.

    Example:
        >>> approx = BlockNaturalGradient(NGDamping.HEURISTIC)
        >>> approx.required_stats == frozenset({StatKind.PER_SAMPLE_IO})
        True

    Args:
        damping_mode: How $\lambda$ is turned into the per-layer $\lambda_l$.
        dtype: Storage dtype of the statistics (default: theirs).

    References:
        S. Amari, "Natural gradient works efficiently in learning", Neural
        Computation 10(2), 1998. A. Koroko et al., "Efficient approximations of
        the Fisher matrix in neural networks using Kronecker product singular
        value decomposition", ESAIM: Proceedings and Surveys 73, 2023 (the
        block-diagonal exact natural gradient as the reference of KPSVD and
        Deflation, and its heuristic damping).
    """

    required_stats: ClassVar[frozenset[StatKind]] = frozenset({StatKind.PER_SAMPLE_IO})

    def __init__(
        self, damping_mode: NGDamping | str = NGDamping.EXACT, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(decay=0.0, dtype=dtype)
        self.damping_mode = NGDamping(damping_mode)

    def _make_block(self, out_dim: int, in_dim: int) -> LayerBlock:
        return _NGBlock(out_dim, in_dim, self.dtype, self.damping_mode)

    def work_cost(self, layer: CurvatureLayer) -> float:
        r"""The layer's kernel block and Cholesky factor, in units of $m^2$.

        [`gram_cost`][curvlib.approx.natural_gradient.gram_cost] $+\, m$, with
        $m$ that of the stored batch ($0$ before the first ``update``).
        """
        block = self._blocks.get(layer.name)
        io = block.io if isinstance(block, _NGBlock) else None
        m = 0 if io is None else io.output_grads.shape[0] * io.output_grads.shape[1]
        return gram_cost(layer) + float(m)

    def layer_damping(self, layer: str, damping: float) -> float:
        r"""The $\lambda_l$ that ``inverse(damping)`` uses for ``layer``."""
        block = self._block(layer)
        assert isinstance(block, _NGBlock)
        return block.layer_damping(damping)
