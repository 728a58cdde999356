r"""Inverses built in the background while training goes on (``overlap_inverse``).

With ``overlap_inverse = L > 0`` a rebuild of the
[`CurvatureEngine`][curvlib.optim.engine.CurvatureEngine] starts the new
inverse from a frozen copy of the estimate
([`LayerwiseApprox.frozen`][curvlib.approx.base.LayerwiseApprox.frozen]: the
blocks' tensors are shared, not copied) and training goes on with the live
inverse; the new one replaces it $L$ steps later, or at the next rebuild if that
comes first. With $L \ge$ ``t_inv`` the inverses are stale by one rebuild, as
distributed K-FAC uses them. On a GPU the factorisations are queued on a second
CUDA stream, which runs them beside the next steps' forward and backward passes
(the inverse is built ahead of its checks, so queuing it never waits for the
device); elsewhere one background thread builds them. Which inverse a step uses
depends only on the schedule, never on timing: a run is as reproducible as one
without the overlap. The first inverse and the warm-up's are built at once
(early curvature goes stale fastest). It needs an approximation that builds its
inverse from a frozen copy of its estimate, not a two-time-scale one, in a
single process ([`check_overlap`][curvlib.optim.overlap.check_overlap]).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from curvlib.core.protocols import CurvatureApprox, RefreshableApprox, ReplicaSync

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The one background thread that builds overlapped inverses off a GPU."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="curvlib-inverse")
        return _POOL


def check_overlap(overlap: Any, approx: CurvatureApprox, sync: ReplicaSync | None) -> None:
    """Check ``overlap_inverse`` against the approximation and the training setup.

    Raises:
        TypeError: If ``overlap`` is not an int.
        ValueError: If it is negative, or positive for an approximation whose inverse cannot be
            built from a frozen copy of its estimate, for a two-time-scale one,
            or in data-parallel training.
    """
    if isinstance(overlap, bool) or not isinstance(overlap, int):
        raise TypeError(
            f"overlap_inverse must be a number of steps (an int), got {overlap!r}; e.g. 3, or "
            "t_inv for inverses stale by one rebuild."
        )
    if overlap < 0:
        raise ValueError(f"overlap_inverse must be >= 0 steps, got {overlap}.")
    if not overlap:
        return
    name = type(approx).__name__
    if not callable(getattr(approx, "frozen", None)):
        raise ValueError(
            f"overlap_inverse builds the inverse from a frozen copy of the estimate, "
            f"which {name} does not offer; the layer-wise approximations do (KFAC, KPSVD, "
            "the diagonal, ...)."
        )
    if isinstance(approx, RefreshableApprox):
        raise ValueError(
            f"overlap_inverse is for approximations rebuilt every t_inv steps; {name} "
            "rebuilds its cheap inverse after every update (its expensive part is the refresh)."
        )
    if sync is not None:
        raise ValueError(
            "overlap_inverse is for a single process; in data-parallel training the "
            "inverse work is split over the ranks instead (DataParallel(split_inverses=True))."
        )


@dataclass
class InverseBuild:
    """An inverse started at step ``step`` from ``source``, with ``damping``.

    Attributes:
        source: The frozen estimate it is built from (its ``state_dict`` goes
            into checkpoints, so that a resumed run builds the same inverse).
        damping: The damping it is built with.
        step: The step that started it.
    """

    source: Any
    damping: float
    step: int
    _future: Future[Any] | None = None
    _value: Any = None
    _stream: Any = None
    _error: Exception | None = None

    @classmethod
    def start(cls, approx: Any, damping: float, step: int, device: torch.device) -> InverseBuild:
        """Start building the inverse of ``approx``'s estimate (on ``device``) as it is now."""
        source = approx.frozen()
        build = _builder(source, damping)
        if device.type == "cuda":
            stream = _side_stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))  # the estimate is ready
            try:
                with torch.cuda.stream(stream):
                    value = build()
            except (RuntimeError, ValueError) as err:  # raised where the thread's would be
                return cls(source, damping, step, _stream=stream, _error=err)
            return cls(source, damping, step, _value=value, _stream=stream)
        return cls(source, damping, step, _future=_pool().submit(build))

    @classmethod
    def ready(cls, source: Any, damping: float, step: int, value: Any) -> InverseBuild:
        """A build that has finished (a checkpoint's, rebuilt when it is loaded)."""
        return cls(source, damping, step, _value=value)

    def result(self) -> Any:
        """The preconditioner (or one built ahead of its checks); waits until it is built.

        Raises:
            RuntimeError, ValueError: What building it raised.
        """
        if self._future is not None:
            return self._future.result()
        if self._stream is not None:  # the current stream waits for the factorisations
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
        if self._error is not None:
            raise self._error
        return self._value


def _builder(source: Any, damping: float) -> Callable[[], Any]:
    """Builds ``source``'s inverse ahead of its checks where it can, else checked.

    Its layers one after the other (``workers = 1``, on the frozen copy only), so
    that the build never hands jobs to the pool that the training thread uses
    for its own per-layer work.
    """
    if hasattr(source, "workers"):
        source.workers = 1

    def build() -> Any:
        with torch.no_grad():
            ahead = source.inverse_ahead(damping)
            return ahead if ahead is not None else source.inverse(damping)

    return build


_STREAMS: dict[torch.device, Any] = {}


def _side_stream(device: torch.device) -> Any:
    """The second CUDA stream of ``device`` on which overlapped inverses are built."""
    with _POOL_LOCK:
        if device not in _STREAMS:
            _STREAMS[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        return _STREAMS[device]
