"""``torchrun`` support of the examples: the process group, the shards and rank 0's outputs.

Every example that trains through ``run_experiment`` runs data-parallel when
started by ``torchrun``::

    torchrun --nproc_per_node=2 examples/autoencoder.py --num-epochs 5
    torchrun --nproc_per_node=4 examples/cnn.py --device cuda   # NCCL, one GPU per rank

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and the
rendezvous address); ``process_group`` reads them, joins the process group
(gloo on the CPU, NCCL for ``--device cuda``, rank ``r`` on GPU ``LOCAL_RANK``)
and leaves it when training ends. Every rank loads the same data, builds the
same model from ``--seed`` and draws the same batch order; rank ``r`` trains on
the ``r``-th of ``WORLD_SIZE`` equal parts of every batch, the model is wrapped
in ``DistributedDataParallel`` (which averages the gradients) and curvlib's
optimizers average the curvature statistics over the ranks
(``curvlib.distributed``). The steps are then those of one process on the
whole batch: exactly so (up to the order of floating-point sums) for EMPIRICAL
or EXACT statistics of the whole shard (``--fisher empirical --stats-fraction
1``); the MC Fisher and sub-batches draw on every rank with its own seed.
Losses and accuracies are averaged over the ranks, so every rank holds the
same metrics, and rank 0 alone writes files, prints and shows a progress bar.
Without ``torchrun`` (or inside a process group the caller created, which is
used and left alone) nothing changes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""What ``torchrun`` sets for every process (with ``MASTER_ADDR`` and ``MASTER_PORT``)."""


_CPU = torch.device("cpu")


class LaunchError(ValueError):
    """``torchrun`` asked for something this machine cannot do (reported like a bad flag)."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a data-parallel run.

    Attributes:
        rank: This process's rank (0 writes the outputs).
        size: The number of ranks (1: a single process, nothing is communicated).
        device: Where the collectives' tensors live (CUDA for NCCL, else the CPU).
    """

    rank: int = 0
    size: int = 1
    device: torch.device = _CPU

    @property
    def main(self) -> bool:
        """Whether this rank writes the outputs and prints (rank 0)."""
        return self.rank == 0

    def shard(self, t: Tensor) -> Tensor:
        """This rank's part of ``t`` along its first axis (contiguous, sizes differ by <= 1)."""
        return t if self.size == 1 else t.tensor_split(self.size)[self.rank]

    def sum(self, values: Sequence[float]) -> list[float]:
        """The sums over the ranks of ``values`` (one all-reduce, in float64)."""
        if self.size == 1:
            return list(values)
        buffer = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(buffer)
        return buffer.tolist()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks."""
        return self.sum([value])[0] / self.size

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in ``DistributedDataParallel`` (which averages the gradients), or itself.

        The model must already be on its device, the same on every rank.
        """
        if self.size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def share_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm's running statistics).

        Each rank updates its running statistics from its own shard; the
        evaluation and the checkpoint use rank 0's, as DDP's next forward would.
        """
        if self.size == 1:
            return
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)

    def log(self, text: str) -> None:
        """Print ``text`` on rank 0 (through tqdm, so that a progress bar stays intact)."""
        if self.main:
            tqdm.write(text)


SINGLE = World()
"""The world of a single process."""


def launched() -> bool:
    """Whether ``torchrun`` (or another launcher) started this process as one of several ranks."""
    return all(name in os.environ for name in ENVIRONMENT)


def main_process() -> bool:
    """Whether this process is rank 0 (or alone): the one that prints and writes."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return not launched() or int(os.environ["RANK"]) == 0


def log(text: str) -> None:
    """``print`` on rank 0 only; usable before the process group exists."""
    if main_process():
        print(text)


def refuse_ranks(parser: argparse.ArgumentParser) -> None:
    """Stop a script with its own training loop that ``torchrun`` started on several ranks.

    Such a script would train the same model independently on every rank and
    every rank would write the same files; the data-parallel examples are those
    that train through ``run_experiment``.
    """
    if launched() and int(os.environ["WORLD_SIZE"]) > 1:
        parser.exit(
            2,
            f"{parser.prog}: error: this example trains in one process: run it with python, "
            "not torchrun (autoencoder.py, cnn.py and conv_autoencoder.py run data-parallel "
            "under torchrun).\n",
        )


def local_device(device: torch.device) -> torch.device:
    """``device``, on CUDA this process's GPU: ``cuda:LOCAL_RANK`` under ``torchrun``.

    Raises:
        LaunchError: If this machine has fewer GPUs than ``torchrun`` started ranks on it.
    """
    if device.type != "cuda" or not launched() or device.index is not None:
        return device
    local = int(os.environ["LOCAL_RANK"])
    count = torch.cuda.device_count()
    if local >= count:
        raise LaunchError(
            f"torchrun started local rank {local}, but this machine has {count} GPU"
            f"{'s' if count != 1 else ''}: start at most {count} processes per node "
            "(--nproc_per_node), or train on the CPU with --device cpu (gloo)."
        )
    return torch.device("cuda", local)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """This process's ``World``, in the process group of a ``torchrun`` job for the block.

    Under ``torchrun``: joins the group (NCCL for a CUDA ``device``, gloo
    otherwise; rendezvous from the environment) and destroys it when the block
    ends, also on an error; where the block ends normally, the ranks meet at a
    barrier first. A group that already exists is used as it is and left alone.
    Without either: a single process.

    Args:
        device: Where the model trains (``local_device`` of ``--device``).
    """
    if dist.is_available() and dist.is_initialized():
        yield _world(device)
        return
    if not launched():
        yield SINGLE
        return
    if not dist.is_available():
        raise LaunchError("torchrun: this torch build has no torch.distributed.")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield _world(device)
        # Every rank through its last collective before any rank tears its group down:
        # a rank that destroys its group while another's last messages are in flight can
        # abort that rank ("terminate called without an active exception", with gloo).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _world(device: torch.device) -> World:
    nccl = str(dist.get_backend()) == "nccl"
    comm = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return World(dist.get_rank(), dist.get_world_size(), comm)


__all__ = [
    "ENVIRONMENT",
    "SINGLE",
    "LaunchError",
    "World",
    "launched",
    "local_device",
    "log",
    "main_process",
    "process_group",
    "refuse_ranks",
]
