r"""The rearranged Fisher in sample space, and the rule that picks a form per layer.

Per sample and pair of output positions, the rearrangement of
$\operatorname{vec}(\bar W_{kn})\operatorname{vec}(\bar W_{kn})^\top$ splits
into rank-one terms ([`curvlib.linalg.rearrange`][curvlib.linalg.rearrange]
for the notation),

$$\mathcal R(F) = \frac1N \sum_{n,t,t'} \operatorname{vec}(P_{ntt'})
\operatorname{vec}(Q_{ntt'})^\top, \qquad
P_{ntt'} = \sum_k g_{knt} g_{knt'}^\top, \quad Q_{ntt'} = \bar a_{nt} \bar a_{nt'}^\top ,$$

so its rank is at most $NT^2$ ($N$ for a ``Linear`` layer, $T = 1$), and its
singular vectors are combinations $V = \sum_j c_j Q_j$, $U = \sum_j d_j P_j$.
In these coefficients $\mathcal R$ acts through the Gram matrices of the terms,
$d = \frac1N K_Q c$ and $c = \frac1N K_P d$, with

$$K_Q[(n,t,t'), (m,s,s')] = (\bar a_{nt}^\top \bar a_{ms})(\bar a_{nt'}^\top \bar a_{ms'}),$$

$K_Q = (\bar A \bar A^\top) \circ (\bar A \bar A^\top)$ for $T = 1$, and $K_P$
alike from the output gradients (summed over the columns $k, k'$). The same
Gram matrices give the Frobenius inner products of the combinations, so the
power and Lanczos iterations of [`curvlib.linalg.rearrange`][curvlib.linalg.rearrange]
run on the coefficients unchanged
([`Coordinates`][curvlib.linalg.Coordinates]), and the factors are
formed once at the end, as weighted sums $\bar A^\top \operatorname{diag}(c)
\bar A$ (never one outer product at a time).

**Costs** (multiply-adds per layer; $d_i$, $d_o$ the factor sides, $K$ columns,
$p$ products with $\mathcal R$ and $\mathcal R^\top$ of one update, $r$ factor
pairs formed):

| form | once | per product pair | per factor pair formed |
|---|---|---|---|
| matrix-free, $T = 1$ | | $2N(d_i^2 + K d_o^2)$ | |
| matrix-free, $T > 1$ | $KNT d_o d_i$ | $2KN d_o d_i (d_o + d_i)$ | |
| sample space, $T = 1$ | $N^2 (d_i + K^2 d_o)$ | $2(1 + K^2) N^2$ | $N d_i^2 + KN d_o^2$ |
| sample space, $T > 1$ | per Gram side $K_s^2N^2T^2 d_s$ | see below | $NT(d_i^2 + K d_o^2)$ |

For $T > 1$ each side $s$ (inputs: $d_s = d_i$, $K_s = 1$; output gradients:
$d_s = d_o$, $K_s = K$) takes its product with the Gram matrix of the terms
one of two ways ([`SideRoute`][curvlib.linalg.SideRoute]):
through the Gram matrix of the $NT$ vectors, $\sum_m M^{nm}C_m(M^{nm})^\top$
($O(K_s^2N^2T^3)$ once the Gram matrix is built), or through the features,
$Y = \sum_m X_m^\top C_m X_m$ and then $X_n Y X_n^\top$ ($O(K_sN(T^2 d_s + T
d_s^2))$, no Gram matrix), which is far cheaper on a side with few features,
such as the output side of a convolution with few channels. Both give the same
numbers up to round-off; the cheaper at $p$ products is taken per side.

[`choose_form`][curvlib.linalg.sample_space.choose_form] takes the cheaper form at
$p$ = ``EXPECTED_PRODUCTS``. For a ``Linear`` layer with $d_i \approx d_o = d$
and $K = 1$ the sample space wins once $N \lesssim 9 d$; for a convolution
the sample space pays $N^2T^3$ per product on its wide side, and the
matrix-free form $N d_o d_i (d_o + d_i)$: on the convolutions of curvlib's
benchmark networks with many input channels (hundreds of columns) the sample
space wins, on the first ones (few columns, many positions) the matrix-free
form. The Gram matrices are computed in the working dtype (float32 at least),
from their upper triangle where that pays (as are the factors formed at the
end; [`gram`][curvlib.linalg.factors.gram]); the coefficients are iterated in
float64, and so are the products through the features and the kernels of a
layer with one position, so that the residuals are resolved below the float32
tolerance. A layer with several positions takes its products with a Gram
matrix in that matrix's dtype, float32 for float32 statistics (unless float32
matrix products may run in TF32 or bfloat16 passes): each rounds to about
$10^{-6}$ relative, where the power iterations stop at $1.2\cdot10^{-4}$
([`effective_tol`][curvlib.linalg.effective_tol]); on the benchmark's
convolutions they took the iterations of float64 products, to residuals equal
in two digits and factors equal to $10^{-7}$, in a fraction of the time
(``benchmarks/results/experiments/sample_space_gram/``). Computing the Gram
matrices of float32 statistics in float32, too, gives the top pairs of float64
Gram matrices to the float32 tolerance, at half the cost. The sample-space form is
skipped where its Gram matrices would exceed ``MAX_GRAM_ENTRIES``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlib.core.stats import PerSampleIO
from curvlib.linalg.factors import gram, gram_blocks, symmetrize
from curvlib.linalg.rearrange import Coordinates, Deflated, RearrangedFisher

EXPECTED_PRODUCTS = 10
"""Product pairs per update that the cost rule assumes (power iterations take 5 to 35)."""

MAX_GRAM_ENTRIES = 1 << 25
"""Largest Gram matrix of the sample-space form (256 MiB in float64)."""

STALL_WINDOW = 10
r"""Power iterations without a new smallest residual after which the sample-space form stops.

