r"""The sample-space form of $\mathcal R(F)$ against the dense rearrangement (float64).

The dense $\mathcal R(F)$ is built from the per-sample gradient matrices
``io.grads()`` of a ``Linear`` and a ``Conv2d`` layer; the sample-space operator
works on coefficients over the rank-one terms and must agree with it on the
matrices those coefficients stand for, as must the Frobenius inner products
computed through its Gram matrices.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor

from curvlib.approx.deflation import Deflation
from curvlib.approx.kfac import KFAC
from curvlib.approx.kfac_corrected import KFACCorrected
from curvlib.approx.kpsvd import KPSVD
from curvlib.approx.lanczos import Lanczos
from curvlib.core import CurvatureStatistics, PerSampleIO, StatKind
from curvlib.linalg.rearrange import (
    RearrangedFisher,
    SingularTriple,
    balanced_factors,
    deflated,
    lanczos_svd,
    power_svd,
    psd_factors,
)
from curvlib.linalg.sample_space import (
    MAX_GRAM_ENTRIES,
    RearrangedForm,
    SampleSpaceFisher,
    SideRoute,
    choose_form,
    form_costs,
    side_costs,
)
from curvlib.optim.syncs import host_reads
from tests.approx.cases import fit_statistics
from tests.problems import Problem, cnn_ce, mlp_ce

RTOL = 1e-10
"""Products and inner products: round-off of float64 sums."""


class _AllStats(Deflation):
    required_stats = frozenset({StatKind.KRONECKER, StatKind.PER_SAMPLE_IO})


@functools.cache
def _stats(name: str) -> CurvatureStatistics:
    problem: Problem = {"mlp": mlp_ce(), "cnn": cnn_ce()}[name]
    return fit_statistics(problem, _AllStats())


def _layers() -> list[tuple[str, str]]:
    """(problem, layer): the MLP's Linear layers, the CNN's Conv2d (16 positions) and Linear."""
    return [("mlp", "0"), ("mlp", "2"), ("mlp", "4"), ("cnn", "0"), ("cnn", "4")]


def _dense(io: PerSampleIO, terms: list[tuple[Tensor, Tensor]]) -> Tensor:
    W = io.grads()
    _, n, out, inp = W.shape
    R = torch.einsum("knij,knab->iajb", W, W).reshape(out * out, inp * inp) / n
    for G, A in terms:
        R = R - torch.outer(G.flatten(), A.flatten())
    return R


def _random_coordinates(op: SampleSpaceFisher, gen: torch.Generator) -> Tensor:
    """Coordinates of a random symmetric combination of the terms."""
    return torch.randn(op._size + len(op._terms_a), generator=gen, dtype=torch.float64)


def _close(actual: Tensor, expected: Tensor, what: str, scale: float | None = None) -> None:
    scale = float(expected.abs().max()) if scale is None else scale
    err = float((actual - expected).abs().max())
    assert err <= RTOL * scale, f"{what}: max error {err:.3e}, scale {scale:.3e}"


ROUTES = [SideRoute.GRAM, SideRoute.FEATURES]
"""Both routes of the sides of a layer with several positions (one route for ``Linear``)."""


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.value)
@pytest.mark.parametrize("with_term", [False, True], ids=["plain", "kfac-term"])
@pytest.mark.parametrize(("problem", "layer"), _layers(), ids=lambda x: str(x))
def test_products_match_the_dense_rearranged_block(
    problem: str, layer: str, with_term: bool, route: SideRoute
) -> None:
    stats = _stats(problem)[layer]
    assert stats.io is not None and stats.kronecker is not None
    terms = [(stats.kronecker.G, stats.kronecker.A)] if with_term else []
    op = SampleSpaceFisher(stats.io, terms=terms, route=route)
    if stats.io.inputs.shape[1] > 1:
        assert op.routes == (route, route)
    R = _dense(stats.io, terms)
    gen = torch.Generator().manual_seed(0)
    c, d = _random_coordinates(op, gen), _random_coordinates(op, gen)
    V, U = op.in_matrix(c), op.out_matrix(d)
    _close(V.T, V, "symmetric V")
    _close(U.T, U, "symmetric U")
    _close(op.out_matrix(op.matvec(c)).flatten(), R @ V.flatten(), "R V")
    _close(op.in_matrix(op.rmatvec(d)).flatten(), R.T @ U.flatten(), "R^T U")
    # The Gram matrices give the Frobenius inner products of the matrices.
    c2 = _random_coordinates(op, gen)
    _close(op.inner_in(c2, c), (op.in_matrix(c2) * V).sum(), "<V', V>")
    _close(op.inner_out(d, d), (U * U).sum(), "<U, U>")
    # A matrix start is mapped through R^T R.
    start = torch.eye(op.in_dim, dtype=torch.float64)
    image = (R.T @ (R @ start.flatten())).reshape(start.shape)
    # With the KFAC term R itself is a difference that cancels: measure the error against
    # the products of the magnitudes before cancelling (the round-off bound's scale).
    magnitude = _dense(stats.io, []).abs()
    for G, A in terms:
        magnitude = magnitude + torch.outer(G.flatten(), A.flatten()).abs()
    size = float((magnitude.T @ (magnitude @ start.abs().flatten())).max())
    _close(op.in_matrix(op.start(start, None)), (image + image.T) / 2, "R^T R V0", size)


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.value)
@pytest.mark.parametrize(("problem", "layer"), _layers(), ids=lambda x: str(x))
def test_both_forms_find_the_same_top_pair(problem: str, layer: str, route: SideRoute) -> None:
    """Same top triple to round-off from either form, with and without the KFAC term."""
    stats = _stats(problem)[layer]
    assert stats.io is not None and stats.kronecker is not None
    term = [(stats.kronecker.G, stats.kronecker.A)]
    pairs = [
        (SampleSpaceFisher(stats.io, route=route), RearrangedFisher(stats.io)),
        (SampleSpaceFisher(stats.io, terms=term, route=route), _deflated(stats.io, term)),
    ]
    for sample, free in pairs:
        a = power_svd(sample, tol=1e-12, max_iter=5000)
        b = power_svd(free, tol=1e-12, max_iter=5000)
        assert abs(a.sigma - b.sigma) <= 1e-10 * b.sigma
        _close(a.sigma * torch.kron(a.U, a.V), b.sigma * torch.kron(b.U, b.V), "top term")


def _deflated(io: PerSampleIO, terms: list[tuple[Tensor, Tensor]]) -> object:
    from curvlib.linalg.rearrange import Deflated

    return Deflated(RearrangedFisher(io), terms)


def _io(n: int, t: int, d_in: int, d_out: int, k: int = 1) -> PerSampleIO:
    return PerSampleIO(torch.zeros(n, t, d_in), torch.zeros(k, n, t, d_out))


@pytest.mark.parametrize(
    ("io", "expected"),
    [
        (_io(250, 1, 1001, 500), RearrangedForm.SAMPLE_SPACE),  # the autoencoder at batch 1000
        (_io(1000, 1, 31, 250), RearrangedForm.SAMPLE_SPACE),  # N < 4 (d_i + d_o)
        (_io(4000, 1, 11, 10), RearrangedForm.MATRIX_FREE),  # N far above d_i + d_o
        (_io(64, 64, 28, 16), RearrangedForm.MATRIX_FREE),  # a convolution: T^3 per product
        (_io(2, 2, 50, 50), RearrangedForm.SAMPLE_SPACE),  # tiny convolution, wide channels
    ],
    ids=["ae-1000", "narrow-many", "tiny-layer", "conv", "tiny-conv"],
)
def test_the_rule_takes_the_cheaper_form(io: PerSampleIO, expected: RearrangedForm) -> None:
    costs = form_costs(io)
    assert choose_form(io) is expected, costs
    cheaper = costs.sample_space < costs.matrix_free
    assert cheaper is (expected is RearrangedForm.SAMPLE_SPACE)


def test_the_rule_never_builds_a_gram_matrix_over_the_limit() -> None:
    n = int(MAX_GRAM_ENTRIES**0.5) + 1
    io = _io(n, 1, 100_000, 100_000)  # cheap in sample space, too large a Gram matrix
    costs = form_costs(io)
    assert costs.sample_space < costs.matrix_free and costs.gram_entries > MAX_GRAM_ENTRIES
    assert choose_form(io) is RearrangedForm.MATRIX_FREE


@pytest.mark.parametrize(
    "make", [KPSVD, Deflation, KFACCorrected, Lanczos], ids=lambda m: m.__name__
)
def test_telemetry_reports_the_form_and_the_products(make: type[KPSVD]) -> None:
    stats = _stats("cnn")
    approx = make()
    approx.update(stats)
    report = approx.last_products()
    assert set(report) == {"0", "4"}
    for name, (form, products) in report.items():
        io = stats[name].io
        assert io is not None
        pairs = 1 if make is KPSVD else 2
        assert form is choose_form(io, pairs=pairs), name
        assert products >= 1
    assert report["0"][0] is RearrangedForm.MATRIX_FREE  # 16 positions: the matrix-free form


def test_an_unknown_form_is_refused() -> None:
    with pytest.raises(ValueError, match="sample"):
        KPSVD(form="samples")


@pytest.mark.parametrize(("problem", "layer"), _layers(), ids=lambda x: str(x))
def test_positive_factors_without_eigh_match_the_clamped_ones(problem: str, layer: str) -> None:
    """The Lanczos top pair in sample space: clamping coefficients equals clamping eigenvalues."""
    stats = _stats(problem)[layer]
    assert stats.io is not None
    op = SampleSpaceFisher(stats.io)
    first, _ = lanczos_svd(op, 2, tol=1e-12, max_restarts=200)
    G, A = psd_factors(op, first)
    G_ref, A_ref = balanced_factors(first, psd=True)
    for factor, ref in ((G, G_ref), (A, A_ref)):
        _close(factor, ref, "psd factor", float(ref.abs().max()) * 1e-6 / RTOL)
        assert float(torch.linalg.eigvalsh(factor)[0]) >= -RTOL * float(factor.abs().max())
    # A coefficient of the wrong sign beyond the triple's error is refused: eigh instead.
    # (The pair's sign is arbitrary: shift the coefficients against their own sign.)
    v = first.v
    assert v is not None
    shift = 2 * v.abs().max() * torch.sign(v.sum())
    bad = SingularTriple(first.sigma, first.U, first.V, 1, 1e-14, first.u, v - shift)
    assert torch.equal(psd_factors(op, bad)[1], balanced_factors(bad, psd=True)[1])


@pytest.mark.parametrize("form", [RearrangedForm.SAMPLE_SPACE, RearrangedForm.MATRIX_FREE])
@pytest.mark.parametrize(
    "make", [KPSVD, Deflation, KFACCorrected, Lanczos], ids=lambda m: m.__name__
)
def test_a_vanishing_fisher_gives_zero_pairs_not_an_error(
    make: type[KPSVD], form: RearrangedForm
) -> None:
    """Output gradients that are all zero (a layer the loss does not see) in both forms."""
    stats = _stats("mlp").scaled(0.0)
    approx = make(form=form)
    approx.update(stats)
    grads = {name: torch.ones(s.layer.out_dim, s.layer.in_dim_aug, dtype=torch.float64)
             for name, s in stats.layers.items()}  # fmt: skip
    steps = approx.inverse(1e-2).apply(grads)
    if make is KFACCorrected:  # KFAC (of A and a zero G) plus a zero correction
        kfac = KFAC()
        kfac.update(stats)
        expected = kfac.inverse(1e-2).apply(grads)
    else:  # nothing but the damping: the damped gradient step
        expected = {name: g / 1e-2 for name, g in grads.items()}
    for name, step in steps.items():
        assert torch.isfinite(step).all(), name
        _close(step, expected[name], name)


class _CountingFisher(SampleSpaceFisher):
    """Counts the products with its kernels (``metric_in``/``metric_out`` without an image)."""

    products = 0

    def _gram_in(self, coef: Tensor) -> Tensor:
        self.products += 1
        return super()._gram_in(coef)

    def _gram_out(self, coef: Tensor) -> Tensor:
        self.products += 1
        return super()._gram_out(coef)


@pytest.mark.parametrize(("problem", "layer"), [("mlp", "0"), ("cnn", "0")], ids=str)
def test_an_iteration_costs_two_kernel_products(problem: str, layer: str) -> None:
    """Two kernel products per power iteration or Lanczos step, plus one for the start.

    Norms and reorthogonalisation reuse the images of the vectors, deflated or not.
    """
    io = _stats(problem)[layer].io
    assert io is not None
    op = _CountingFisher(io)
    first = power_svd(op, tol=1e-12, max_iter=50)
    assert first.iterations >= 3
    assert op.products == 1 + 2 * first.iterations
    op.products = 0
    second = power_svd(deflated(op, first), tol=1e-12, max_iter=50)
    assert second.iterations >= 3
    assert op.products == 1 + 2 * second.iterations  # the deflated term costs no product
    op.products = 0
    top, _ = lanczos_svd(op, 2, krylov_dim=6, tol=1e-12, max_restarts=3)
    assert top.iterations >= 3  # products with R (an early breakdown: an exact subspace)
    assert op.products <= 1 + 2 * top.iterations  # one fewer if it broke down after R v


@pytest.mark.parametrize(
    ("n", "t", "d", "k", "expected"),
    [
        (100, 16, 16, 1, SideRoute.FEATURES),  # few channels: d^2 << N T^2
        (100, 16, 801, 1, SideRoute.GRAM),  # wide patches: the sandwich
        (100, 64, 26, 1, SideRoute.FEATURES),  # a first convolution's inputs
        (8, 4, 500, 2, SideRoute.GRAM),
    ],
)
def test_each_side_takes_its_cheaper_route(
    n: int, t: int, d: int, k: int, expected: SideRoute
) -> None:
    gram, features = side_costs(n, t, d, k)
    assert (features < gram) is (expected is SideRoute.FEATURES)
    io = PerSampleIO(torch.randn(n, t, d), torch.randn(k, n, t, d))
    assert SampleSpaceFisher(io).routes == (expected, expected)
    assert SampleSpaceFisher(io, route="gram").routes == (SideRoute.GRAM, SideRoute.GRAM)


def test_a_side_through_its_features_builds_no_gram_matrix() -> None:
    """Where both sides go through their features the Gram-matrix limit does not apply."""
    io = _io(4096, 32, 8, 8)  # (N T)^2 = 1.7e10 entries, far over the limit
    costs = form_costs(io)
    assert costs.gram_entries == 0
    op = SampleSpaceFisher(PerSampleIO(torch.randn(64, 32, 8), torch.randn(1, 64, 32, 8)))
    assert op.routes == (SideRoute.FEATURES, SideRoute.FEATURES)
    assert op._gram_a is None and op._gram_g is None


def _operator(problem: str, layer: str, form: str) -> SampleSpaceFisher | RearrangedFisher:
    """A layer's rearranged Fisher in the sample-space (``"sample"``) or matrix-free form."""
    io = _stats(problem)[layer].io
    assert io is not None
    return SampleSpaceFisher(io) if form == "sample" else RearrangedFisher(io)


