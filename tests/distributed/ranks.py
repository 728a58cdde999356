"""What the ranks of the distributed tests run (importable by the spawned processes).

One problem: a float64 two-layer MLP with ``MSELoss``, and ``STEPS`` batches of
``BATCH`` samples. Rank ``r`` of ``W`` trains on the ``r``-th contiguous part
of every batch; one process on the whole batch is the reference.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from curvlib import (
    EKFAC,
    KFAC,
    KPSVD,
    CurvatureStatistics,
    Deflation,
    ExactNaturalGradient,
    FisherType,
    LevenbergMarquardt,
    NaturalGradientPreconditioner,
    PreconditionedOptimizer,
    StatKind,
    Tselepidis,
    TwoLevel,
)
from curvlib.approx import BlockTridiagonalNaturalGradient
from curvlib.core.stats import PerSampleIO, merge_statistics
from curvlib.distributed import DataParallel
from curvlib.extract import CurvatureExtractor

STEPS = 4
BATCH = 12
DIM_IN, HIDDEN, DIM_OUT = 5, 4, 3


@dataclass(frozen=True)
class Config:
    """One training run: the approximation, its Fisher and whether the model is DDP-wrapped."""

    name: str
    approx: str
    fisher: FisherType
    ddp: bool = True
    lm: bool = False
    auto: bool = False
    preconditioner: bool = False
    split: bool = False
    broadcast: str = "directions"
    t_inv: int = 2
    t_cov: int = 1
    deferred: bool = False


CONFIGS = (
    # EMPIRICAL and EXACT statistics are deterministic functions of the samples, so the
    # ranks' statistics merge into exactly those of the whole batch. MC draws targets
    # from a random stream: rank r's draws for its samples are not the draws one process
    # makes for the same samples, so MC agrees in expectation only.
    Config("kfac-exact-ddp", "kfac", FisherType.EXACT),
    Config("ekfac-empirical-ddp", "ekfac", FisherType.EMPIRICAL),
    Config("exact-ng-empirical-ddp", "exact_ng", FisherType.EMPIRICAL),
    Config("kfac-empirical-unwrapped", "kfac", FisherType.EMPIRICAL, ddp=False),
    # Levenberg-Marquardt compares the closure's loss change with the quadratic model:
    # both must be those of the whole batch.
    Config("kfac-lm-ddp", "kfac", FisherType.EXACT, lm=True),
    # lr="auto" fits the step to the exact GGN of the batch loss: that of the whole batch.
    Config("kfac-auto-ddp", "kfac", FisherType.EMPIRICAL, auto=True),
    # Preconditioner mode: curvlib rewrites .grad, torch's SGD steps every parameter.
    Config("precond-kfac-unwrapped", "kfac", FisherType.EMPIRICAL, ddp=False, preconditioner=True),
    # Step 3 is a regular step (statistics at 0, 1, 2): its checks deferred to the device.
    Config("kfac-deferred-ddp", "kfac", FisherType.EXACT, t_cov=4, t_inv=4, deferred=True),
    # Each layer's inverse built by one rank, which broadcasts the direction.
    Config("kfac-split-ddp", "kfac", FisherType.EXACT, split=True),
    # Each layer's eigenbasis computed by one rank and broadcast; refreshed at steps 1-3.
    Config("ekfac-split-ddp", "ekfac", FisherType.EMPIRICAL, split=True, t_inv=1),
    # Each layer's fit to the batch (power iterations) computed by one rank and broadcast.
    Config("kpsvd-split-ddp", "kpsvd", FisherType.EMPIRICAL, split=True),
    Config("deflation-split-ddp", "deflation", FisherType.EMPIRICAL, split=True),
    # Each layer's inverse built by one rank and sent whole; every rank applies all.
    Config("kfac-inverses-ddp", "kfac-shared", FisherType.EXACT, split=True, broadcast="inverses"),
    Config(
        "deflation-inverses-ddp",
        "deflation",
        FisherType.EMPIRICAL,
        split=True,
        broadcast="inverses",
    ),
    # Two-level: the fine level splits as the fine approximation does; the coarse level
    # is built on every rank.
    Config("twolevel-kpsvd-split-ddp", "twolevel-kpsvd", FisherType.EMPIRICAL, split=True),
    # A coarse space of pooled cross-layer statistics: the fine level's samples go to
    # their owners alone, the pooled ones to every rank.
    Config(
        "twolevel-tselepidis-kpsvd-split-ddp",
        "twolevel-tselepidis-kpsvd",
        FisherType.EMPIRICAL,
        split=True,
    ),
    # Two-level over EKFAC: the fine level's eigenbases split as EKFAC's are.
    Config("twolevel-ekfac-split-ddp", "twolevel-ekfac", FisherType.EMPIRICAL, split=True, t_inv=1),
    # Each layer's kernel block of the exact natural gradient computed by one rank and
    # broadcast; every rank builds the sample-space inverse from all of them.
    Config("exact-ng-split-ddp", "exact_ng-grams", FisherType.EMPIRICAL, split=True),
    Config("tridiagonal-split-ddp", "tridiagonal-grams", FisherType.EMPIRICAL, split=True),
    Config(
        "twolevel-kfac-inverses-ddp",
        "twolevel-kfac",
        FisherType.EMPIRICAL,
        split=True,
        broadcast="inverses",
    ),
)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, DIM_OUT)).double()


def batches() -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, DIM_IN, generator=gen, dtype=torch.float64),
            torch.randn(BATCH, DIM_OUT, generator=gen, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


class RecordingInverses:
    """Records the layers whose inverses this rank built, per sent inverse."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.built: list[list[str]] = []

    def inverse_parts(self, damping: float, layers: Collection[str]) -> dict[str, Tensor]:
        self.built.append(sorted(layers))
        return super().inverse_parts(damping, layers)  # type: ignore[misc, no-any-return]


