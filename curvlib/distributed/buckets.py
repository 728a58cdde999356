r"""Flat messages: many tensors packed into a few contiguous buffers, and back.

A collective per tensor pays the latency of the network once per layer and
factor; packing them into buckets of at most ``bucket_bytes`` (one dtype and
device per bucket) pays it a few times per step, as DDP does for gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_BUCKET_BYTES = 32 * 2**20
"""Largest flat message, in bytes (a single tensor above it travels alone)."""


@dataclass(frozen=True)
class Bucket:
    """Which tensors one flat message carries.

    Attributes:
        indices: Positions of the tensors in the packed sequence, in order.
        dtype: Their common dtype.
        device: Their common device.
    """

    indices: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def plan_buckets(tensors: Sequence[Tensor], bucket_bytes: int) -> list[Bucket]:
    """Group ``tensors`` by dtype and device, in order, into buckets of at most ``bucket_bytes``.

    Every rank that plans the same shapes gets the same buckets.
    """
    open_: dict[tuple[torch.dtype, torch.device], tuple[list[int], int]] = {}
    done: list[Bucket] = []
    for i, t in enumerate(tensors):
        key = (t.dtype, t.device)
        size = t.numel() * t.element_size()
        indices, used = open_.get(key, ([], 0))
        if indices and used + size > bucket_bytes:
            done.append(Bucket(tuple(indices), *key))
            indices, used = [], 0
        indices.append(i)
        open_[key] = (indices, used + size)
    done += [Bucket(tuple(idx), *key) for key, (idx, _) in open_.items() if idx]
    return sorted(done, key=lambda b: b.indices[0])


def pack(tensors: Sequence[Tensor], bucket: Bucket) -> Tensor:
    """The tensors of ``bucket``, flattened and concatenated into one new buffer."""
    return torch.cat([tensors[i].reshape(-1) for i in bucket.indices])


def unpack(flat: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Views of ``flat`` with the given shapes, in order (the inverse of ``pack``)."""
    out: list[Tensor] = []
    start = 0
    for shape in shapes:
        size = int(torch.Size(shape).numel())
        out.append(flat[start : start + size].view(shape))
        start += size
    return out
