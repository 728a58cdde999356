"""Data-parallel curvature: ranks on parts of a batch train like one process on all of it.

The multi-rank tests spawn 2-3 CPU processes in a gloo group (``launch.run_ranks``),
each job with a timeout, so that a hung collective fails the test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from curvlib import (
    EKFAC,
    KFAC,
    Diagonal,
    ExactNaturalGradient,
    FisherType,
    PreconditionedOptimizer,
)
from curvlib.distributed import (
    DataParallel,
    assign_owners,
    data_parallel_for,
    inverse_cost,
    join_statistics,
    split_statistics,
)
from curvlib.distributed.buckets import pack, plan_buckets, unpack
from tests.distributed import ranks
from tests.distributed.launch import RankFailed, run_ranks
from tests.states import equal_states

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"
)

RTOL, ATOL = 1e-9, 1e-12
"""Float64 parameters after several steps: equal up to the order of the sums."""


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = run_ranks(ranks.train_all, 2, timeout=120.0)
    return results


@pytest.fixture
def group_of_one(tmp_path: Path) -> Iterator[None]:
    """A gloo process group of one rank, in this process."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("config", ranks.CONFIGS, ids=lambda c: c.name)
def test_two_ranks_on_half_batches_equal_one_process_on_the_whole_batch(
    two_ranks: list[dict[str, Any]], config: ranks.Config
) -> None:
    reference = ranks.train(config)["params"]
    for rank, result in enumerate(two_ranks):
        run = result[config.name]
        assert run["names"] == ["0", "2"], "layer names without DDP's 'module.' prefix"
        for name, value in reference.items():
            torch.testing.assert_close(
                run["params"][name], value, rtol=RTOL, atol=ATOL, msg=f"rank {rank}: {name}"
            )
    first, second = (r[config.name]["params"] for r in two_ranks)
    assert all(torch.equal(first[k], second[k]) for k in first), "the ranks must agree exactly"


@pytest.mark.parametrize("world_size", [2, 3])
def test_split_inverses_cover_every_layer_once_and_train_like_one_process(
    two_ranks: list[dict[str, Any]], world_size: int
) -> None:
    config = next(c for c in ranks.CONFIGS if c.split)
    results = (
        [r[config.name] for r in two_ranks]
        if world_size == 2
        else run_ranks(ranks.train_split, 3, timeout=60.0)
    )
    inverted = [name for result in results for name in result["inverted"]]
    assert sorted(inverted) == ["0", "2"], "every layer inverted by exactly one rank"
    reference = ranks.train(config)["params"]
    for result in results:
        for name, value in reference.items():
            torch.testing.assert_close(result["params"][name], value, rtol=RTOL, atol=ATOL)
    assert all(
        torch.equal(results[0]["params"][k], r["params"][k]) for r in results for k in reference
    )


def _split_results(
    two_ranks: list[dict[str, Any]], name: str, world_size: int
) -> list[dict[str, Any]]:
    """Every rank's result of the split configuration ``name``, at two or three ranks."""
    if world_size == 2:
        return [r[name] for r in two_ranks]
    results: list[dict[str, Any]] = run_ranks(ranks.train_split, 3, name, timeout=60.0)
    return results