Its norms are quadratic forms in Gram matrices that are singular whenever the
terms are linearly dependent (e.g. $N > d_i(d_i+1)/2$, or with the KFAC term of
KFAC-corrected, a combination of the sample terms), so residuals resolve only
to about $\sqrt{\epsilon_{64}}$ times the conditioning: 1e-11 to 1e-8 in
curvlib's tests, far below the float32 tolerance (1.2e-4) but above a float64
one of 1e-12.
"""

_GRAM_DTYPE = torch.float64


class RearrangedForm(enum.Enum):
    r"""How products with $\mathcal R(F)$ are computed."""

    AUTO = "auto"
    """The cheaper of the two by [`choose_form`][curvlib.linalg.sample_space.choose_form]."""
    MATRIX_FREE = "matrix_free"
    """[`RearrangedFisher`][curvlib.linalg.RearrangedFisher]: on the matrices."""
    SAMPLE_SPACE = "sample_space"
    """[`SampleSpaceFisher`][curvlib.linalg.sample_space.SampleSpaceFisher]: on coefficients."""


class SideRoute(enum.Enum):
    r"""How one side of the sample-space form ($T > 1$) takes products with its Gram matrix."""

    AUTO = "auto"
    """The cheaper at ``EXPECTED_PRODUCTS`` products (``side_costs``)."""
    GRAM = "gram"
    r"""Through the Gram matrix of the side's $K_sNT$ vectors: $O(K_s^2N^2T^3)$ a product."""
    FEATURES = "features"
    r"""Through the $d_s \times d_s$ sum of the terms: $O(K_sN(T^2d_s + Td_s^2))$ a product."""


def side_costs(
    n: int, t: int, d: int, k: int = 1, products: int = EXPECTED_PRODUCTS
) -> tuple[float, float]:
    """``(gram, features)``: multiply-adds of one side's ``products`` Gram products each way.

    The Gram route includes building its Gram matrix once.

    Args:
        n: Samples $N$.
        t: Positions $T$.
        d: The side's features $d_s$.
        k: Its columns $K_s$ (1 on the input side).
        products: Products taken.
    """
    gram = (k * n * t) ** 2 * d + products * 2.0 * k * k * n * n * t**3
    features = products * 2.0 * k * n * (t * t * d + t * d * d)
    return float(gram), features