class RecordingKFAC(RecordingInverses, KFAC):
    """KFAC that records the layers whose inverses it built, per sent inverse."""


class RecordingGrams:
    """Records the layers whose kernel blocks this rank computed, per inverse."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.built: list[list[str]] = []

    def grams(self, layers: Collection[str]) -> dict[str, Tensor]:
        self.built.append(sorted(layers))
        return super().grams(layers)  # type: ignore[misc, no-any-return]


class RecordingExactNG(RecordingGrams, ExactNaturalGradient):
    """Exact natural gradient that records the layers whose kernel blocks it computed."""


class RecordingTridiagonal(RecordingGrams, BlockTridiagonalNaturalGradient):
    """Block-tridiagonal natural gradient that records the kernel blocks it computed."""


class RecordingFits:
    """Records the layers whose update parts this rank computed, per split update.

    And, per update, how many samples of each layer's inputs and output
    gradients the statistics held on this rank.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fits: list[list[str]] = []
        self.held: list[dict[str, tuple[int, ...]]] = []

    def fitted(self, stats: CurvatureStatistics, layers: Collection[str]) -> dict[str, Tensor]:
        self.fits.append(sorted(layers))
        return super().fitted(stats, layers)  # type: ignore[misc, no-any-return]

    def update_with(self, stats: CurvatureStatistics, fitted: Any) -> None:
        self.held.append(_held(stats))
        super().update_with(stats, fitted)  # type: ignore[misc]

    def update(self, stats: CurvatureStatistics) -> None:
        self.held.append(_held(stats))
        super().update(stats)  # type: ignore[misc]


def _held(stats: CurvatureStatistics) -> dict[str, tuple[int, ...]]:
    """Per layer, the samples of its per-sample inputs and output gradients (and pooled ones)."""
    held: dict[str, tuple[int, ...]] = {}
    for name, s in stats.layers.items():
        if s.io is not None:
            held[name] = (s.io.inputs.shape[0], s.io.output_grads.shape[1])
        if s.pooled is not None:
            held[name] = (*held.get(name, ()), s.pooled.inputs.shape[0])
    return held