def _trains_like_one_process(results: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """One process's run of configuration ``name``; every rank's parameters must match it."""
    reference = ranks.train(next(c for c in ranks.CONFIGS if c.name == name))
    for result in results:
        for key, value in reference["params"].items():
            torch.testing.assert_close(result["params"][key], value, rtol=RTOL, atol=ATOL)
    return reference


def _packed_basis_numbers() -> int:
    """$d_i + d_i^2 + d_o + d_o^2$ summed over the two layers: one refresh's eigenbases."""
    dims = [(ranks.DIM_IN + 1, ranks.HIDDEN), (ranks.HIDDEN + 1, ranks.DIM_OUT)]
    return sum(d_in + d_in**2 + d_out + d_out**2 for d_in, d_out in dims)


@pytest.mark.parametrize("name", ["ekfac-split-ddp", "twolevel-ekfac-split-ddp"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_split_ekfac_refresh_computes_each_eigenbasis_once_and_trains_like_one_process(
    two_ranks: list[dict[str, Any]], name: str, world_size: int
) -> None:
    results = _split_results(two_ranks, name, world_size)
    # A split refresh on every step (t_inv=1): nothing is due at step 0 (no factors yet)
    # nor at step 1 (the first update computed its basis from the same factors).
    per_refresh = [
        sorted(layer for result in results for layer in result["computed"][i]) for i in range(4)
    ]
    assert per_refresh == [[], [], ["0", "2"], ["0", "2"]], "each basis on one rank"
    if world_size == 3:
        assert [] in ([n for c in r["computed"] for n in c] for r in results), "one rank idle"
    for result in results:
        # Step 3 sent the refreshed bases, then the new scalings ([d_out, d_in] per layer).
        assert result["shared_bytes"] == 8 * (
            ranks.HIDDEN * (ranks.DIM_IN + 1) + ranks.DIM_OUT * (ranks.HIDDEN + 1)
        )
        assert sum(result["refreshed_numbers"][-1] for result in results) == (
            _packed_basis_numbers()
        ), "the bases of step 3's refresh, each layer's from one rank"
    reference = _trains_like_one_process(results, name)
    for result in results:
        assert equal_states(result["approx_state"], results[0]["approx_state"]), "identical"
    assert reference["computed"] == [], "one process refreshes without the split"


def test_ekfac_scalings_and_first_eigenbases_are_computed_once_each() -> None:
    results = run_ranks(ranks.train_split, 2, "ekfac-split-ddp", timeout=60.0)
    # Statistics on every step: each layer's new scalings (and at step 0, its first
    # eigenbasis) computed by one rank.
    for step in range(ranks.STEPS):
        assert sorted(name for r in results for name in r["fits"][step]) == ["0", "2"]


@pytest.mark.parametrize("name", ["kpsvd-split-ddp", "deflation-split-ddp"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_split_rearranged_fits_are_computed_once_and_train_like_one_process(
    two_ranks: list[dict[str, Any]], name: str, world_size: int
) -> None:
    results = _split_results(two_ranks, name, world_size)
    # Statistics on every step (t_cov=1): each layer's fit on exactly one rank each time.
    for step in range(ranks.STEPS):
        fitted = sorted(layer for result in results for layer in result["fits"][step])
        assert fitted == ["0", "2"], f"step {step}: each layer fitted once"
    if world_size == 3:
        assert any(all(f == [] for f in r["fits"]) for r in results), "one rank owns nothing"
    reference = _trains_like_one_process(results, name)
    assert reference["fits"] == [], "one process fits without the split"
    for result in results:
        assert equal_states(result["approx_state"], results[0]["approx_state"]), "identical"


def _last_broadcast_numbers(name: str) -> int:
    """What the owners sent last (step 3): KFAC's step 2 inverses, Deflation's step 3 fits.

    KFAC's packed inverse is its two inverses and the condition number per layer;
    Deflation's fit is its four factors and two numbers of telemetry. Neither is a
    direction ($d_o d_i$ numbers per layer).
    """
    dims = [(ranks.HIDDEN, ranks.DIM_IN + 1), (ranks.DIM_OUT, ranks.HIDDEN + 1)]
    if name.startswith("kfac"):
        return sum(o * o + i * i + 1 for o, i in dims)
    return sum(2 * o * o + 2 * i * i + 2 for o, i in dims)


@pytest.mark.parametrize("name", ["kfac-inverses-ddp", "deflation-inverses-ddp"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_inverses_sent_whole_are_built_once_and_train_like_one_process(
    two_ranks: list[dict[str, Any]], name: str, world_size: int
) -> None:
    results = _split_results(two_ranks, name, world_size)
    # Inverses at steps 0-2 (the warm-up), none at step 3 (t_inv=2).
    for rebuild in range(3):
        built = sorted(layer for result in results for layer in result["built"][rebuild])
        assert built == ["0", "2"], f"rebuild {rebuild}: each inverse on one rank"
    assert all(len(result["built"]) == 3 for result in results)
    for result in results:
        assert result["inverted"] == ["0", "2"], "every rank applies every layer's inverse"
        # Step 3 sent no directions.
        assert result["shared_bytes"] == 8 * _last_broadcast_numbers(name)
    reference = _trains_like_one_process(results, name)
    assert reference["built"] == [], "one process inverts without the split"
    for result in results:
        first = results[0]["params"]
        assert all(torch.equal(first[k], result["params"][k]) for k in first), "identical"


@pytest.mark.parametrize("name", ["exact-ng-split-ddp", "tridiagonal-split-ddp"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_split_kernel_blocks_are_computed_once_and_train_like_one_process(
    two_ranks: list[dict[str, Any]], name: str, world_size: int
) -> None:
    results = _split_results(two_ranks, name, world_size)
    # Inverses at steps 0-2 (the warm-up), none at step 3 (t_inv=2).
    assert all(len(result["built"]) == 3 for result in results)
    for rebuild in range(3):
        built = sorted(layer for result in results for layer in result["built"][rebuild])
        assert built == ["0", "2"], f"rebuild {rebuild}: each kernel block on one rank"
    if world_size == 3:
        assert any(all(b == [] for b in r["built"]) for r in results), "one rank owns nothing"
    rows = ranks.BATCH  # empirical Fisher: one row per sample of the whole batch
    for result in results:
        assert result["shared_bytes"] == 8 * 2 * rows * rows, "two [m, m] blocks, no directions"
    reference = _trains_like_one_process(results, name)
    assert reference["built"] == [], "one process builds without the split"
    first = results[0]["params"]
    for result in results:
        assert all(torch.equal(first[k], result["params"][k]) for k in first), "identical"


def test_a_two_level_method_splits_its_fine_level_and_trains_like_one_process(
    two_ranks: list[dict[str, Any]],
) -> None:
    kpsvd = [r["twolevel-kpsvd-split-ddp"] for r in two_ranks]
    for step in range(ranks.STEPS):  # KPSVD's fit of each layer on one rank
        assert sorted(layer for r in kpsvd for layer in r["fits"][step]) == ["0", "2"]
    assert all(r["built"] == [] for r in kpsvd), "sending directions: built on every rank"
    kfac = [r["twolevel-kfac-inverses-ddp"] for r in two_ranks]
    for rebuild in range(3):  # KFAC's inverse of each layer on one rank, sent whole
        assert sorted(layer for r in kfac for layer in r["built"][rebuild]) == ["0", "2"]
    assert all(r["fits"] == [] for r in kfac), "KFAC's update has nothing to split"


@pytest.mark.parametrize(
    ("run", "counter", "warning"),
    [
        (ranks.kfac_inverse_fails_on_rank_one, "failures", "building the damped inverse failed"),
        (ranks.kpsvd_fit_fails_on_rank_one, "skipped", "the curvature update failed"),
        (ranks.ekfac_refresh_fails_on_rank_one, "failures", "refreshing the curvature estimate"),
        (ranks.exact_ng_gram_fails_on_rank_one, "failures", "building the damped inverse failed"),
    ],
    ids=["sent-inverse", "split-fit", "split-eigenbasis", "split-kernel"],
)
def test_a_part_that_failed_on_its_owner_is_refused_by_every_rank_alike(
    run: Any, counter: str, warning: str
) -> None:
    results = run_ranks(run, 2, timeout=60.0)
    for result in results:
        refused = [m for m in result["messages"] if "are not finite" in m]
        assert len(refused) == 2 and result[counter] == 2, result["messages"]  # steps 2, 3
        assert warning in refused[0]
    first, second = results
    assert equal_states(first["approx_state"], second["approx_state"])
    assert all(torch.equal(first["params"][k], second["params"][k]) for k in first["params"])
    if run is not ranks.ekfac_refresh_fails_on_rank_one:  # rank 1 owns layer '2'
        assert "['2']" in refused[0]


def test_owners_are_greedy_by_cost_and_cover_every_layer_once() -> None:
    costs = {"a": 1.0, "b": 8.0, "c": 3.0, "d": 3.0, "e": 5.0}
    owners = assign_owners(costs, 2)
    assert list(owners) == list(costs) and set(owners.values()) == {0, 1}
    load = [sum(c for n, c in costs.items() if owners[n] == r) for r in range(2)]
    assert owners == {"a": 1, "b": 0, "c": 1, "d": 0, "e": 1}, "largest first, to the idlest"
    assert max(load) == 11.0, "the optimum here: no subset sums to 10"
    assert assign_owners(costs, 2) == owners, "deterministic: every rank computes the same"
    assert set(assign_owners(costs, 1).values()) == {0}
    spread = assign_owners({"x": 1.0, "y": 1.0}, 3)
    assert sorted(spread.values()) == [0, 1], "more ranks than layers: some own none"
    assert inverse_cost(4, 6) == 4.0**3 + 6.0**3
    with pytest.raises(ValueError, match="world_size"):
        assign_owners(costs, 0)


@pytest.mark.parametrize("resume_on", [1, 3])
def test_a_checkpoint_of_rank_0_at_world_size_2_resumes_on_another_world_size(
    tmp_path: Path, resume_on: int
) -> None:
    path = str(tmp_path / "checkpoint.pt")
    run_ranks(ranks.train_from_checkpoint, 2, path, (0, 2), True, timeout=60.0)
    if resume_on == 1:
        resumed = ranks.train_from_checkpoint(0, 1, path, (2, ranks.STEPS), False)
    else:
        resumed = run_ranks(
            ranks.train_from_checkpoint, 3, path, (2, ranks.STEPS), False, timeout=60.0
        )[1]
    reference = ranks.train(ranks.CONFIGS[0])["params"]
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "name", ["ekfac-split-ddp", "deflation-split-ddp", "twolevel-kfac-inverses-ddp"]
)
def test_a_split_checkpoint_at_world_size_2_resumes_in_one_process(
    tmp_path: Path, name: str
) -> None:
    path = str(tmp_path / "checkpoint.pt")
    # Saved after steps 0-2 (EKFAC: the basis of the split refresh at step 2 is in it).
    run_ranks(ranks.train_from_checkpoint, 2, path, (0, 3), True, name, timeout=60.0)
    resumed = ranks.train_from_checkpoint(0, 1, path, (3, ranks.STEPS), False, name)
    reference = ranks.train(next(c for c in ranks.CONFIGS if c.name == name))["params"]
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, rtol=RTOL, atol=ATOL)


def test_after_a_resume_only_rank_0_continues_the_saved_mc_noise(tmp_path: Path) -> None:
    path = str(tmp_path / "checkpoint.pt")
    saved = run_ranks(ranks.mc_generators_after_resume, 2, path, True, timeout=60.0)
    loaded = run_ranks(ranks.mc_generators_after_resume, 2, path, False, timeout=60.0)
    assert torch.equal(loaded[0], saved[0])
    assert saved[1] is not None and not torch.equal(saved[1], saved[0]), "seed + rank"
    assert loaded[1] is None, "rank 1 keeps its own stream, seeded at its first draw"


def test_monte_carlo_ranks_draw_their_own_noise_and_agree(
    two_ranks: list[dict[str, Any]],
) -> None:
    first, second = (r["mc-defaults"] for r in two_ranks)
    assert not torch.equal(first["generator"], second["generator"]), "seed + rank"
    assert all(torch.equal(first["params"][k], second["params"][k]) for k in first["params"])


def test_statistics_travel_in_a_few_messages(two_ranks: list[dict[str, Any]]) -> None:
    kfac = two_ranks[0]["kfac-exact-ddp"]
    # The header and one bucket of factors: A and G of both layers.
    assert kfac["messages"] == 2
    factors = (ranks.DIM_IN + 1) ** 2 + ranks.HIDDEN**2 + (ranks.HIDDEN + 1) ** 2
    factors += ranks.DIM_OUT**2
    header = 4 * 8
    assert kfac["bytes"] == header + 8 * factors
    # Received: the other rank's header and the factors' sum.
    assert kfac["received"] == header + 8 * factors
    # Per-sample statistics add one gathered bucket of this rank's samples.
    ekfac = two_ranks[0]["ekfac-empirical-ddp"]
    assert ekfac["messages"] == 3
    samples = (ranks.BATCH // 2) * (
        ranks.DIM_IN + 1 + ranks.HIDDEN + ranks.HIDDEN + 1 + ranks.DIM_OUT
    )
    header += 4 * 8  # the four per-sample tensors' counts
    assert ekfac["bytes"] == ekfac["received"] == header + 8 * (factors + samples)


def test_replicas_with_different_parameters_are_refused(
    two_ranks: list[dict[str, Any]],
) -> None:
    for result in two_ranks:
        message = result["mismatch"]
        assert "differ between the ranks" in message
        assert "DistributedDataParallel" in message and "data_parallel=False" in message


def test_reduced_statistics_of_uneven_ranks_are_those_of_the_union() -> None:
    results = run_ranks(ranks.reduce_uneven, 3, timeout=60.0)
    for result in results:
        assert result["num_samples"] == (12, 12)
        assert result["messages"] > 3, "bucket_bytes=256 splits the messages"
        for name, expected in result["expected"].items():
            for got, want in zip(result["reduced"][name], expected, strict=True):
                torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    for other in results[1:]:
        for name, tensors in results[0]["reduced"].items():
            assert all(
                torch.equal(a, b) for a, b in zip(tensors, other["reduced"][name], strict=True)
            )


def test_ranks_that_recorded_different_statistics_are_refused() -> None:
    with pytest.raises(RankFailed, match="the ranks recorded different curvature statistics"):
        run_ranks(ranks.mismatched_statistics, 2, timeout=60.0, grace=5.0)


def test_a_rank_that_raises_fails_the_job_with_its_message() -> None:
    start = time.monotonic()
    with pytest.raises(RankFailed, match="rank 1 gives up at step 2") as info:
        run_ranks(ranks.fail_on_rank_one, 2, timeout=60.0, grace=5.0)
    assert info.value.rank == 1
    assert time.monotonic() - start < 30.0


def test_a_hung_rank_fails_the_job_within_curvlibs_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(RankFailed, match="curvlib: the gradient average failed on rank 0"):
        run_ranks(ranks.hang_on_rank_one, 2, timeout=60.0, group_timeout=30.0, grace=1.0)
    assert time.monotonic() - start < 25.0


@pytest.mark.parametrize(
    "config", [ranks.CONFIGS[0], ranks.CONFIGS[3], ranks.CONFIGS[-1]], ids=lambda c: c.name
)
def test_a_group_of_one_rank_is_the_single_process_optimizer(
    config: ranks.Config, tmp_path: Path
) -> None:
    alone = ranks.train(config)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        inside = ranks.train(config)
    finally:
        dist.destroy_process_group()
    assert alone["bytes"] is None and inside["bytes"] == 0, "nothing to communicate"
    for name, value in alone["params"].items():
        assert torch.equal(inside["params"][name], value), name


class _RecordingCosts(DataParallel):
    """Records the costs the engine balances the owners by."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.costs: list[dict[str, float]] = []

    def inverse_owners(self, costs: Any) -> dict[str, int] | None:
        self.costs.append(dict(costs))
        return super().inverse_owners(costs)


@pytest.mark.usefixtures("group_of_one")
@pytest.mark.parametrize(
    ("approx", "costs"),
    [
        (KFAC, {"0": 4.0**3 + 6.0**3, "2": 3.0**3 + 5.0**3}),  # the two factorisations
        (Diagonal, {"0": 4.0 * 6.0, "2": 3.0 * 5.0}),  # elementwise
        (ExactNaturalGradient, {"0": 4.0 + 6.0, "2": 3.0 + 5.0}),  # kernel blocks / m^2
    ],
    ids=["kfac", "diagonal", "exact-ng"],
)
def test_owners_balance_each_approximations_own_work_cost(
    approx: Any, costs: dict[str, float]
) -> None:
    sync = _RecordingCosts(split_inverses=True)
    net, loss_fn = ranks.model(), nn.MSELoss()
    opt = PreconditionedOptimizer(
        net, approx(), loss_fn=loss_fn, fisher_type=FisherType.EMPIRICAL, data_parallel=sync
    )
    for x, y in ranks.batches()[:2]:
        opt.zero_grad()
        with opt.record():
            loss_fn(net(x), y).backward()
        opt.step()
    assert sync.costs == [costs], "asked once, with the approximation's costs"


@pytest.mark.usefixtures("group_of_one")
def test_sending_inverses_needs_a_split_and_inverses_that_can_be_sent() -> None:
    with pytest.raises(ValueError, match="broadcast must be one of"):
        DataParallel(split_inverses=True, broadcast="gradients")
    with pytest.raises(ValueError, match="pass split_inverses=True"):
        DataParallel(broadcast="inverses")
    sync = DataParallel(split_inverses=True, broadcast="inverses")
    assert "broadcast='inverses'" in repr(sync)
    with pytest.raises(ValueError, match="Diagonal's cannot be; use broadcast='directions'"):
        PreconditionedOptimizer(ranks.model(), Diagonal(), loss_fn=nn.MSELoss(), data_parallel=sync)
    # EKFAC's inverse is built on every rank; its split is the refresh: nothing to refuse.
    PreconditionedOptimizer(ranks.model(), EKFAC(), loss_fn=nn.MSELoss(), data_parallel=sync)


@pytest.mark.usefixtures("group_of_one")
def test_ddp_models_are_unwrapped_and_need_the_synchronisation() -> None:
    net = ranks.model()
    ddp = nn.parallel.DistributedDataParallel(net)
    inner, sync = data_parallel_for(ddp, None)
    assert inner is net and sync is not None and sync.average_gradients is False
    inner, sync = data_parallel_for(net, None)
    assert inner is net and sync is not None and sync.average_gradients is True
    with pytest.raises(ValueError, match="replicas would drift apart"):
        PreconditionedOptimizer(ddp, KFAC(), loss_fn=nn.MSELoss(), data_parallel=False)
    opt = PreconditionedOptimizer(ddp, KFAC(), loss_fn=nn.MSELoss(), fisher_type=FisherType.EXACT)
    assert [layer.name for layer in opt.layers] == ["0", "2"]


def test_without_a_process_group_nothing_is_synchronised() -> None:
    net = ranks.model()
    assert data_parallel_for(net, None) == (net, None)
    assert data_parallel_for(net, False) == (net, None)
    with pytest.raises(RuntimeError, match="init_process_group"):
        data_parallel_for(net, True)
    with pytest.raises(TypeError, match="data_parallel must be"):
        data_parallel_for(net, "ddp")  # type: ignore[arg-type]
    assert PreconditionedOptimizer(net, KFAC(), loss_fn=nn.MSELoss()).sync is None


def test_buckets_pack_tensors_by_dtype_within_the_size_limit() -> None:
    tensors = [
        torch.ones(3, 3),
        torch.zeros(4, dtype=torch.float64),
        torch.arange(5.0),
        torch.full((2, 2), 7.0),
    ]
    buckets = plan_buckets(tensors, bucket_bytes=60)
    assert [b.indices for b in buckets] == [(0, 2), (1,), (3,)]
    for bucket in buckets:
        flat = pack(tensors, bucket)
        assert flat.dtype == bucket.dtype
        pieces = unpack(flat, [tensors[i].shape for i in bucket.indices])
        assert all(torch.equal(p, tensors[i]) for i, p in zip(bucket.indices, pieces, strict=True))


def test_statistics_split_into_means_and_samples_and_join_back() -> None:
    from curvlib import StatKind

    x, y = ranks.batches()[0]
    kinds = {
        StatKind.KRONECKER,
        StatKind.PER_SAMPLE_IO,
        StatKind.DIAGONAL,
        StatKind.PER_SAMPLE_GRAD,
    }
    stats = ranks.statistics_of(x, y, kinds)
    means, samples = split_statistics(stats)
    assert len(means) == 2 * 3 and len(samples) == 2 * 3
    assert all(s.count == ranks.BATCH for s in samples)
    joined = join_statistics(stats, means, [s.tensor for s in samples], stats.num_samples)
    for name, layer in stats.layers.items():
        assert all(a is b for a, b in zip(layer.tensors(), joined[name].tensors(), strict=True))


# -- per-sample statistics gathered to the owners of a split update ---------------------


def _owners(results: list[dict[str, Any]], step: int) -> dict[str, int]:
    """Each layer's owner at ``step``: the rank that fitted it."""
    return {layer: rank for rank, r in enumerate(results) for layer in r["fits"][step]}


@pytest.mark.parametrize("name", ["kpsvd-split-ddp", "deflation-split-ddp", "ekfac-split-ddp"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_a_split_update_gathers_each_layers_samples_to_its_owner_only(
    two_ranks: list[dict[str, Any]], name: str, world_size: int
) -> None:
    results = _split_results(two_ranks, name, world_size)
    for step in range(ranks.STEPS):
        owners = _owners(results, step)
        assert sorted(owners) == ["0", "2"]
        for rank, result in enumerate(results):
            held = result["held"][step]
            for layer, owner in owners.items():
                want = (ranks.BATCH, ranks.BATCH) if owner == rank else (0, 0)
                assert held[layer] == want, f"step {step}, rank {rank}, layer {layer}"
    # What the last statistics step delivered to each rank: the other ranks' headers
    # (4 + 2p entries, p = 4 per-sample tensors), the sum of the means (EKFAC's A and G),
    # and the other ranks' samples of the layers this rank owns, and no others.
    widths = {"0": ranks.DIM_IN + 1 + ranks.HIDDEN, "2": ranks.HIDDEN + 1 + ranks.DIM_OUT}
    per_rank = ranks.BATCH // world_size
    means = 0
    if name.startswith("ekfac"):
        means = (ranks.DIM_IN + 1) ** 2 + ranks.HIDDEN**2 + (ranks.HIDDEN + 1) ** 2
        means += ranks.DIM_OUT**2
    owners = _owners(results, ranks.STEPS - 1)
    for rank, result in enumerate(results):
        mine = sum(widths[layer] for layer, owner in owners.items() if owner == rank)
        header = (world_size - 1) * (4 + 2 * 4)
        samples = (world_size - 1) * per_rank * mine
        assert result["received"] == 8 * (header + means + samples), f"rank {rank}"


def test_a_two_level_method_gathers_the_samples_its_coarse_level_reads_to_every_rank(
    two_ranks: list[dict[str, Any]],
) -> None:
    for result in (r["twolevel-kpsvd-split-ddp"] for r in two_ranks):
        for held in result["held"]:  # Nicolaides' coarse matrix reads every layer's samples
            assert held == {"0": (ranks.BATCH,) * 2, "2": (ranks.BATCH,) * 2}
    # Tselepidis' reads the pooled statistics: the fine level's samples go to the owners.
    results = [r["twolevel-tselepidis-kpsvd-split-ddp"] for r in two_ranks]
    for step in range(ranks.STEPS):
        owners = _owners(results, step)
        for rank, result in enumerate(results):
            for layer, owner in owners.items():
                n = ranks.BATCH if owner == rank else 0
                assert result["held"][step][layer] == (n, n, ranks.BATCH), (step, rank, layer)


@pytest.mark.parametrize("approx", ["kpsvd", "ekfac"])
@pytest.mark.parametrize("layer", ["0", "2"], ids=["owned-by-rank-0", "owned-by-rank-1"])
def test_a_nonfinite_sample_on_one_rank_is_refused_by_every_rank_alike(
    approx: str, layer: str
) -> None:
    results = run_ranks(ranks.nonfinite_sample_on_rank_one, 2, approx, layer, timeout=60.0)
    assert _owners(results, 0) == {"0": 0, "2": 1}
    for result in results:
        assert result["skipped"] == 1
        warned = [m for m in result["messages"][2] if "NaN/Inf" in m]
        assert len(warned) == 1 and f"layers ['{layer}']" in warned[0], result["messages"]
        assert not any("NaN/Inf" in m for i in (0, 1, 3) for m in result["messages"][i])
        # The refused step was gathered to every rank; the next one to the owners again.
        assert len(result["held"]) == ranks.STEPS - 1, "no update at step 2"
        assert result["received"][2] > result["received"][3]
    first, second = results
    assert equal_states(first["approx_state"], second["approx_state"])
    assert all(torch.equal(first["params"][k], second["params"][k]) for k in first["params"])


def test_reduced_statistics_with_owners_reach_only_the_owner() -> None:
    results = run_ranks(ranks.reduce_to_owners, 3, timeout=60.0)
    for rank, result in enumerate(results):
        assert result["num_samples"] == ranks.BATCH and result["finite"]
        for name, expected in result["expected"].items():
            got = result["reduced"][name]
            # A, G, inputs, output gradients, per-sample gradients.
            owned = name == "0" and rank != 2
            for i, (tensor, want) in enumerate(zip(got, expected, strict=True)):
                if owned and i in (2, 3):
                    assert tensor.shape[0 if i == 2 else 1] == 0, "no samples on a non-owner"
                    continue
                torch.testing.assert_close(tensor, want, rtol=RTOL, atol=ATOL)
        assert "layers without statistics: ['hidden']" in result["errors"][0]
        assert "ranks outside the group of 3" in result["errors"][1]
    # Layer '0''s inputs and output gradients (padded to 5 samples) went to rank 2 alone.
    layer0 = 5 * (ranks.DIM_IN + 1) + 5 * ranks.HIDDEN
    assert results[2]["received"] - results[0]["received"] == 2 * 8 * layer0
    assert results[0]["received"] == results[1]["received"]