def _route(
    route: SideRoute, n: int, t: int, d: int, k: int, products: int = EXPECTED_PRODUCTS
) -> SideRoute:
    if t == 1:
        return SideRoute.GRAM  # the Hadamard-squared kernel: N^2 a product
    if route is SideRoute.AUTO:
        gram, features = side_costs(n, t, d, k, products)
        return SideRoute.FEATURES if features < gram else SideRoute.GRAM
    return route


@dataclass(frozen=True)
class FormCosts:
    """Multiply-adds of one update in each form (module docstring).

    Attributes:
        matrix_free: With products on the matrices.
        sample_space: With the Gram matrices (each side by its cheaper route).
        gram_entries: Entries of the larger Gram matrix that the sample space builds.
    """

    matrix_free: float
    sample_space: float
    gram_entries: int


def form_costs(io: PerSampleIO, products: int = EXPECTED_PRODUCTS, pairs: int = 1) -> FormCosts:
    r"""The cost of one update in each form, for ``products`` product pairs and ``pairs`` factors.

    Args:
        io: The layer's statistics (only their shapes are read).
        products: Product pairs with $\mathcal R$ and $\mathcal R^\top$.
        pairs: Kronecker factor pairs formed from coefficients at the end.
    """
    k, n, t, d_o = io.output_grads.shape
    d_i = io.inputs.shape[-1]
    if t == 1:
        free = products * 2.0 * n * (d_i**2 + k * d_o**2)
        sides: tuple[float, ...] = (
            n * n * (d_i + k * k * d_o) + products * 2.0 * (1 + k * k) * n * n,
        )
        gram_entries = (k * n) ** 2
    else:
        free = k * n * t * d_o * d_i + products * 2.0 * k * n * d_o * d_i * (d_o + d_i)
        sides, grams = (), [0]
        for size, d, columns in ((n * t, d_i, 1), (k * n * t, d_o, k)):
            gram, features = side_costs(n, t, d, columns, products)
            sides += (min(gram, features),)
            if not features < gram:  # the side builds its Gram matrix (as ``_route``)
                grams.append(size)
        gram_entries = max(grams) ** 2
    per_pair = n * t * (d_i**2 + k * d_o**2) + n * t * t * (d_i + k * d_o)
    sample = sum(sides) + pairs * per_pair
    return FormCosts(free, sample, gram_entries)


def choose_form(
    io: PerSampleIO, products: int = EXPECTED_PRODUCTS, pairs: int = 1
) -> RearrangedForm:
    """The cheaper form of [`form_costs`][curvlib.linalg.sample_space.form_costs] for ``io``.

    The sample-space form only when its Gram matrices fit ``MAX_GRAM_ENTRIES``.
    """
    costs = form_costs(io, products, pairs)
    if costs.gram_entries <= MAX_GRAM_ENTRIES and costs.sample_space < costs.matrix_free:
        return RearrangedForm.SAMPLE_SPACE
    return RearrangedForm.MATRIX_FREE


def _gram(rows: Tensor, *, symmetric: bool = False) -> Tensor:
    """``rows @ rows.T`` in the rows' dtype, but never below float32.

    Computed as [`gram`][curvlib.linalg.factors.gram] computes it: in blocks of
    its upper triangle where that pays (5/8 of the multiply-adds, exactly
    symmetric), else one GEMM, which ``symmetric=True`` symmetrises.
    """
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
    columns = rows.T
    blocks = gram_blocks(columns)
    product = gram(columns, blocks)
    return symmetrize(product) if symmetric and blocks == 1 else product


