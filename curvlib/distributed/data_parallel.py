r"""Data-parallel curvature on ``torch.distributed``: one estimate on every rank.

[`DataParallel`][curvlib.distributed.DataParallel] implements the optimizer's
[`ReplicaSync`][curvlib.core.ReplicaSync] with the collectives of a
``torch.distributed`` process group (gloo on the CPU, NCCL on GPUs); curvlib
has no communication layer of its own. On a statistics step it turns every
rank's statistics into those of the union of the ranks' samples (the rule of
[`curvlib.distributed.statistics`][curvlib.distributed.statistics]), in a
few flat messages:

1. a header of a few integers per rank (all-gather): the sample counts, and
   the check that the ranks agree on the layers and kinds;
2. the means (Kronecker factors, diagonals), weighted by the sample counts
   and all-reduced, in buckets of at most ``bucket_bytes``;
3. the per-sample tensors, if the approximation needs any, all-gathered in
   buckets (padded to the largest rank's count when the counts differ); those
   that only a layer's owner reads (a split update's fit) gathered to the
   owner alone, one gather per owning rank and bucket.

Every rank then folds the same statistics into the same approximation and
builds the same inverse, so with gradients averaged (by DDP, or here for a
model without DDP) every rank takes the same step. A group of one rank
communicates nothing and returns its inputs: the single-process optimizer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from curvlib.core.stats import CurvatureStatistics, StatKind, all_finite, finite_flag
from curvlib.distributed.buckets import DEFAULT_BUCKET_BYTES, pack, plan_buckets, unpack
from curvlib.distributed.ownership import assign_owners
from curvlib.distributed.statistics import SampleTensor, join_statistics, split_statistics

BROADCASTS = ("directions", "inverses")
"""What the owners of a split send (``DataParallel(broadcast=...)``)."""

_HEADER = 4
"""Fixed entries of the statistics header: samples, means, their elements, per-sample tensors."""


@dataclass
class Traffic:
    """Messages and bytes one rank contributed to collectives.

    Attributes:
        messages: Collective calls.
        bytes: The sizes of the buffers this rank put in (for an all-gather,
            each other rank receives that many bytes from it).
        received: The bytes of the other ranks' buffers the collectives
            delivered to this rank: $W - 1$ buffers for an all-gather, and
            for a gather on its destination rank; one for a broadcast from
            another rank; one for an all-reduce (the result, whatever the
            algorithm moves on the wire); none for a gather to another rank or
            a broadcast from this one.
        seconds: Wall time spent in them, waiting for the other ranks included.
    """

    messages: int = 0
    bytes: int = 0
    received: int = 0
    seconds: float = 0.0

    def add(self, buffer: Tensor, seconds: float, received: int = 0) -> None:
        """Count one collective on ``buffer``: ``seconds`` long, ``received`` bytes delivered."""
        self.messages += 1
        self.bytes += _nbytes(buffer)
        self.received += received
        self.seconds += seconds


class DataParallel:
    r"""Averages curvature statistics (and, without DDP, gradients) over a process group.

    ```python
    # under torchrun, after torch.distributed.init_process_group("gloo")
    ddp = DistributedDataParallel(model)
    opt = PreconditionedOptimizer(ddp, KFAC(), loss_fn=loss_fn)  # DataParallel(ddp.process_group)
    ```

    [`PreconditionedOptimizer`][curvlib.PreconditionedOptimizer] and
    [`NaturalGradientPreconditioner`][curvlib.NaturalGradientPreconditioner]
    build one by themselves for a DDP model, or for any model inside a process
    group of several ranks (``data_parallel=None``); pass one to choose the
    group or the options, or ``data_parallel=False`` to train an independent
    model on every rank. See [Distributed training](../distributed.md).

    Args:
        group: The process group (default: the default group).
        average_gradients: Whether ``sync_gradients`` averages the gradients
            over the ranks; ``None``: decided by the optimizer, ``False`` for a
            ``DistributedDataParallel`` model (DDP averages them in the
            backward pass) and ``True`` for any other model.
        bucket_bytes: Largest flat message.
        timeout: How long one of curvlib's collectives may wait for the other
            ranks before it fails (default: the process group's own timeout).
        split_inverses: Whether each layer's inverse is built by one rank
            only, which preconditions its gradient and broadcasts the direction
            ([`curvlib.distributed.ownership`][curvlib.distributed.ownership]):
            the inverse work is split over the ranks, for one broadcast of the
            preconditioned gradient per step. For approximations whose blocks
            invert one by one (KFAC, KPSVD, Deflation, Lanczos, KFAC-corrected,
            the diagonal, block natural gradient, unit-wise); the others invert
            on every rank. Exact and block-tridiagonal natural gradient split
            their kernel blocks instead: each owner computes its layers' and
            broadcasts them once per rebuild, and every rank builds the inverse
            from all of them. The owners balance each approximation's
            ``work_cost`` per layer. EKFAC, whose expensive part is its
            eigenbasis, splits the refresh instead: each owner eigendecomposes
            its layers' factors (the first ones too) and broadcasts the
            eigenbases, and every rank adopts all of them; on every statistics
            step the owners also compute and broadcast their layers' new
            scalings (its cheap inverse is built on every rank).
            KPSVD, Deflation, Lanczos and KFAC-corrected also split their fits
            to each batch: each owner fits its layers' factors and broadcasts
            them, and every rank folds all of them into its running averages.
            Where only the owner reads a layer's per-sample statistics (these
            fits, EKFAC's scalings), they are gathered to the owner alone.
        broadcast: What the owners of a split send: ``"directions"`` (default),
            each layer's preconditioned gradient on every step, so that each
            rank applies only its own layers' inverses; or ``"inverses"``, each
            layer's damped inverse once per rebuild, so that every rank applies
            every layer's inverse itself and no step sends anything (KAISA's
            gradient-worker fraction of 1). ``"inverses"`` needs an
            approximation whose inverses can be sent (KFAC, KPSVD, Deflation,
            Lanczos, KFAC-corrected); see
            [Distributed training](../distributed.md) for when each wins.
            Approximations whose split is not by inverse (EKFAC's refresh, the
            fits of the rearranged methods, exact natural gradient's kernel
            blocks) split the same way with either.

    Attributes:
        world_size: The number of ranks in ``group``.
        traffic: Messages and bytes this rank put into curvlib's collectives so far.
        last_statistics: Those of the last ``reduce_statistics`` (zero for one rank).
        last_shared: Those of the last ``share_directions`` (preconditioned
            gradients, the eigenbases of a split refresh, or the fitted parts
            of a split update).

    Raises:
        RuntimeError: Without an initialised process group.
        ValueError: For a ``bucket_bytes`` that is not positive.
    """

    def __init__(
        self,
        group: Any = None,
        *,
        average_gradients: bool | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        timeout: timedelta | float | None = None,
        split_inverses: bool = False,
        broadcast: str = "directions",
    ) -> None:
        _require_group()
        if broadcast not in BROADCASTS:
            raise ValueError(f"broadcast must be one of {BROADCASTS}, got {broadcast!r}.")
        if broadcast == "inverses" and not split_inverses:
            raise ValueError(
                "broadcast='inverses' sends the inverses of a split: pass split_inverses=True."
            )
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}.")
        self.group = group
        self.average_gradients = average_gradients
        self.split_inverses = split_inverses
        self.broadcast = broadcast
        self.bucket_bytes = bucket_bytes
        self.timeout = timedelta(seconds=timeout) if isinstance(timeout, int | float) else timeout
        self._rank: int = dist.get_rank(group)
        self.world_size: int = dist.get_world_size(group)
        backend = str(dist.get_backend(group))
        self._device: torch.device | None = (
            torch.device("cuda", torch.cuda.current_device())
            if backend == "nccl"
            else torch.device("cpu")
            if backend == "gloo"
            else None
        )
        self.traffic = Traffic()
        self.last_statistics = Traffic()
        self.last_shared = Traffic()

    def __repr__(self) -> str:
        return (
            f"DataParallel(rank={self.rank}, world_size={self.world_size}, "
            f"average_gradients={self.average_gradients}, split_inverses={self.split_inverses}, "
            f"broadcast={self.broadcast!r})"
        )

    @property
    def rank(self) -> int:
        """This process's rank in ``group``."""
        return self._rank

    # -- statistics -----------------------------------------------------------------

    def reduce_statistics(
        self,
        stats: CurvatureStatistics,
        *,
        owners: Mapping[str, int] | None = None,
        kinds: Collection[StatKind] = (),
    ) -> CurvatureStatistics:
        r"""The statistics of the union of every rank's samples, on every rank.

        Means are averaged with weights $n_r / \sum_r n_r$; per-sample tensors
        are gathered in rank order
        ([`curvlib.distributed.statistics`][curvlib.distributed.statistics]).
        ``num_samples`` becomes $\sum_r n_r$.

        Args:
            stats: This rank's statistics.
            owners: For the layers whose per-sample statistics only one rank
                reads (the owner of a split update), that rank: their tensors
                of ``kinds`` are gathered to it alone, one gather per owner and
                bucket, and every other rank holds them with no samples (empty
                along the sample axis). Every other per-sample tensor is
                gathered to every rank. ``None``: all to every rank.
            kinds: The per-sample kinds that ``owners`` applies to.

        Whether the statistics are finite is decided alike on every rank: with
        ``owners``, the header carries each rank's answer for its per-sample
        tensors, and a step on which any rank holds a non-finite sample is
        gathered to every rank, as without ``owners``, so that every rank
        refuses it and names the same layers.

        Raises:
            RuntimeError: If the ranks' statistics have other layers or kinds, or
                a collective fails (another rank failed, or stopped calling).
            ValueError: If ``owners`` names a layer ``stats`` lacks or a rank
                outside the group.
        """
        if self.world_size == 1:
            return stats
        traffic = Traffic()
        means, samples = split_statistics(stats)
        targets = self._targets(stats, samples, owners, kinds)
        routed = any(t is not None for t in targets)
        header = torch.tensor(
            [
                stats.num_samples, len(means), sum(t.numel() for t in means), len(samples),
                *(s.count for s in samples),
            ],
            dtype=torch.int64,
        )  # fmt: skip
        if routed:
            header = torch.cat([header, _finite_flags(samples)])
        table = torch.stack(self._all_gather(header, "the statistics header", traffic))
        if not bool((table[:, 1:_HEADER] == table[0, 1:_HEADER]).all()):
            raise RuntimeError(
                "curvlib: the ranks recorded different curvature statistics (other layers, "
                f"kinds or shapes; per rank [samples, factors, elements, per-sample]: "
                f"{table[:, :_HEADER].tolist()}). Every rank must build the optimizer with the "
                "same model, approximation and settings."
            )
        counts = table[:, _HEADER : _HEADER + len(samples)]
        finite = not routed or bool(table[:, _HEADER + len(samples) :].all())
        if not finite:  # refused on every rank alike, from the same samples
            targets = [None] * len(samples)
        total = int(table[:, 0].sum())
        weight = stats.num_samples / total
        reduced = self._all_reduce_sum(
            [t * weight for t in means], "the curvature statistics", traffic
        )
        gathered = self._route_samples(samples, counts, targets, traffic)
        self.last_statistics = traffic
        joined = join_statistics(stats, reduced, gathered, total)
        if routed and finite:
            # The samples are known finite on every rank; the means are the same everywhere.
            joined.known_finite(all_finite(reduced))
        return joined

    def _targets(
        self,
        stats: CurvatureStatistics,
        samples: Sequence[SampleTensor],
        owners: Mapping[str, int] | None,
        kinds: Collection[StatKind],
    ) -> list[int | None]:
        """The rank each per-sample tensor is gathered to, ``None`` for every rank."""
        if owners is None:
            return [None] * len(samples)
        unknown = sorted(set(owners) - set(stats.layers))
        if unknown:
            raise ValueError(f"owners names layers without statistics: {unknown}.")
        outside = {n: r for n, r in owners.items() if not 0 <= r < self.world_size}
        if outside:
            raise ValueError(
                f"owners names ranks outside the group of {self.world_size}: {outside}."
            )
        return [owners.get(s.layer) if s.kind in kinds else None for s in samples]

    def _route_samples(
        self,
        samples: Sequence[SampleTensor],
        counts: Tensor,
        targets: Sequence[int | None],
        traffic: Traffic,
    ) -> list[Tensor]:
        """Every per-sample tensor gathered to its target: every rank first, then each owner."""
        out: list[Tensor] = [s.tensor for s in samples]
        for target in [None, *range(self.world_size)]:
            chosen = [i for i, t in enumerate(targets) if t == target]
            if not chosen:
                continue
            got = self._gather_samples(
                [samples[i] for i in chosen], counts[:, chosen], traffic, target
            )
            for i, tensor in zip(chosen, got, strict=True):
                out[i] = tensor
        return out

    def _gather_samples(
        self,
        samples: Sequence[SampleTensor],
        counts: Tensor,
        traffic: Traffic,
        dst: int | None = None,
    ) -> list[Tensor]:
        """Each per-sample tensor of every rank, concatenated in rank order.

        On every rank (all-gather), or with ``dst`` on that rank only (gather);
        the other ranks then get each tensor with no samples.
        """
        largest = counts.max(0).values.tolist()
        padded = [_pad(s.tensor, s.axis, n) for s, n in zip(samples, largest, strict=True)]
        per_rank: list[list[Tensor]] = [[] for _ in range(self.world_size)]
        shapes = [t.shape for t in padded]
        order: list[int] = []
        what = "the per-sample statistics"
        for bucket in plan_buckets(padded, self.bucket_bytes):
            flat = pack(padded, bucket)
            parts = (
                self._all_gather(flat, what, traffic)
                if dst is None
                else self._gather(flat, dst, what, traffic)
            )
            order += bucket.indices
            for r, part in enumerate(parts):
                per_rank[r] += unpack(part, [shapes[i] for i in bucket.indices])
        if dst is not None and dst != self.rank:
            return [s.tensor.narrow(s.axis, 0, 0) for s in samples]
        out: list[Tensor] = [samples[0].tensor] * len(samples)
        for position, i in enumerate(order):
            axis = samples[i].axis
            pieces = [
                per_rank[r][position].narrow(axis, 0, int(counts[r, i]))
                for r in range(self.world_size)
            ]
            out[i] = torch.cat(pieces, dim=axis)
        return out

    # -- gradients and scalars --------------------------------------------------------

    def sync_gradients(self, params: Sequence[Tensor]) -> None:
        """Average the ``.grad`` of ``params`` over the ranks, in place.

        A no-op when ``average_gradients`` is not ``True`` (DDP averaged them)
        or the group has one rank. Parameters without a gradient are left out:
        every rank must have gradients for the same parameters.
        """
        if self.average_gradients is not True or self.world_size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        summed = self._all_reduce_sum(grads, "the gradient average", Traffic())
        for grad, total in zip(grads, summed, strict=True):
            grad.copy_(total.div_(self.world_size))

    def mean(self, value: Tensor) -> Tensor:
        """The mean of ``value`` over the ranks (a new tensor; ``value`` is untouched)."""
        if self.world_size == 1:
            return value
        (total,) = self._all_reduce_sum([value.detach()], "an average over the ranks", Traffic())
        return total.div_(self.world_size)

    # -- inverses split over the ranks ---------------------------------------------------

    def inverse_owners(self, costs: Mapping[str, float]) -> dict[str, int] | None:
        """The owner of each layer's inverse (greedy by cost), or ``None`` when not split.

        ``None`` unless ``split_inverses`` and the group has several ranks.
        """
        if not self.split_inverses or self.world_size == 1:
            return None
        return assign_owners(costs, self.world_size)

    def share_directions(
        self, owned: Mapping[str, Tensor], owners: Mapping[str, int], like: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Every layer's direction on every rank: one broadcast per owning rank.

        Directions travel in the dtype of ``like`` (the gradients), which every
        rank knows; the owner keeps the same rounded values as the others. The
        same broadcast carries the eigenbases of a split EKFAC refresh (``like``:
        the empty parts of ``EKFAC.refresh_due()``) and the fitted parts of a
        split update (``like``: those of ``update_due(stats)``).
        """
        out: dict[str, Tensor] = {}
        traffic = Traffic()
        for r in range(self.world_size):
            names = [name for name in like if owners[name] == r]
            if not names:
                continue
            if r == self.rank:
                mine = [owned[name].to(like[name].dtype) for name in names]
            else:
                mine = [torch.empty_like(like[name]) for name in names]
            for bucket in plan_buckets(mine, self.bucket_bytes):
                flat = pack(mine, bucket)
                home = flat.device
                flat = flat.to(self._device) if self._device is not None else flat
                src = r if self.group is None else dist.get_global_rank(self.group, r)
                start = partial(dist.broadcast, flat, src=src, group=self.group, async_op=True)
                self._collective(
                    start, "the owners' broadcast of directions or eigenbases", flat, traffic,
                    received=0 if r == self.rank else _nbytes(flat),
                )  # fmt: skip
                pieces = unpack(flat.to(home), [mine[i].shape for i in bucket.indices])
                for i, piece in zip(bucket.indices, pieces, strict=True):
                    out[names[i]] = piece
        self.last_shared = traffic
        return {name: out[name] for name in like}

    # -- replicas ---------------------------------------------------------------------

    def check_replicas(self, named_params: Sequence[tuple[str, Tensor]]) -> None:
        """Raise unless every rank holds the same parameter values.

        One all-reduce of two numbers per parameter (its sum and sum of squares
        in float64), compared as maximum and minimum over the ranks.

        Raises:
            ValueError: Naming the parameters that differ between ranks.
        """
        if self.world_size == 1 or not named_params:
            return
        prints = torch.stack(
            [
                value
                for _, p in named_params
                for value in (p.detach().double().sum(), p.detach().double().square().sum())
            ]
        ).cpu()
        both = torch.cat([prints, -prints])
        device = self._device or named_params[0][1].device
        buffer = both.to(device)
        start = partial(
            dist.all_reduce, buffer, op=dist.ReduceOp.MAX, group=self.group, async_op=True
        )
        self._collective(
            start, "the check that the ranks hold the same parameters", buffer, Traffic(),
            received=_nbytes(buffer),
        )  # fmt: skip
        buffer = buffer.cpu()
        n = len(prints)
        differ = (buffer[:n] != -buffer[n:]).view(-1, 2).any(1)
        names = [name for (name, _), bad in zip(named_params, differ.tolist(), strict=True) if bad]
        if names:
            raise ValueError(
                f"The parameters {names[:5]}{' ...' if len(names) > 5 else ''} differ between "
                "the ranks, so data-parallel training would average gradients of different "
                "models. Seed the model's initialisation identically on every rank, load the "
                "same weights, or wrap it in DistributedDataParallel (which broadcasts rank 0's); "
                "pass data_parallel=False to train an independent model on every rank."
            )

    # -- collectives --------------------------------------------------------------------

    def _all_reduce_sum(
        self, tensors: Sequence[Tensor], what: str, traffic: Traffic
    ) -> list[Tensor]:
        """Sums over the ranks of ``tensors`` (new tensors), in flat buckets."""
        out: list[Tensor] = list(tensors)
        for bucket in plan_buckets(tensors, self.bucket_bytes):
            flat = pack(tensors, bucket)
            home = flat.device
            flat = flat.to(self._device) if self._device is not None else flat
            start = partial(dist.all_reduce, flat, group=self.group, async_op=True)
            self._collective(start, what, flat, traffic, received=_nbytes(flat))
            pieces = unpack(flat.to(home), [tensors[i].shape for i in bucket.indices])
            for i, piece in zip(bucket.indices, pieces, strict=True):
                out[i] = piece
        return out

    def _all_gather(self, tensor: Tensor, what: str, traffic: Traffic) -> list[Tensor]:
        """``tensor`` of every rank, in rank order."""
        home = tensor.device
        local = tensor.to(self._device) if self._device is not None else tensor
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        start = partial(dist.all_gather, parts, local, group=self.group, async_op=True)
        received = (self.world_size - 1) * _nbytes(local)
        self._collective(start, what, local, traffic, received=received)
        return [p.to(home) for p in parts]

    def _gather(self, tensor: Tensor, dst: int, what: str, traffic: Traffic) -> list[Tensor]:
        """``tensor`` of every rank, in rank order, on rank ``dst``; an empty list elsewhere."""
        home = tensor.device
        local = tensor.to(self._device) if self._device is not None else tensor
        mine = dst == self.rank
        parts = [torch.empty_like(local) for _ in range(self.world_size)] if mine else None
        root = dst if self.group is None else dist.get_global_rank(self.group, dst)
        start = partial(dist.gather, local, parts, dst=root, group=self.group, async_op=True)
        received = (self.world_size - 1) * _nbytes(local) if mine else 0
        self._collective(start, what, local, traffic, received=received)
        return [p.to(home) for p in parts] if parts is not None else []

    def _collective(
        self,
        start: Callable[[], Any],
        what: str,
        buffer: Tensor,
        traffic: Traffic,
        *,
        received: int,
    ) -> None:
        """Run one collective, count it, and turn a failure into an error that says what failed.

        ``received``: the bytes of other ranks' buffers it delivers here (``Traffic.received``).
        """
        began = time.perf_counter()
        try:
            work = start()
            if self.timeout is None:
                work.wait()
            elif not work.wait(self.timeout):
                raise RuntimeError(f"no answer within {self.timeout.total_seconds():g} s")
        except RuntimeError as err:
            raise RuntimeError(
                f"curvlib: {what} failed on rank {self.rank} of {self.world_size} ({err}). "
                "Another rank has probably failed (its own error says why) or stopped "
                "calling the optimizer; every rank must run the same steps."
            ) from err
        seconds = time.perf_counter() - began
        traffic.add(buffer, seconds, received)
        self.traffic.add(buffer, seconds, received)


def _in_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def _require_group() -> None:
    if not _in_group():
        raise RuntimeError(
            "Data-parallel training needs a torch.distributed process group: call "
            "torch.distributed.init_process_group(...) first (torchrun provides the "
            "environment), or train in a single process without data_parallel=True."
        )


def _finite_flags(samples: Sequence[SampleTensor]) -> Tensor:
    """1 for each tensor of ``samples`` free of NaN and Inf, else 0; one host read."""
    device = samples[0].tensor.device
    true = torch.ones((), dtype=torch.bool, device=device)
    flags = [finite_flag([s.tensor]) for s in samples]
    stacked = torch.stack([true if f is None else f.to(device) for f in flags])
    return stacked.to(torch.int64).cpu()


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _pad(tensor: Tensor, axis: int, size: int) -> Tensor:
    """``tensor`` with zeros appended along ``axis`` up to ``size`` entries."""
    missing = size - tensor.shape[axis]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=axis)


def unwrap(model: nn.Module) -> tuple[nn.Module, Any]:
    """The module inside a ``DistributedDataParallel`` wrapper and its process group.

    Returns:
        ``(model.module, model.process_group)`` for a DDP model, else
        ``(model, None)``.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        inner: nn.Module = model.module
        return inner, model.process_group
    return model, None


def data_parallel_for(
    model: nn.Module, data_parallel: DataParallel | bool | None
) -> tuple[nn.Module, DataParallel | None]:
    """The module curvlib works on and the synchronisation its optimizer uses.

    Args:
        model: The model as given to the optimizer, DDP-wrapped or not.
        data_parallel: ``None`` (the default): a ``DataParallel`` on DDP's group
            for a DDP model, on the default group for any model inside an
            initialised process group, else none. ``True``: the same, but an
            error without a process group. ``False``: none (an error for a DDP
            model, whose ranks would diverge). A ``DataParallel``: that one.

    Returns:
        The unwrapped module (layer names without DDP's ``module.`` prefix, so
        checkpoints load with or without DDP) and the synchronisation, with
        ``average_gradients`` decided: ``False`` under DDP, else ``True``. For
        a model whose gradients curvlib averages, the ranks' parameters are
        checked to be equal (one small all-reduce).

    Raises:
        ValueError: For ``data_parallel=False`` with a DDP model, or parameters
            that differ between the ranks.
        RuntimeError: For ``data_parallel=True`` without a process group.
        TypeError: For any other ``data_parallel``.
    """
    inner, group = unwrap(model)
    ddp = inner is not model
    if data_parallel is False:
        if ddp:
            raise ValueError(
                "data_parallel=False with a DistributedDataParallel model: DDP averages the "
                "gradients, but every rank would precondition them with the curvature of its "
                "own samples, and the replicas would drift apart. Leave data_parallel=None."
            )
        return inner, None
    if data_parallel is None or data_parallel is True:
        if not ddp and not _in_group():
            if data_parallel is True:
                _require_group()
            return inner, None
        sync = DataParallel(group)
    elif isinstance(data_parallel, DataParallel):
        sync = data_parallel
    else:
        raise TypeError(
            "data_parallel must be None, True, False or a curvlib.distributed.DataParallel, "
            f"got {data_parallel!r}."
        )
    if sync.average_gradients is None:
        sync.average_gradients = not ddp
    if sync.average_gradients:
        sync.check_replicas(list(inner.named_parameters()))
    return inner, sync
