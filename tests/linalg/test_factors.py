"""The hygiene of stored factors: subnormal and negligible entries, exact symmetry."""

from __future__ import annotations

import collections
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from curvlib.linalg import (
    cholesky_inverse,
    damped_cholesky,
    eigh,
    factors,
    flush_negligible,
    flush_subnormals,
    flush_subnormals_,
    symmetrize,
)
from curvlib.linalg.factors import (
    MIN_GRAM_BLOCK_COLS,
    MIN_GRAM_BLOCK_ROWS,
    blockwise_damped_inverse,
    cpu_live_coordinates,
    device_negligible_limit,
    factor_gram,
    flush_below,
    flush_below_,
    flush_negligible_,
    gram,
    gram_blocks,
    independent_blocks,
    live_coordinates,
    negligible_limit,
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("flush", [flush_subnormals, flush_subnormals_])
@pytest.mark.parametrize("dtype", DTYPES)
def test_flush_subnormals_zeroes_exactly_the_subnormal_entries(
    dtype: torch.dtype, flush: Callable[[Tensor], Tensor]
) -> None:
    info = torch.finfo(dtype)
    smallest = info.tiny * info.eps  # the smallest subnormal
    largest = info.tiny * (1.0 - info.eps)  # the largest subnormal
    values = [0.0, smallest, -smallest, largest, -info.tiny / 2, info.tiny, -info.tiny, 1.0]
    values += [-3.0, math.nan, math.inf, -math.inf]
    mat = torch.tensor(values, dtype=dtype)
    out = flush(mat.clone())
    subnormal = (mat.abs() < info.tiny) & (mat != 0)
    assert int(subnormal.sum()) == 4, "the input holds four subnormals"
    assert bool((out[subnormal] == 0).all())
    kept = ~subnormal
    assert torch.equal(out[kept].nan_to_num(), mat[kept].nan_to_num())
    assert bool(out[9].isnan()), "a NaN is kept for the checks downstream"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flush_negligible_zeroes_entries_at_or_below_eps_times_the_largest(
    dtype: torch.dtype,
) -> None:
    eps = torch.finfo(dtype).eps
    mat = torch.tensor([[-4.0, 2.0 * eps], [4.0 * eps, 8.0 * eps], [1.0, -0.5]], dtype=dtype)
    out = flush_negligible(mat)
    expected = torch.tensor([[-4.0, 0.0], [0.0, 8.0 * eps], [1.0, -0.5]], dtype=dtype)
    assert torch.equal(out, expected)  # the limit is 4 eps, from the largest magnitude |-4|


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_flush_negligible_leaves_a_non_finite_matrix_unchanged(bad: float) -> None:
    mat = torch.tensor([[1.0, 1e-30], [bad, 2.0]])
    out = flush_negligible(mat)
    assert torch.equal(out.nan_to_num(), mat.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_limit_on_the_device_flushes_the_same_bits_as_the_read_one(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    info = torch.finfo(dtype)
    for scale in [1.0, 1e-30, 1e30, info.tiny]:
        mat = torch.randn(40, 40, generator=gen, dtype=torch.float64)
        # Entries on both sides of the limit, at it, and subnormal ones.
        mat *= torch.logspace(-20, 0, 40, dtype=torch.float64)
        mat = (mat * scale).to(dtype)
        mat[0, 0] = -info.eps * mat.abs().max()
        cases = [mat, torch.zeros(3, 3, dtype=dtype), -mat]
        for bad in [math.nan, math.inf, -math.inf]:
            broken = mat.clone()
            broken[1, 2] = bad
            cases.append(broken)
        for case in cases:
            low, high = torch.aminmax(case)
            read = flush_below(case, negligible_limit(float(low), float(high), dtype))
            on_device = flush_below(case, device_negligible_limit(low, high, dtype))
            assert on_device.dtype == dtype and on_device.is_contiguous()
            assert torch.equal(on_device.nan_to_num(), read.nan_to_num())
            assert torch.equal(on_device.isnan(), read.isnan())
            assert torch.equal(torch.signbit(on_device), torch.signbit(read))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_in_place_flush_below_a_limit_flushes_the_same_bits_into_its_argument(
    dtype: torch.dtype,
) -> None:
    gen = torch.Generator().manual_seed(3)
    mat = torch.randn(50, 50, generator=gen, dtype=torch.float64)
    mat = (mat * torch.logspace(-30, 0, 50, dtype=torch.float64)).to(dtype)
    low, high = torch.aminmax(mat)
    limits = [
        negligible_limit(float(low), float(high), dtype),
        device_negligible_limit(low, high, dtype),
        torch.tensor(-1.0, dtype=torch.float64),  # a non-finite matrix's: nothing flushed
        None,
    ]
    for limit in limits:
        expected = flush_below(mat, limit)
        into = mat.clone()
        assert flush_below_(into, limit) is into
        assert torch.equal(into, expected) and torch.equal(into.signbit(), expected.signbit())
    assert int(flush_below(mat, limits[0]).eq(0).sum()) > 0  # the case flushes something
    column_major = mat.mT  # not contiguous: a new tensor, the argument left as it is
    before = column_major.clone()
    out = flush_below_(column_major, limits[0])
    assert out.is_contiguous() and torch.equal(out, flush_below(column_major, limits[0]))
    assert torch.equal(column_major, before)
    into = mat.clone()
    assert flush_negligible_(into) is into and torch.equal(into, flush_negligible(mat))


def test_the_flushed_matrices_are_contiguous() -> None:
    column_major = torch.randn(6, 6).mT  # how LAPACK returns an eigenbasis
    assert flush_subnormals(column_major).is_contiguous()
    assert flush_negligible(column_major).is_contiguous()
    assert torch.equal(flush_subnormals(column_major), column_major)


def test_cholesky_inverse_is_exactly_symmetric_and_the_inverse() -> None:
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 65, 300):
        x = torch.randn(n, 2 * n, generator=gen, dtype=torch.float64)
        mat = x @ x.T / n + 1e-3 * torch.eye(n, dtype=torch.float64)
        inverse = cholesky_inverse(torch.linalg.cholesky(mat))
        assert torch.equal(inverse, inverse.T)
        assert inverse.is_contiguous()
        torch.testing.assert_close(inverse @ mat, torch.eye(n, dtype=torch.float64))


def test_damped_cholesky_of_a_symmetric_kernel_copies_it_and_agrees() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 90, generator=gen, dtype=torch.float64)
    kernel = symmetrize(x @ x.T / 90)
    before = kernel.clone()
    fast, _ = damped_cholesky(kernel, 1e-3, symmetric=True)
    slow, _ = damped_cholesky(kernel, 1e-3)
    assert torch.equal(fast, slow)  # symmetrising a symmetric matrix changes no bit
    assert torch.equal(kernel, before)  # the damping went into a copy


def test_symmetrize_of_a_symmetric_matrix_changes_no_bit() -> None:
    x = torch.randn(30, 30, dtype=torch.float32)
    mat = symmetrize(x)
    assert torch.equal(symmetrize(mat), mat)


def test_symmetrize_returns_a_new_symmetric_tensor() -> None:
    mat = torch.arange(9.0).view(3, 3)
    out = symmetrize(mat)
    assert torch.equal(out, (mat + mat.T) / 2)
    assert out.data_ptr() != mat.data_ptr()
    assert torch.equal(mat, torch.arange(9.0).view(3, 3))


def test_eigh_passes_the_matrix_unshifted_first_and_shifts_only_on_a_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(20, 20, generator=gen, dtype=torch.float64)
    mat = symmetrize(x)
    expected = torch.linalg.eigvalsh(mat)
    seen: list[torch.Tensor] = []
    real = torch.linalg.eigh

    def fail_once(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(m.clone())
        if len(seen) == 1:
            raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")
        return real(m)

    monkeypatch.setattr(torch.linalg, "eigh", fail_once)
    result = eigh(mat, clamp_negative=False)
    assert len(seen) == 2
    assert torch.equal(seen[0], mat)  # the first attempt: the matrix itself
    shift = seen[1] - mat  # the retry: a positive multiple of the identity
    assert float(shift[0, 0]) > 0.0
    torch.testing.assert_close(shift, float(shift[0, 0]) * torch.eye(20, dtype=torch.float64))
    torch.testing.assert_close(result.values, expected)  # the shift is taken off again
    torch.testing.assert_close((result.vectors * result.values) @ result.vectors.T, mat)


def test_the_in_place_flush_writes_into_its_argument() -> None:
    mat = torch.tensor([[1e-40, 2.0], [3.0, -1e-40]]).mT
    assert flush_subnormals_(mat) is mat
    assert torch.equal(mat, torch.tensor([[0.0, 3.0], [2.0, 0.0]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_symmetrised_running_average_is_symmetric_to_the_bit(dtype: torch.dtype) -> None:
    """``running_average(old, S, rho, symmetrize=True)`` = rho old + (1 - rho)(S + S^T)/2.

    ``S`` is asymmetric far beyond rounding, so a missing transpose fails; the
    result feeds Cholesky and ``eigh``, which read one triangle only.
    """
    from curvlib.approx.base import running_average

    gen = torch.Generator().manual_seed(0)
    stat = torch.randn(7, 7, generator=gen, dtype=dtype)
    first = running_average(None, stat, 0.9, symmetrize=True)
    assert torch.equal(first, first.mT)
    torch.testing.assert_close(first, (stat + stat.mT) / 2)
    second = running_average(first, stat.mT.contiguous() * 3, 0.9, symmetrize=True)
    assert torch.equal(second, second.mT) and second.is_contiguous()
    torch.testing.assert_close(second, 0.9 * first + 0.1 * 3 * (stat + stat.mT) / 2)
    assert torch.equal(stat, torch.randn(7, 7, generator=gen.manual_seed(0), dtype=dtype))


def test_live_coordinates_are_the_rows_nonzero_in_some_matrix() -> None:
    first = torch.zeros(5, 5)
    second = torch.zeros(5, 5)
    first[1, 1] = 2.0
    second[3, 4] = second[4, 3] = -1e-30  # tiny but not zero: live
    second[0, 0] = float("nan")  # NaN is not zero: kept for the checks downstream
    assert live_coordinates(first, second).tolist() == [0, 1, 3, 4]
    assert live_coordinates(first).tolist() == [1]
    assert live_coordinates(torch.zeros(3, 3)).tolist() == []
    assert live_coordinates(torch.eye(3), torch.zeros(3, 3)) is None


def test_cpu_live_coordinates_are_the_live_coordinates_read_without_a_counted_read() -> None:
    from curvlib.optim.syncs import host_reads
    from tests.dead_units import decoupled_from_the_first_dead_row

    first = torch.zeros(6, 6, dtype=torch.bfloat16)
    first[2, 2] = first[4, 5] = first[5, 4] = first[4, 4] = first[5, 5] = 1.0
    second = torch.zeros(6, 6, dtype=torch.bfloat16)
    second[0, 1] = second[1, 0] = -1.0  # zero diagonal, nonzero row: live
    with decoupled_from_the_first_dead_row(), host_reads() as reads:
        live = cpu_live_coordinates(first, second)
        whole = cpu_live_coordinates(torch.eye(3))
    assert reads.count == 0  # a GPU step makes none of these reads
    assert live is not None and live.dtype == torch.int64
    assert live.tolist() == [0, 1, 2, 4, 5] == live_coordinates(first, second).tolist()
    assert whole is None


@pytest.mark.parametrize(
    ("size", "dead", "eigh", "decoupled"),
    [
        (400, 49, False, False),
        (400, 50, False, True),
        (200, 25, False, False),
        (200, 25, True, True),
    ],
)
def test_cpu_live_coordinates_decouple_only_where_it_pays(
    size: int, dead: int, eigh: bool, decoupled: bool
) -> None:
    mat = torch.eye(size)
    mat[:dead, :dead] = 0.0
    assert (cpu_live_coordinates(mat, eigh=eigh) is not None) is decoupled
    assert cpu_live_coordinates(torch.zeros(127, 127), eigh=True) is None  # too small to pay
    assert live_coordinates(torch.zeros(127, 127)).numel() == 0


@pytest.mark.parametrize("blocks", [2, 3, 4, 6])
@pytest.mark.parametrize("shape", [(40, 7), (9, 33), (50, 64)])
def test_gram_in_blocks_is_the_exactly_symmetric_gram_matrix(
    shape: tuple[int, int], blocks: int
) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = gram(x, blocks)
    torch.testing.assert_close(got, x.T @ x, rtol=1e-12, atol=1e-12)
    assert torch.equal(got, got.T)


@pytest.mark.parametrize("blocks", [1, 4])
def test_gram_with_a_right_factor_is_the_symmetric_product_it_names(blocks: int) -> None:
    r"""$x^\top y$, $y_s = C_s x_s$ with symmetric $C_s$: mirrored from its upper part."""
    gen = torch.Generator().manual_seed(5)
    count, t, d = 12, 3, 40
    x = torch.randn(count * t, d, generator=gen, dtype=torch.float64)
    coef = torch.randn(count, t, t, generator=gen, dtype=torch.float64)
    coef = coef + coef.mT  # symmetric, indefinite
    y = torch.bmm(coef, x.view(count, t, d)).flatten(0, 1)
    got = gram(x, blocks, right=y)
    torch.testing.assert_close(got, x.T @ y, rtol=1e-12, atol=1e-12)
    if blocks > 1:
        assert torch.equal(got, got.T)
    else:
        assert torch.equal(got, x.T @ y)  # one block: the GEMM itself


def test_gram_in_one_block_is_the_gemm_itself() -> None:
    x = torch.randn(30, 20, generator=torch.Generator().manual_seed(4))
    assert torch.equal(gram(x), x.T @ x)
    assert torch.equal(gram(x[:, :3], 4), x[:, :3].T @ x[:, :3])  # fewer columns than blocks


def _counted_products(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The columns of every ``gram`` product from now on, in order."""
    products: list[int] = []
    inner = factors.gram

    def counted(mat: Tensor, blocks: int = 1) -> Tensor:
        products.append(mat.shape[-1])
        return inner(mat, blocks)

    monkeypatch.setattr(factors, "gram", counted)
    return products


@pytest.mark.parametrize("zero", [0, 40, 100, 299], ids=lambda z: f"{z}-zero")
def test_factor_gram_leaves_zero_columns_out_of_the_same_matrix(
    zero: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With or without zero columns (a quarter or more: left out), the Gram matrix itself.

    A column that sums to zero without being zero (a candidate read in full) is kept.
    """
    monkeypatch.setattr(factors, "MIN_ZERO_COLUMN_GRAM_COST", 64 * 300**2)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 300, generator=gen, dtype=torch.float64)
    columns = torch.randperm(300, generator=gen)
    x[:, columns[:zero]] = 0.0
    x[:, columns[-1]] = 0.0
    x[:2, columns[-1]] = torch.tensor([1.5, -1.5], dtype=torch.float64)  # sums to zero
    products = _counted_products(monkeypatch)
    got = factor_gram(x)
    torch.testing.assert_close(got, x.T @ x, rtol=1e-13, atol=1e-13)
    assert products == [300 - zero if zero >= 300 // 4 else 300]
    assert bool(got[columns[:zero]].eq(0).all()) and bool(got[:, columns[:zero]].eq(0).all())


def test_factor_gram_multiplies_small_and_device_matrices_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    products = _counted_products(monkeypatch)
    x = torch.randn(10, 300)
    x[:, :100] = 0.0
    monkeypatch.setattr(factors, "MIN_ZERO_COLUMN_GRAM_COST", 10 * 300**2 + 1)
    assert torch.equal(factor_gram(x), x.T @ x)
    assert products == [300]
    monkeypatch.setattr(factors, "MIN_ZERO_COLUMN_GRAM_COST", 0)
    assert factor_gram(x).shape == (300, 300) and products == [300, 200]
    meta = torch.empty(10, 300, device="meta")
    assert factor_gram(meta).shape == (300, 300) and products == [300, 200, 300]


def test_gram_blocks_splits_large_cpu_factors_only() -> None:
    rows, cols = MIN_GRAM_BLOCK_ROWS, MIN_GRAM_BLOCK_COLS
    assert gram_blocks(torch.empty(rows, cols)) == 4
    assert gram_blocks(torch.empty(rows - 1, cols)) == 1
    assert gram_blocks(torch.empty(rows, cols - 1)) == 1
    assert gram_blocks(torch.empty(rows, cols, device="meta")) == 1
    assert gram_blocks(torch.empty(2, rows, cols)) == 1  # a batch: one GEMM each


def _blocked_gram(sizes: list[int], bias: bool, seed: int = 6) -> tuple[Tensor, list[Tensor]]:
    """``X^T X`` whose rows each touch one group's columns (and the last, a bias), shuffled."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    order = torch.randperm(total, generator=gen)
    groups, start, rows = [], 0, []
    for size in sizes:
        group = order[start : start + size].sort().values
        start += size
        groups.append(group)
        x = torch.zeros(3 * size, total + 1, dtype=torch.float64)
        x[:, group] = torch.randn(3 * size, size, generator=gen, dtype=torch.float64)
        x[:, -1] = 1.0 if bias else 0.0
        rows.append(x)
    x = torch.cat(rows)
    return x.T @ x, groups


def _rows(stacked: list[Tensor]) -> list[list[int]]:
    """The groups of ``independent_blocks``'s index tensors (one per size), sorted."""
    return sorted(group for index in stacked for group in index.tolist())


def _stacked(groups: list[Tensor]) -> list[Tensor]:
    """Groups as ``independent_blocks`` returns them: one ``[groups, size]`` tensor per size."""
    sizes = sorted({len(group) for group in groups})
    return [torch.stack([g for g in groups if len(g) == size]) for size in sizes]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_independent_blocks_are_the_groups_no_entry_joins(
    bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(factors, "MIN_BLOCKWISE_SIZE", 8)
    mat, groups = _blocked_gram([5, 5, 1, 7, 3, 3], bias)
    if not bias:  # the last coordinate then joins nothing: a zero row, a group of its own
        groups.append(torch.tensor([mat.shape[0] - 1]))
        mat = torch.cat([mat, torch.zeros(1, mat.shape[1], dtype=mat.dtype)])
        mat = torch.cat([mat, torch.zeros(mat.shape[0], 1, dtype=mat.dtype)], 1)
    found = independent_blocks(mat)
    assert found is not None
    assert _rows(found) == sorted(g.tolist() for g in groups)
    per_size = collections.Counter(len(g) for g in groups)
    assert [tuple(index.shape) for index in found] == [(per_size[s], s) for s in sorted(per_size)]


def test_independent_blocks_leave_dense_small_and_joined_matrices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(factors, "MIN_BLOCKWISE_SIZE", 8)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(40, 20, generator=gen, dtype=torch.float64)
    dense = x.T @ x
    assert independent_blocks(dense) is None
    with monkeypatch.context() as patched:  # a dense row rules the split out: no pattern read
        patched.setattr(Tensor, "ne", lambda *_: pytest.fail("read the whole pattern"))
        assert independent_blocks(dense) is None
        assert independent_blocks(dense.to(torch.bfloat16)) is None  # a dtype NumPy lacks
    dead = dense.clone()
    dead[:5], dead[:, :5] = 0.0, 0.0
    assert independent_blocks(dead) is None  # one dense block and dead rows: left whole
    mat, _ = _blocked_gram([12, 3, 3], True)
    assert independent_blocks(mat) is None  # the largest block is most of the matrix
    mat, groups = _blocked_gram([4, 1, 1, 1, 1, 1], True)
    dead = torch.cat(groups[1:])
    mat[dead], mat[:, dead] = 0.0, 0.0  # one live group and dead rows
    assert independent_blocks(mat) is None
    mat[dead, dead] = 1.0  # five live coordinates joined to nothing
    found = independent_blocks(mat)
    assert found is not None and [tuple(index.shape) for index in found] == [(5, 1), (1, 4)]
    mat, groups = _blocked_gram([4, 4, 4, 4, 4], True)
    chain = mat.clone()
    i, j = int(groups[0][-1]), int(groups[1][-1])
    chain[i, j] = chain[j, i] = 1e-3  # one entry joins two blocks
    found = independent_blocks(chain)  # i and j in one group, or no groups: never apart
    assert found is None or any({i, j} <= set(g) for g in _rows(found))
    monkeypatch.setattr(factors, "MIN_BLOCKWISE_SIZE", 1000)
    assert independent_blocks(mat) is None


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_blockwise_damped_inverse_is_the_damped_inverse(bias: bool) -> None:
    mat, groups = _blocked_gram([5, 5, 1, 7, 3, 3, 1], bias)
    if not bias:
        mat[-1, -1] = 2.0  # a last coordinate joined to nothing
    shift = 1e-3
    damped = mat + shift * torch.eye(mat.shape[0], dtype=mat.dtype)
    inverse, least, failed = blockwise_damped_inverse(mat, shift, _stacked(groups))
    torch.testing.assert_close(inverse, torch.linalg.inv(damped), rtol=1e-10, atol=1e-10)
    assert torch.equal(inverse, inverse.T)
    assert not bool(failed)
    lowest = torch.linalg.eigvalsh(damped)[0]
    assert float(least) >= float(lowest) * (1 - 1e-12)  # each pivot is at least lambda_min
    _, _, failed = blockwise_damped_inverse(
        mat - 10.0 * torch.eye(mat.shape[0]), 0.0, _stacked(groups)
    )
    assert bool(failed)
