"""Counting the host reads of device numbers: the synchronisations of a GPU step.

On a GPU every read of a device number on the host (``.item()``, ``float()``,
``bool()``, ``.tolist()``, ``.cpu()``, ``nonzero``) waits until the device has
finished all queued work. [`host_reads`][curvlib.optim.syncs.host_reads] counts
them on any device, the CPU included, where they cost nothing but happen alike:
a dispatch mode sees ``aten._local_scalar_dense`` and ``aten.nonzero``, and
``Tensor.tolist`` and ``Tensor.cpu`` (which need not dispatch) are wrapped while
the block runs. On CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` reports the
same reads as warnings. What only the CPU path reads, through NumPy on a tensor's
own memory (the dead coordinates that
[`cpu_live_coordinates`][curvlib.linalg.factors.cpu_live_coordinates] finds for the
factorisations), is not counted: a GPU step makes no such read.

Example:
    ```python
    from curvlib.optim.syncs import host_reads

    with host_reads() as reads:
        opt.step()
    print(reads.count)
    ```
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostReads", "host_reads"]

_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}


class HostReads(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """The counter [`host_reads`][curvlib.optim.syncs.host_reads] yields.

    Attributes:
        count: The host reads seen so far.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def host_reads() -> Iterator[HostReads]:
    """Count the host reads of device numbers in the block (see the module docstring).

    Not reentrant, and not thread-safe: ``Tensor.tolist`` and ``Tensor.cpu`` are
    replaced process-wide while the block runs.
    """
    reads = HostReads()
    tolist, cpu = torch.Tensor.tolist, torch.Tensor.cpu

    def counted(method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            reads.count += 1
            return method(self, *args, **kwargs)

        return wrapper

    torch.Tensor.tolist = counted(tolist)  # type: ignore[method-assign]
    torch.Tensor.cpu = counted(cpu)  # type: ignore[method-assign]
    try:
        with reads:
            yield reads
    finally:
        torch.Tensor.tolist, torch.Tensor.cpu = tolist, cpu  # type: ignore[method-assign]