class RecordingEKFAC(RecordingFits, EKFAC):
    """EKFAC that records the layers whose eigenbases this rank computed, per split refresh."""

    def __init__(self) -> None:
        super().__init__()
        self.computed: list[list[str]] = []
        self.refreshed_numbers: list[int] = []

    def refreshed(self, layers: Collection[str]) -> dict[str, Tensor]:
        self.computed.append(sorted(layers))
        parts = super().refreshed(layers)
        self.refreshed_numbers.append(sum(part.numel() for part in parts.values()))
        return parts


class RecordingKPSVD(RecordingFits, KPSVD):
    """KPSVD that records the layers it fitted, per split update."""


class RecordingDeflation(RecordingInverses, RecordingFits, Deflation):
    """Deflation that records the layers it fitted and inverted, per split update or inverse."""


class RecordingTwoLevel(RecordingInverses, RecordingFits, TwoLevel):
    """A two-level method that records the fine level's layers it fitted and inverted."""


def approximation(name: str) -> Any:
    return {
        "kfac": KFAC,
        "ekfac": RecordingEKFAC,
        "exact_ng": ExactNaturalGradient,
        "exact_ng-grams": RecordingExactNG,
        "tridiagonal-grams": RecordingTridiagonal,
        "kpsvd": RecordingKPSVD,
        "deflation": RecordingDeflation,
        "kfac-shared": RecordingKFAC,
        "twolevel-kpsvd": lambda: RecordingTwoLevel(KPSVD()),
        "twolevel-tselepidis-kpsvd": lambda: RecordingTwoLevel(KPSVD(), Tselepidis()),
        "twolevel-kfac": lambda: RecordingTwoLevel(KFAC()),
        "twolevel-ekfac": lambda: TwoLevel(RecordingEKFAC()),
    }[name]()


def shard(t: Tensor, rank: int, world_size: int) -> Tensor:
    return t.tensor_split(world_size)[rank]


def train(
    config: Config, rank: int = 0, world_size: int = 1, fail_at: int | None = None
) -> dict[str, Any]:
    """Train ``STEPS`` steps on this rank's part of every batch; the final parameters.

    Without a process group (the one-process reference) the model is not wrapped.
    """
    net = model()
    ddp = config.ddp and dist.is_initialized()
    wrapped: nn.Module = nn.parallel.DistributedDataParallel(net) if ddp else net
    loss_fn = nn.MSELoss()
    if config.preconditioner:
        return _train_preconditioner(config, net, wrapped, rank, world_size)
    damping = LevenbergMarquardt(initial=1e-3, interval=2) if config.lm else 1e-3
    extra: dict[str, Any] = {"lr": "auto", "momentum": "auto"} if config.auto else {}
    if config.split and dist.is_initialized():
        extra["data_parallel"] = DataParallel(split_inverses=True, broadcast=config.broadcast)
    approx = approximation(config.approx)
    opt = PreconditionedOptimizer(
        wrapped, approx, loss_fn=loss_fn, fisher_type=config.fisher,
        stats_fraction=1.0, t_cov=config.t_cov, t_inv=config.t_inv, damping=damping,
        deferred_checks=config.deferred, **extra,
    )  # fmt: skip
    inverted: set[str] = set()
    for step, (x, y) in enumerate(batches()):
        xr, yr = shard(x, rank, world_size), shard(y, rank, world_size)
        opt.zero_grad()
        with opt.record():
            loss_fn(wrapped(xr), yr).backward()
        if step == fail_at and rank == 1:
            raise ValueError("rank 1 gives up at step 2")
        opt.step((lambda: loss_fn(net(xr), yr)) if opt.lm_due else None)  # noqa: B023
        inverted |= set(opt.last_stats["condition_numbers"])
        assert opt.last_stats["skipped"] is False
    sync = opt.sync
    return {
        "params": {k: v.detach().clone() for k, v in net.named_parameters()},
        "names": [layer.name for layer in opt.layers],
        "inverted": sorted(inverted),
        "bytes": None if sync is None else sync.last_statistics.bytes,
        "received": None if sync is None else sync.last_statistics.received,
        "messages": None if sync is None else sync.last_statistics.messages,
        "computed": getattr(getattr(approx, "fine", approx), "computed", None),
        "fits": getattr(approx, "fits", None),
        "built": getattr(approx, "built", None),
        "refreshed_numbers": getattr(getattr(approx, "fine", approx), "refreshed_numbers", None),
        "held": getattr(approx, "held", None),
        "shared_bytes": None if sync is None else sync.last_shared.bytes,
        "approx_state": approx.state_dict(),
    }