@pytest.mark.parametrize("form", ["sample", "free"])
@pytest.mark.parametrize(("problem", "layer"), [("mlp", "0"), ("cnn", "0")], ids=str)
def test_norms_kept_on_the_device_give_the_same_pair_with_one_read_per_iteration(
    problem: str, layer: str, form: str
) -> None:
    """``device_norms=True`` (the default off the CPU): one host read per iteration, not three."""
    op = _operator(problem, layer, form)
    with host_reads() as host:
        a = power_svd(op, tol=1e-10, max_iter=200, device_norms=False)
    with host_reads() as device:
        b = power_svd(op, tol=1e-10, max_iter=200, device_norms=True)
    assert a.iterations == b.iterations >= 3
    assert abs(a.sigma - b.sigma) <= 1e-12 * a.sigma
    _close(a.sigma * torch.kron(a.U, a.V), b.sigma * torch.kron(b.U, b.V), "top term")
    assert host.count - device.count == 2 * a.iterations


def test_norms_kept_on_the_device_still_see_a_zero_operator() -> None:
    stats = _stats("mlp").scaled(0.0)
    io = stats["0"].io
    assert io is not None
    triple = power_svd(SampleSpaceFisher(io), device_norms=True)
    assert triple.sigma == 0.0 and not bool(triple.U.any()) and not bool(triple.V.any())