def _product_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a Gram matrix of several positions is held and multiplied in.

    ``dtype`` promoted to float32 at least, but float64 for float32 where float32
    matrix products may run in lower precision
    (``torch.get_float32_matmul_precision()`` other than ``"highest"``: TF32 or
    bfloat16 passes), whose rounding, about $10^{-3}$, is above the power
    iterations' float32 tolerance.
    """
    wide = torch.promote_types(dtype, torch.float32)
    if wide == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return _GRAM_DTYPE
    return wide


def _sandwich(gram: Tensor, coef: Tensor, scratch: Tensor | None = None) -> Tensor:
    r"""$\sum_m M^{nm} C_m (M^{nm})^\top$ for ``coef`` ``[S, T, T]``, in ``gram``'s dtype.

    ``gram`` is the symmetric ``[S T, S T]`` Gram matrix $M$ viewed as
    ``[S, T, S T]``: row block $n$ holds the $T \times T$ blocks $M^{nm}$ of
    every $m$, and $M^{mn} = (M^{nm})^\top$. The sum is the $n$-th diagonal block
    of $M \operatorname{blockdiag}(C) M$: two batched GEMMs of $O(S^2 T^3)$ on
    contiguous row blocks, $Y_m = C_m M^{m,:}$ ($[T, T] \times [T, ST]$), then
    $M^{n,:}$ times the $n$-th column block of $Y$, read in place ($[T, ST]
    \times [ST, T]$). No batch of $S^2$ tiny products, and no transposed copy of
    an $S^2 T^2$ tensor (which cost more than both products: a product of the
    digits CNN's second convolution, $S = 100$, $T = 16$, took 19–21 ms with
    it and 6.6–7.0 ms without, two threads, 2-core AMD EPYC). The
    coefficients are rounded to ``gram``'s dtype for the products and the sum
    returned in theirs.

    ``scratch``, a ``gram``-shaped tensor, receives $Y$: the power iterations of
    one fit take several products with the same Gram matrix, and a new $Y$ for
    each (10 MB for the digits convolutional autoencoder's widest layer) lands
    on pages the process has not touched yet, faulted in one by one at every
    product (torch's 64-byte-aligned allocations rarely get the block just
    freed back): inside a statistics step the first GEMM took 3.0–3.5 ms with a
    new $Y$ (2,468 page faults) and 0.8–0.9 ms with the buffer (two threads,
    2-core AMD EPYC).
    """
    size, t = coef.shape[0], coef.shape[-1]
    # rows (m, s): C_m M^{m,:}
    y = torch.bmm(coef.to(gram.dtype), gram, out=scratch).view(size * t, size, t)
    return torch.bmm(gram, y.permute(1, 0, 2)).to(coef.dtype)  # [n, t, t]: M^{n,:} Y[:, n-block]


class SampleSpaceFisher(Coordinates):
    r"""$\mathcal R(F)$ (restricted to symmetric matrices) on coefficients over its terms.

    Coordinates are the coefficients $c_{ntt'}$ of $V = \sum c_{ntt'} Q_{ntt'}$
    (module docstring), flattened, followed by one coefficient per extra term:
    with ``terms`` $(G_j, A_j)$ the operator is $\mathcal R(F) - \sum_j
    \operatorname{vec}(G_j)\operatorname{vec}(A_j)^\top$ (e.g. KFAC's residual),
    and $G_j$, $A_j$ join the terms of each side. Coefficient blocks
    $C_n = [c_{ntt'}]_{tt'}$ are symmetrised before each product, as the
    matrix-free form symmetrises its input.

    Cost: the Gram matrices once, $O(N^2T^2(d_i + K^2 d_o))$, in the working
    dtype (float32 at least; held in float64 for $T = 1$); a
    product $O(N^2)$ for $T = 1$, $O(N^2 T^3)$ otherwise, or for $T > 1$ on a
    side with few features $O(K_sN(T^2d_s + Td_s^2))$ and no Gram matrix
    (``route``, module docstring); the inner products of each extra term with
    the sample terms $O(NT(d_i^2 + K d_o^2))$; a factor matrix from
    coefficients as much.

    Args:
        io: The layer's per-sample inputs and output gradients.
        dtype: Working dtype (default: that of ``io``): of the matrices returned,
            of the tolerances and of the Gram matrices' products (float32 at
            least; which dtype holds what: the module docstring).
        terms: Kronecker terms ``(G_j, A_j)`` (symmetric) to subtract.
        route: How each side takes its products when $T > 1$
            ([`SideRoute`][curvlib.linalg.SideRoute]; ``AUTO``: the
            cheaper per side). Ignored for $T = 1$.
        products: The products the caller expects, for ``AUTO``.
    """

    def __init__(
        self,
        io: PerSampleIO,
        dtype: torch.dtype | None = None,
        terms: Sequence[tuple[Tensor, Tensor]] = (),
        route: SideRoute | str = SideRoute.AUTO,
        products: int = EXPECTED_PRODUCTS,
    ) -> None:
        inputs, grads = io.inputs, io.output_grads
        if dtype is not None:
            inputs, grads = inputs.to(dtype), grads.to(dtype)
        k, n, t, d_o = grads.shape
        self.out_dim, self.in_dim = int(d_o), int(inputs.shape[-1])
        self.dtype, self.device = inputs.dtype, inputs.device
        self._k, self._n, self._t = k, n, t
        self.stall_window = STALL_WINDOW
        self._inputs, self._grads = inputs, grads  # [N, T, in], [K, N, T, out]
        # Which dtype holds what: the module docstring.
        a_work = inputs.reshape(n * t, self.in_dim)
        g_work = grads.reshape(k * n * t, d_o)
        route = SideRoute(route)
        self.routes = (
            _route(route, n, t, self.in_dim, 1, products),
            _route(route, n, t, int(d_o), k, products),
        )
        """The route of the input side and of the output side."""
        self._kernel_a: Tensor | None = None
        self._kernel_g: Tensor | None = None
        self._gram_a: Tensor | None = None
        self._gram_g: Tensor | None = None
        # Each side's product buffer, reused by every product of this fit (``_sandwich``).
        self._scratch_a: Tensor | None = None
        self._scratch_g: Tensor | None = None
        # The side's vectors in float64, [K_s N, T, d_s], where it goes through its features.
        self._features_a: Tensor | None = None
        self._features_g: Tensor | None = None
        gram_dtype = _product_dtype(self.dtype)
        if t == 1:
            self._kernel_a = _gram(a_work).to(_GRAM_DTYPE).square()
            self._kernel_g = _gram(g_work).to(_GRAM_DTYPE).square().view(k, n, k, n).sum((0, 2))
        else:
            if self.routes[0] is SideRoute.GRAM:
                self._gram_a = _gram(a_work, symmetric=True).to(gram_dtype).view(n, t, n * t)
            else:
                self._features_a = a_work.to(_GRAM_DTYPE).view(n, t, self.in_dim)
            if self.routes[1] is SideRoute.GRAM:
                gram_g = _gram(g_work, symmetric=True).to(gram_dtype)
                self._gram_g = gram_g.view(k * n, t, k * n * t)
            else:
                self._features_g = g_work.to(_GRAM_DTYPE).view(k * n, t, int(d_o))
        self._size = n * t * t
        mats_g = [G.to(self.device, self.dtype) for G, _ in terms]
        mats_a = [A.to(self.device, self.dtype) for _, A in terms]
        self._terms_g, self._terms_a = mats_g, mats_a
        # The extra terms in float64, for a side that goes through its features.
        wide = _GRAM_DTYPE
        self._terms_a64 = [m.to(wide) for m in mats_a] if self._features_a is not None else []
        self._terms_g64 = [m.to(wide) for m in mats_g] if self._features_g is not None else []
        self._cross_g, self._cross_a = (
            self._stack([self._sample_inner_out(G) for G in mats_g]),
            self._stack([self._sample_inner_in(A) for A in mats_a]),
        )
        self._terms_gram_g, self._terms_gram_a = (
            self._gram_of(mats_g),
            self._gram_of(mats_a),
        )
        weights = torch.full((self._size + len(terms),), 1.0 / n, dtype=_GRAM_DTYPE)
        weights[self._size :] = -1.0
        self._weights = weights.to(self.device)

    # -- inner products with the sample terms ----------------------------------------

    def _stack(self, columns: list[Tensor]) -> Tensor:
        if not columns:
            return torch.zeros(self._size, 0, dtype=_GRAM_DTYPE, device=self.device)
        return torch.stack(columns, 1)

    def _gram_of(self, mats: list[Tensor]) -> Tensor:
        flat = torch.stack([m.flatten() for m in mats]) if mats else None
        if flat is None:
            return torch.zeros(0, 0, dtype=_GRAM_DTYPE, device=self.device)
        flat = flat.to(_GRAM_DTYPE)
        return flat @ flat.T

    def _sample_inner_in(self, mat: Tensor) -> Tensor:
        r"""$\langle Q_{ntt'}, X\rangle = \bar a_{nt}^\top X \bar a_{nt'}$, flattened."""
        a = self._inputs
        return torch.einsum("nti,nui->ntu", a @ mat, a).to(_GRAM_DTYPE).reshape(-1)

    def _sample_inner_out(self, mat: Tensor) -> Tensor:
        r"""$\langle P_{ntt'}, X\rangle = \sum_k g_{knt}^\top X g_{knt'}$, flattened."""
        g = self._grads
        return torch.einsum("knto,knuo->ntu", g @ mat, g).to(_GRAM_DTYPE).reshape(-1)

    # -- Gram products ------------------------------------------------------------

    def _symmetric(self, coef: Tensor) -> Tensor:
        if self._t == 1:
            return coef
        t = self._t
        blocks = coef[: self._size].view(self._n, t, t)
        sym = ((blocks + blocks.transpose(-1, -2)) / 2).reshape(-1)
        return torch.cat([sym, coef[self._size :]])

    def _through_features(
        self, rows: Tensor, coef: Tensor, terms: list[Tensor], columns: int
    ) -> Tensor:
        r"""A Gram product through the features: $Y = \sum_s X_s^\top C_s X_s + \sum_j c_j M_j$.

        Then $\langle X_{s,t}X_{s,t'}^\top, Y\rangle = (X_s Y X_s^\top)_{tt'}$ for the
        sample terms (summed over the ``columns`` $K_s$) and $\langle M_j, Y\rangle$
        for the extra ones. ``rows``: $X$, ``[K_s N, T, d_s]``, and ``terms``: the
        $M_j$, both in float64; ``coef``: symmetric coefficients.
        """
        t = self._t
        samples, extra = coef[: self._size], coef[self._size :]
        blocks = samples.view(1, self._n, t, t).expand(columns, -1, -1, -1).reshape(-1, t, t)
        y = rows.flatten(0, 1).T @ torch.bmm(blocks, rows).flatten(0, 1)
        for c, mat in zip(extra, terms, strict=True):
            y = y + c * mat
        out = torch.einsum("std,sud->stu", rows @ y, rows)
        out = out.reshape(columns, self._n * t * t).sum(0)
        extras = [(mat * y).sum() for mat in terms]
        return torch.cat([out, torch.stack(extras)]) if extras else out

    def _gram_in(self, coef: Tensor) -> Tensor:
        coef = self._symmetric(coef)
        if self._features_a is not None:
            return self._through_features(self._features_a, coef, self._terms_a64, 1)
        samples, extra = coef[: self._size], coef[self._size :]
        if self._kernel_a is not None:
            out = self._kernel_a @ samples
        else:
            assert self._gram_a is not None
            blocks = samples.view(self._n, self._t, self._t)
            if self._scratch_a is None:
                self._scratch_a = torch.empty_like(self._gram_a)
            out = _sandwich(self._gram_a, blocks, self._scratch_a).reshape(-1)
        out = out + self._cross_a @ extra
        return torch.cat([out, self._cross_a.T @ samples + self._terms_gram_a @ extra])

    def _gram_out(self, coef: Tensor) -> Tensor:
        coef = self._symmetric(coef)
        if self._features_g is not None:
            return self._through_features(self._features_g, coef, self._terms_g64, self._k)
        samples, extra = coef[: self._size], coef[self._size :]
        if self._kernel_g is not None:
            out = self._kernel_g @ samples
        else:
            assert self._gram_g is not None
            t = self._t
            blocks = samples.view(1, self._n, t, t).expand(self._k, -1, -1, -1)
            if self._scratch_g is None:
                self._scratch_g = torch.empty_like(self._gram_g)
            per_column = _sandwich(self._gram_g, blocks.reshape(-1, t, t), self._scratch_g)
            out = per_column.reshape(self._k, self._n * t * t).sum(0)
        out = out + self._cross_g @ extra
        return torch.cat([out, self._cross_g.T @ samples + self._terms_gram_g @ extra])

    # -- the Coordinates interface -------------------------------------------------------

    def matvec(self, v: Tensor, metric: Tensor | None = None) -> Tensor:
        r"""$d = w \odot K_Q c$: weights $\frac1N$ on sample terms, $-1$ on extra ones.

        $K_Q c$ is ``metric_in(v)``: given it, the product is free.
        """
        return self._weights * (self._gram_in(v) if metric is None else metric)

    def rmatvec(self, u: Tensor, metric: Tensor | None = None) -> Tensor:
        r"""$c = w \odot K_P d$ ($K_P d$ is ``metric_out(u)``)."""
        return self._weights * (self._gram_out(u) if metric is None else metric)

    def metric_in(self, v: Tensor) -> Tensor:
        """Through the Gram matrix of the input-side terms."""
        return self._gram_in(v)

    def metric_out(self, u: Tensor) -> Tensor:
        """Through the Gram matrix of the output-side terms."""
        return self._gram_out(u)

    def start(self, v0: Tensor | None, u0: Tensor | None) -> Tensor:
        r"""Coordinates of $\mathcal R^\top\mathcal R V_0$, else of $\mathcal R^\top U_0$.

        A matrix $V_0$ is generally not a combination of the terms, so the start
        is its image, which is (a power iteration's first step). Each costs the
        inner products with the sample terms, $O(NT(d_i^2 + K d_o^2))$. The
        default costs nothing: $\sum_{n,t} Q_{ntt}$, the batch's KFAC factor
        $\sum_{n,t} \bar a_{nt} \bar a_{nt}^\top$ (positive semi-definite, close
        to the top pair), with its coefficients perturbed by a fixed factor in
        $[0.7, 1.3]$ so that no singular pair is orthogonal to it.
        """
        if v0 is not None:
            inner = self._extra_inner(self._sample_inner_in(v0), self._terms_a, v0)
            candidate = self.rmatvec(self._weights * inner)
            if bool(torch.isfinite(candidate).all()) and self.norm_in(candidate) > 0:
                return candidate
        if u0 is not None:
            inner = self._extra_inner(self._sample_inner_out(u0), self._terms_g, u0)
            candidate = self._weights * inner
            if bool(torch.isfinite(candidate).all()) and self.norm_in(candidate) > 0:
                return candidate
        size, count = self._size, self._n * self._t
        j = torch.arange(count, dtype=_GRAM_DTYPE, device=self.device)
        start = torch.zeros(size + len(self._terms_a), dtype=_GRAM_DTYPE, device=self.device)
        diagonal = start[:size].view(self._n, self._t, self._t).diagonal(dim1=-2, dim2=-1)
        diagonal.copy_((1.0 + 0.3 * torch.sin(1.0 + j * (j + 1.0))).view(self._n, self._t))
        return start

    def psd_part(self, coords: Tensor) -> Tensor | None:
        r"""Negative coefficients set to zero ($T = 1$) or each block clamped ($T > 1$).

        The top singular vectors of $\mathcal R(F)$ are nonnegative combinations
        of the terms (power iterations from a nonnegative start stay
        nonnegative), so a Ritz vector of them is negative only by its error.
        ``None`` with extra terms, whose signs are not known.
        """
        if self._terms_a:
            return None
        if self._t == 1:
            return coords.clamp_min(0.0)
        blocks = coords.view(self._n, self._t, self._t)
        values, vectors = torch.linalg.eigh((blocks + blocks.transpose(-1, -2)) / 2)
        clamped: Tensor = (vectors * values.clamp_min(0.0).unsqueeze(-2)) @ vectors.mT
        return clamped.reshape(-1)

    def _extra_inner(self, samples: Tensor, mats: list[Tensor], mat: Tensor) -> Tensor:
        extra = [float((m * mat).sum()) for m in mats]
        return torch.cat([samples, samples.new_tensor(extra)])

    def in_matrix(self, v: Tensor) -> Tensor:
        r"""$\sum_n \bar A_n^\top C_n \bar A_n + \sum_j c_j A_j$: one GEMM over the samples."""
        a = self._inputs.flatten(0, 1)  # [N T, in]
        out = self._combine(a, v, self._n)
        for coef, mat in zip(v[self._size :].tolist(), self._terms_a, strict=True):
            out = out + coef * mat
        return out

    def out_matrix(self, u: Tensor) -> Tensor:
        r"""$\sum_{k,n} G_{kn}^\top D_n G_{kn} + \sum_j d_j G_j$."""
        g = self._grads.flatten(0, 2)  # [K N T, out]
        weights = u[: self._size].view(1, -1).expand(self._k, -1).reshape(-1)
        out = self._combine(g, weights, self._k * self._n)
        for coef, mat in zip(u[self._size :].tolist(), self._terms_g, strict=True):
            out = out + coef * mat
        return out

    def _combine(self, rows: Tensor, coef: Tensor, count: int) -> Tensor:
        r"""$\sum_s R_s^\top C_s R_s$ for ``count`` row blocks of ``rows``, in ``dtype``.

        The $C_s$ are symmetric, so the sum is: its upper triangle is computed
        in blocks where that pays ([`gram`][curvlib.linalg.factors.gram]).
        """
        t = self._t
        blocks = self._symmetric_blocks(coef[: count * t * t].view(count, t, t)).to(self.dtype)
        if t == 1:
            weights = blocks.flatten()
            keep = weights != 0
            if not bool(keep.all()):  # e.g. a correction: only the rows it touches
                rows, weights = rows[keep], weights[keep]
            return gram(rows, gram_blocks(rows), right=rows * weights[:, None])
        weighted = torch.bmm(blocks, rows.view(count, t, -1)).flatten(0, 1)
        return gram(rows, gram_blocks(rows), right=weighted)

    @staticmethod
    def _symmetric_blocks(blocks: Tensor) -> Tensor:
        return (blocks + blocks.transpose(-1, -2)) / 2


def rearranged(
    io: PerSampleIO,
    dtype: torch.dtype | None = None,
    form: RearrangedForm = RearrangedForm.AUTO,
    terms: Sequence[tuple[Tensor, Tensor]] = (),
    *,
    products: int = EXPECTED_PRODUCTS,
    pairs: int = 1,
) -> tuple[RearrangedFisher | Deflated | SampleSpaceFisher, RearrangedForm]:
    r"""$\mathcal R(F) - \sum_j \operatorname{vec}(G_j)\operatorname{vec}(A_j)^\top$, in ``form``.

    Args:
        io: The layer's per-sample inputs and output gradients.
        dtype: Working dtype (default: that of ``io``).
        form: ``AUTO`` picks by [`choose_form`][curvlib.linalg.sample_space.choose_form].
        terms: Kronecker terms ``(G_j, A_j)`` to subtract.
        products: Product pairs the caller expects (for ``AUTO``).
        pairs: Factor pairs the caller forms at the end (for ``AUTO``).

    Returns:
        The operator and the form it has.
    """
    if form is RearrangedForm.AUTO:
        form = choose_form(io, products, pairs + len(terms))
    if form is RearrangedForm.SAMPLE_SPACE:
        return SampleSpaceFisher(io, dtype, terms, products=products), form
    op = RearrangedFisher(io, dtype=dtype)
    return (Deflated(op, terms) if terms else op), form