def train_split(rank: int, world_size: int, name: str = "kfac-split-ddp") -> dict[str, Any]:
    """A split configuration alone (for three ranks and two layers)."""
    return train(next(c for c in CONFIGS if c.name == name), rank, world_size)


def _fails_on_rank_one(
    rank: int,
    world_size: int,
    approx: Any,
    fisher: FisherType,
    broadcast: str,
    module: Any,
    function: str,
    at_step: int,
) -> dict[str, Any]:
    """A split run on which ``module.function`` raises on rank 1 from ``at_step`` on.

    Rank 1 still sends its layer's (NaN) part; every rank refuses it alike, keeps
    its estimate (or preconditioner) and trains on.
    """
    from curvlib.linalg.factors import FactorizationError

    def broken(*args: object, **kwargs: object) -> Any:
        raise FactorizationError("planted failure")

    net, loss_fn = model(), nn.MSELoss()
    wrapped = nn.parallel.DistributedDataParallel(net)
    opt = PreconditionedOptimizer(
        wrapped, approx, loss_fn=loss_fn, fisher_type=fisher, stats_fraction=1.0,
        t_cov=1, t_inv=1, damping=1e-3,
        data_parallel=DataParallel(split_inverses=True, broadcast=broadcast),
    )  # fmt: skip
    messages: list[str] = []
    for step, (x, y) in enumerate(batches()):
        if step == at_step and rank == 1:
            setattr(module, function, broken)
        xr, yr = shard(x, rank, world_size), shard(y, rank, world_size)
        messages += _step_warnings(opt, wrapped, loss_fn, xr, yr)
    return {
        "messages": messages,
        "failures": opt.engine.inverse_failures,
        "skipped": opt.engine.skipped_updates,
        "approx_state": approx.state_dict(),
        "params": {k: v.detach().clone() for k, v in net.named_parameters()},
    }


def _step_warnings(
    opt: PreconditionedOptimizer, net: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor
) -> list[str]:
    """One training step on ``(x, y)``; the messages of the warnings it raised."""
    opt.zero_grad()
    with opt.record():
        loss_fn(net(x), y).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    return [str(w.message) for w in caught]


def ekfac_refresh_fails_on_rank_one(rank: int, world_size: int) -> dict[str, Any]:
    """Split EKFAC with every eigendecomposition on rank 1 failing after the first bases."""
    from curvlib.approx import ekfac

    return _fails_on_rank_one(
        rank, world_size, RecordingEKFAC(), FisherType.EMPIRICAL, "directions", ekfac, "eigh", 1
    )


def kfac_inverse_fails_on_rank_one(rank: int, world_size: int) -> dict[str, Any]:
    """KFAC's inverses sent whole, every Cholesky factorisation on rank 1 failing from step 2."""
    from curvlib.approx import kfac

    return _fails_on_rank_one(
        rank, world_size, RecordingKFAC(), FisherType.EXACT, "inverses", kfac, "damped_cholesky", 2
    )


def kpsvd_fit_fails_on_rank_one(rank: int, world_size: int) -> dict[str, Any]:
    """Split KPSVD with every power iteration on rank 1 failing from step 2."""
    from curvlib.approx import kpsvd

    approx = RecordingKPSVD()
    return _fails_on_rank_one(
        rank, world_size, approx, FisherType.EMPIRICAL, "directions", kpsvd, "power_svd", 2
    )