@pytest.mark.parametrize("form", ["sample", "free"])
@pytest.mark.parametrize(("problem", "layer"), [("mlp", "0"), ("cnn", "0")], ids=str)
def test_lanczos_with_norms_on_the_device_gives_the_same_pairs_with_a_read_per_sweep(
    problem: str, layer: str, form: str
) -> None:
    op = _operator(problem, layer, form)
    with host_reads() as host:
        a = lanczos_svd(op, 2, krylov_dim=6, tol=1e-10, device_norms=False)
    with host_reads() as device:
        b = lanczos_svd(op, 2, krylov_dim=6, tol=1e-10, device_norms=True)
    for x, y in zip(a, b, strict=True):
        # A sweep that broke down ran to its end on the device (its last steps discarded).
        assert x.iterations <= y.iterations <= x.iterations + 6
        assert abs(x.sigma - y.sigma) <= 1e-10 * a[0].sigma
        _close(x.sigma * torch.kron(x.U, x.V), y.sigma * torch.kron(y.U, y.V), "pair")
    # Per sweep one read instead of three per step (two in a sweep's first step); the
    # Ritz values and residuals are read alike.
    assert device.count <= host.count / 2


@pytest.mark.parametrize("samples", [1, 2, 3])
def test_lanczos_with_norms_on_the_device_stops_at_the_same_breakdown(samples: int) -> None:
    """A Fisher of rank ``samples`` breaks the bidiagonalisation down within the first sweep."""
    gen = torch.Generator().manual_seed(samples)
    io = PerSampleIO(
        torch.randn(samples, 1, 5, generator=gen, dtype=torch.float64),
        torch.randn(1, samples, 1, 4, generator=gen, dtype=torch.float64),
    )
    op = SampleSpaceFisher(io)
    a = lanczos_svd(op, 2, krylov_dim=8, tol=1e-12, device_norms=False)
    b = lanczos_svd(op, 2, krylov_dim=8, tol=1e-12, device_norms=True)
    for x, y in zip(a, b, strict=True):
        assert abs(x.sigma - y.sigma) <= 1e-12 * max(a[0].sigma, 1e-300)
        assert (x.sigma == 0.0) == (y.sigma == 0.0)
        _close(x.sigma * torch.kron(x.U, x.V), y.sigma * torch.kron(y.U, y.V), "pair")
        assert bool(torch.isfinite(y.U).all()) and bool(torch.isfinite(y.V).all())
    assert (a[1].sigma == 0.0) == (samples == 1)