def exact_ng_gram_fails_on_rank_one(rank: int, world_size: int) -> dict[str, Any]:
    """Exact natural gradient with its kernel blocks split, rank 1's failing from step 2."""
    from curvlib.linalg.woodbury import FactoredRows

    return _fails_on_rank_one(
        rank, world_size, RecordingExactNG(), FisherType.EMPIRICAL, "directions",
        FactoredRows, "gram", 2,
    )  # fmt: skip


class PoisonedSync(DataParallel):
    """Plants a NaN in one of rank 1's inputs of ``layer`` before its ``at``-th reduction."""

    def __init__(self, layer: str, at: int) -> None:
        super().__init__(split_inverses=True)
        self.layer, self.at, self.calls = layer, at, 0

    def reduce_statistics(self, stats: CurvatureStatistics, **kwargs: Any) -> CurvatureStatistics:
        if self.calls == self.at and self.rank == 1:
            s = stats.layers[self.layer]
            assert s.io is not None
            inputs = s.io.inputs.clone()
            inputs[0, 0, 0] = torch.nan
            layers = dict(stats.layers)
            layers[self.layer] = replace(s, io=PerSampleIO(inputs, s.io.output_grads))
            stats = CurvatureStatistics(layers, stats.fisher_type, stats.num_samples)
        self.calls += 1
        return super().reduce_statistics(stats, **kwargs)


def nonfinite_sample_on_rank_one(rank: int, world_size: int, approx: str, layer: str) -> Any:
    """A split run whose statistics of step 2 hold a NaN in one sample of rank 1's ``layer``."""
    net, loss_fn = model(), nn.MSELoss()
    wrapped = nn.parallel.DistributedDataParallel(net)
    recording = approximation(approx)
    sync = PoisonedSync(layer, at=2)
    opt = PreconditionedOptimizer(
        wrapped, recording, loss_fn=loss_fn, fisher_type=FisherType.EMPIRICAL,
        stats_fraction=1.0, t_cov=1, t_inv=1, damping=1e-3, data_parallel=sync,
    )  # fmt: skip
    messages: list[list[str]] = []
    received: list[int] = []
    for x, y in batches():
        xr, yr = shard(x, rank, world_size), shard(y, rank, world_size)
        messages.append(_step_warnings(opt, wrapped, loss_fn, xr, yr))
        received.append(sync.last_statistics.received)
    return {
        "messages": messages,
        "received": received,
        "skipped": opt.engine.skipped_updates,
        "held": recording.held,
        "fits": recording.fits,
        "approx_state": recording.state_dict(),
        "params": {k: v.detach().clone() for k, v in net.named_parameters()},
    }


def train_defaults(rank: int, world_size: int) -> dict[str, Any]:
    """The library defaults (MC Fisher from half of each batch) with DDP.

    Each rank draws its own MC targets and sub-batch (``seed + rank``): the estimate
    is not one process's, but every rank holds the same one.
    """
    net = model()
    wrapped = nn.parallel.DistributedDataParallel(net)
    loss_fn = nn.MSELoss()
    opt = PreconditionedOptimizer(wrapped, KFAC(), loss_fn=loss_fn, t_cov=2, t_inv=3)
    for x, y in batches():
        opt.zero_grad()
        with opt.record():
            loss_fn(wrapped(shard(x, rank, world_size)), shard(y, rank, world_size)).backward()
        opt.step()
    return {
        "params": {k: v.detach().clone() for k, v in net.named_parameters()},
        "generator": opt.extractor.state_dict()["generators"]["cpu"].clone(),
    }


def _train_preconditioner(
    config: Config, net: nn.Module, wrapped: nn.Module, rank: int, world_size: int
) -> dict[str, Any]:
    loss_fn = nn.MSELoss()
    precond = NaturalGradientPreconditioner(
        wrapped, approximation(config.approx), loss_fn=loss_fn, fisher_type=config.fisher,
        stats_fraction=1.0, t_cov=1, t_inv=2, damping=1e-3, kl_clip=1e-2, lr=0.1,
    )  # fmt: skip
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5)
    for x, y in batches():
        sgd.zero_grad()
        with precond.record():
            loss_fn(wrapped(shard(x, rank, world_size)), shard(y, rank, world_size)).backward()
        precond.step()
        sgd.step()
    sync = precond.engine.sync
    return {
        "params": {k: v.detach().clone() for k, v in net.named_parameters()},
        "names": [layer.name for layer in precond.layers],
        "bytes": None if sync is None else sync.last_statistics.bytes,
        "messages": None if sync is None else sync.last_statistics.messages,
    }