@pytest.mark.parametrize(
    ("n", "t", "d_in", "d_out"),
    [(300, 1, 401, 200), (60, 9, 201, 16), (60, 9, 12, 300)],
    ids=["linear", "conv-gram-routes", "conv-feature-route"],
)
def test_float32_statistics_find_the_float64_pair_to_the_float32_tolerance(
    n: int, t: int, d_in: int, d_out: int
) -> None:
    """The Gram matrices of float32 statistics are multiplied in float32, iterated in float64."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(n, t, d_in, generator=gen) * torch.linspace(0.1, 2.0, d_in) + 0.3
    g = torch.randn(1, n, t, d_out, generator=gen) * torch.linspace(1e-4, 1e-2, d_out)
    low = power_svd(SampleSpaceFisher(PerSampleIO(inputs=a, output_grads=g)))
    exact = power_svd(
        SampleSpaceFisher(PerSampleIO(inputs=a.double(), output_grads=g.double())), tol=1e-12
    )
    assert low.U.dtype == torch.float32
    assert abs(float(low.sigma) - float(exact.sigma)) <= 1e-6 * float(exact.sigma)
    sign = 1.0 if float((low.U.double() * exact.U).sum()) >= 0.0 else -1.0
    for mine, reference in ((low.U, exact.U), (low.V, exact.V)):
        error = float((sign * mine.double() - reference).norm() / reference.norm())
        assert error <= 1.2e-4, error  # the float32 tolerance of the power iteration


def test_bfloat16_statistics_have_their_gram_matrices_multiplied_in_float32() -> None:
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(40, 1, 30, generator=gen) + 0.3
    g = torch.randn(1, 40, 1, 20, generator=gen) * 1e-2
    low = SampleSpaceFisher(PerSampleIO(inputs=a, output_grads=g), dtype=torch.bfloat16)
    rows = a.to(torch.bfloat16).float().reshape(40, 30)
    expected = (rows @ rows.T).double().square()
    assert torch.equal(low._kernel_a, expected), "bfloat16 rows, a float32 product"


def test_the_sandwich_sums_each_rows_blocks_around_each_coefficient_block() -> None:
    r"""$\sum_m M^{nm} C_m (M^{nm})^\top$ for every $n$, against a loop over the blocks."""
    from curvlib.linalg.sample_space import _sandwich

    gen = torch.Generator().manual_seed(0)
    size, t = 5, 3
    x = torch.randn(size * t, 7, generator=gen, dtype=torch.float64)
    gram = x @ x.T
    coef = torch.randn(size, t, t, generator=gen, dtype=torch.float64)  # not symmetric
    blocks = gram.view(size, t, size, t)
    expected = torch.stack([
        sum(blocks[n, :, m] @ coef[m] @ blocks[n, :, m].T for m in range(size))
        for n in range(size)
    ])  # fmt: skip
    torch.testing.assert_close(_sandwich(gram.view(size, t, size * t), coef), expected)


def test_the_sandwich_writes_into_its_buffer_with_the_same_bits() -> None:
    from curvlib.linalg.sample_space import _sandwich

    gen = torch.Generator().manual_seed(1)
    size, t = 6, 4
    x = torch.randn(size * t, 9, generator=gen)
    gram = (x @ x.T).view(size, t, size * t)
    coef = torch.randn(size, t, t, generator=gen, dtype=torch.float64)
    scratch = torch.full_like(gram, torch.nan)
    assert torch.equal(_sandwich(gram, coef, scratch), _sandwich(gram, coef))
    assert torch.equal(scratch, torch.bmm(coef.float(), gram)), "Y is left in the buffer"


def test_a_fit_reuses_one_product_buffer_per_side() -> None:
    """Every Gram product of one operator writes into the same two buffers."""
    gen = torch.Generator().manual_seed(2)
    n, t = 12, 5
    io = PerSampleIO(
        inputs=torch.randn(n, t, 30, generator=gen),
        output_grads=torch.randn(1, n, t, 25, generator=gen),
    )
    op = SampleSpaceFisher(io, route=SideRoute.GRAM)
    coef = torch.rand(n * t * t, generator=gen, dtype=torch.float64)
    first = op.metric_in(coef), op.metric_out(coef)
    buffers = op._scratch_a, op._scratch_g
    assert all(b is not None for b in buffers)
    pointers = [b.data_ptr() for b in buffers]
    again = op.metric_in(coef), op.metric_out(coef)
    assert [b.data_ptr() for b in (op._scratch_a, op._scratch_g)] == pointers
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))


def test_large_gram_matrices_and_factors_are_exactly_symmetric() -> None:
    """Above ``gram_blocks``' thresholds both come from the upper triangle, mirrored."""
    gen = torch.Generator().manual_seed(6)
    n, t, d_in, d_out = 40, 16, 520, 6
    a = torch.randn(n, t, d_in, generator=gen)
    g = torch.randn(1, n, t, d_out, generator=gen)
    op = SampleSpaceFisher(PerSampleIO(inputs=a, output_grads=g), route=SideRoute.GRAM)
    assert op._gram_a is not None
    gram_a = op._gram_a.view(n * t, n * t)
    rows = a.reshape(n * t, d_in).double()
    assert torch.equal(gram_a, gram_a.T)
    torch.testing.assert_close(gram_a.double(), rows @ rows.T, rtol=1e-5, atol=1e-3)
    coef = torch.randn(n * t * t, generator=gen, dtype=torch.float64)
    factor = op.in_matrix(coef)
    blocks = coef.view(n, t, t)
    blocks = (blocks + blocks.mT) / 2
    per_sample = rows.view(n, t, d_in)
    expected = sum(per_sample[i].T @ blocks[i] @ per_sample[i] for i in range(n))
    assert torch.equal(factor, factor.T)
    torch.testing.assert_close(factor.double(), expected, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_products_of_several_positions_run_in_the_working_dtype(dtype: torch.dtype) -> None:
    """float32 statistics: float32 Gram matrices and products, float64 coefficients.

    The top pair is that of float64 products well within the float32 tolerance
    (1.2e-4), at the same iteration count; float64 statistics keep float64.
    """
    gen = torch.Generator().manual_seed(7)
    n, t, d_in, d_out = 30, 9, 40, 5
    a = torch.randn(n, t, d_in, generator=gen, dtype=torch.float64) + 0.2
    g = torch.randn(1, n, t, d_out, generator=gen, dtype=torch.float64)
    io = PerSampleIO(inputs=a.to(dtype), output_grads=g.to(dtype))
    op = SampleSpaceFisher(io, route=SideRoute.GRAM)
    assert op._gram_a is not None and op._gram_g is not None
    assert op._gram_a.dtype == op._gram_g.dtype == dtype
    coef = torch.randn(n * t * t, generator=gen, dtype=torch.float64)
    assert op.metric_in(coef).dtype == torch.float64
    wide = SampleSpaceFisher(io, route=SideRoute.GRAM)
    wide._gram_a, wide._gram_g = op._gram_a.double(), op._gram_g.double()
    mine, reference = power_svd(op), power_svd(wide)
    assert mine.iterations == reference.iterations
    for got, want in ((mine.V, reference.V), (mine.U, reference.U)):
        error = float((got.double() - want.double()).norm() / want.double().norm())
        assert error <= (1e-12 if dtype == torch.float64 else 1e-5), error


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_gram_products_stay_float64_where_float32_products_may_be_rounded(precision: str) -> None:
    """TF32 or bfloat16 passes round to about 1e-3, above the float32 tolerance."""
    gen = torch.Generator().manual_seed(8)
    io = PerSampleIO(
        inputs=torch.randn(10, 4, 12, generator=gen),
        output_grads=torch.randn(1, 10, 4, 3, generator=gen),
    )
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        op = SampleSpaceFisher(io, route=SideRoute.GRAM)
    finally:
        torch.set_float32_matmul_precision(before)
    assert op._gram_a is not None and op._gram_g is not None
    assert op._gram_a.dtype == op._gram_g.dtype == torch.float64
    assert SampleSpaceFisher(io, route=SideRoute.GRAM)._gram_a.dtype == torch.float32  # type: ignore[union-attr]