def train_all(rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """Every configuration of ``CONFIGS``, one after the other."""
    out: dict[str, Any] = {c.name: train(c, rank, world_size) for c in CONFIGS}
    out["mc-defaults"] = train_defaults(rank, world_size)
    torch.manual_seed(rank)  # a different initialisation on every rank
    net = nn.Sequential(nn.Linear(DIM_IN, DIM_OUT)).double()
    try:
        PreconditionedOptimizer(net, KFAC(), loss_fn=nn.MSELoss())
    except ValueError as err:
        out["mismatch"] = str(err)
    return out


def fail_on_rank_one(rank: int, world_size: int) -> None:
    """Rank 1 raises at step 2; rank 0 goes on into the statistics all-reduce."""
    train(CONFIGS[0], rank, world_size, fail_at=2)


def hang_on_rank_one(rank: int, world_size: int) -> None:
    """Rank 1 stops calling the optimizer; rank 0 waits in a collective with a timeout."""
    net, loss_fn = model(), nn.MSELoss()
    opt = PreconditionedOptimizer(
        net, KFAC(), loss_fn=loss_fn, fisher_type=FisherType.EMPIRICAL,
        data_parallel=DataParallel(timeout=2.0),
    )  # fmt: skip
    if rank == 1:
        time.sleep(120)
    x, y = batches()[0]
    opt.zero_grad()
    with opt.record():
        loss_fn(net(x), y).backward()
    opt.step()


def statistics_of(x: Tensor, y: Tensor, kinds: set[StatKind]) -> CurvatureStatistics:
    net, loss_fn = model(), nn.MSELoss()
    extractor = CurvatureExtractor(net, loss_fn, stats=kinds, fisher_type=FisherType.EMPIRICAL)
    with extractor.collect():
        loss_fn(net(x), y).backward()
    return extractor.statistics()


def reduce_uneven(rank: int, world_size: int) -> dict[str, Any]:
    """Each rank reduces the statistics of its own, unevenly sized part of one batch.

    Returns the reduced statistics' tensors and those of ``merge_statistics`` over
    every rank's part, computed locally: the rule says they are the same.
    """
    kinds = {StatKind.KRONECKER, StatKind.PER_SAMPLE_IO, StatKind.DIAGONAL}
    x, y = batches()[0]
    sizes = [5, 4, 3][:world_size]
    parts = [
        (x[sum(sizes[:r]) : sum(sizes[: r + 1])], y[sum(sizes[:r]) : sum(sizes[: r + 1])])
        for r in range(world_size)
    ]
    local = [statistics_of(px, py, kinds) for px, py in parts]
    sync = DataParallel(bucket_bytes=256)  # many small buckets
    reduced = sync.reduce_statistics(local[rank])
    expected = merge_statistics(local)
    assert dist.get_world_size() == world_size
    return {
        "reduced": _tensors(reduced),
        "expected": _tensors(expected),
        "num_samples": (reduced.num_samples, expected.num_samples),
        "messages": sync.last_statistics.messages,
    }


def reduce_to_owners(rank: int, world_size: int) -> dict[str, Any]:
    """Uneven parts reduced with layer '0''s per-sample inputs and outputs sent to rank 2 only.

    Layer '2''s per-sample statistics are gathered to every rank (no owner), and
    so are the per-sample gradients of both layers (a kind ``owners`` does not
    apply to); the Kronecker factors are averaged everywhere.
    """
    kinds = {StatKind.KRONECKER, StatKind.PER_SAMPLE_IO, StatKind.PER_SAMPLE_GRAD}
    x, y = batches()[0]
    sizes = [5, 4, 3]
    starts = [0, 5, 9, 12]
    local = [
        statistics_of(x[starts[r] : starts[r + 1]], y[starts[r] : starts[r + 1]], kinds)
        for r in range(world_size)
    ]
    sync = DataParallel(bucket_bytes=256)
    reduced = sync.reduce_statistics(
        local[rank], owners={"0": 2}, kinds=frozenset({StatKind.PER_SAMPLE_IO})
    )
    errors = []
    for owners in ({"hidden": 0}, {"0": world_size}):
        try:
            sync.reduce_statistics(local[rank], owners=owners, kinds={StatKind.PER_SAMPLE_IO})
        except ValueError as err:
            errors.append(str(err))
    assert sum(sizes) == BATCH
    return {
        "reduced": _tensors(reduced),
        "expected": _tensors(merge_statistics(local)),
        "num_samples": reduced.num_samples,
        "finite": reduced.is_finite(),
        "received": sync.last_statistics.received,
        "errors": errors,
    }


def _tensors(stats: CurvatureStatistics) -> dict[str, list[Tensor]]:
    return {name: [t.clone() for t in s.tensors()] for name, s in stats.layers.items()}


def mismatched_statistics(rank: int, world_size: int) -> None:
    """Rank 1 records other statistic kinds than rank 0: the header check refuses."""
    kinds = {StatKind.KRONECKER} if rank == 0 else {StatKind.KRONECKER, StatKind.DIAGONAL}
    x, y = batches()[0]
    DataParallel().reduce_statistics(statistics_of(shard(x, rank, world_size), y[:6], kinds))


def train_from_checkpoint(
    rank: int,
    world_size: int,
    path: str,
    steps: tuple[int, int],
    save: bool,
    name: str = CONFIGS[0].name,
) -> dict[str, Tensor]:
    """Steps ``steps[0]`` to ``steps[1] - 1`` of a configuration (KFAC, EXACT) with DDP.

    Loads the checkpoint at ``path`` first unless training starts at step 0;
    with ``save``, rank 0 alone writes the model and the optimizer there at the end.
    """
    config = next(c for c in CONFIGS if c.name == name)
    net, loss_fn = model(), nn.MSELoss()
    wrapped = nn.parallel.DistributedDataParallel(net) if dist.is_initialized() else net
    extra: dict[str, Any] = {}
    if config.split and dist.is_initialized():
        extra["data_parallel"] = DataParallel(split_inverses=True, broadcast=config.broadcast)
    opt = PreconditionedOptimizer(
        wrapped, approximation(config.approx), loss_fn=loss_fn, fisher_type=config.fisher,
        stats_fraction=1.0, t_cov=1, t_inv=config.t_inv, damping=1e-3, **extra,
    )  # fmt: skip
    if steps[0] > 0:
        state = torch.load(path, weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    for x, y in batches()[steps[0] : steps[1]]:
        opt.zero_grad()
        with opt.record():
            loss_fn(wrapped(shard(x, rank, world_size)), shard(y, rank, world_size)).backward()
        opt.step()
    if save and rank == 0:
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, path)
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def mc_generators_after_resume(rank: int, world_size: int, path: str, save: bool) -> Tensor | None:
    """The MC generator state of each rank after one step, or after loading rank 0's.

    ``None`` for a rank whose generator does not exist yet (it is seeded, with
    ``seed + rank``, at its first draw).
    """
    net, loss_fn = model(), nn.MSELoss()
    wrapped = nn.parallel.DistributedDataParallel(net)
    opt = PreconditionedOptimizer(wrapped, KFAC(), loss_fn=loss_fn)
    if save:
        x, y = batches()[0]
        opt.zero_grad()
        with opt.record():
            loss_fn(wrapped(shard(x, rank, world_size)), shard(y, rank, world_size)).backward()
        opt.step()
        if rank == 0:
            torch.save(opt.state_dict(), path)
    else:
        opt.load_state_dict(torch.load(path, weights_only=True))
    state: Tensor | None = opt.extractor.state_dict()["generators"].get("cpu")
    return state
