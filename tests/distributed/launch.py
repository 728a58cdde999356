"""A tiny torchrun for tests: a function on every rank of a gloo group, with a timeout.

Each rank is a new process (CPU only, one thread) that joins a gloo process
group through a file store with a short timeout, runs ``fn(rank, world_size,
*args)`` and reports its return value or its traceback. Like torchrun, the job
fails as soon as one rank fails: the others get a few seconds to fail too
(their next collective does), then they are killed, and ``RankFailed`` carries
the message of the rank that failed first. A job that runs past ``timeout``
is killed and fails: a hung collective fails the test, never the CI run.

The processes come from a fork server that imported torch and curvlib once
(and started no threads): a job costs a fork per rank instead of a fresh
interpreter that imports torch, seconds on a busy CI machine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

_CONTEXT = mp.get_context("forkserver")
# DDP's first forward imports torch._dynamo (and sympy): seconds per rank otherwise.
_PRELOAD = ["torch", "torch._dynamo", "curvlib", "tests.distributed.ranks"]
_CONTEXT.set_forkserver_preload(_PRELOAD)

GRACE = 10.0
"""Seconds the other ranks get to finish after one rank failed."""


class RankFailed(RuntimeError):
    """One rank of a job raised; the message is that rank's traceback."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(f"rank {rank} failed:\n{message}")
        self.rank = rank
        self.message = message


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    store: str,
    group_timeout: float,
    results: Any,
    args: tuple[Any, ...],
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=group_timeout),
        )
        out = fn(rank, world_size, *args)
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        results.close()
        results.join_thread()
        os._exit(1)  # like a crashed rank: no clean shutdown of the group
    # Pickled here, by value: the queue would share tensors through file descriptors
    # that die with this process.
    results.put((rank, True, pickle.dumps(out)))
    dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    group_timeout: float = 10.0,
    grace: float = GRACE,
) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` new processes; the results by rank.

    ``fn`` must be importable (defined at module level).

    Raises:
        RankFailed: The first rank that raised (or died), with its traceback.
        TimeoutError: If the job ran past ``timeout`` without a failure.
    """
    ctx = _CONTEXT
    results = ctx.Queue()
    outcomes: dict[int, tuple[bool, Any]] = {}
    first_failure: tuple[int, str] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        env = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            procs = [
                ctx.Process(
                    target=_worker,
                    args=(fn, rank, world_size, store, group_timeout, results, args),
                    daemon=True,
                )
                for rank in range(world_size)
            ]
            for p in procs:
                p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        deadline = time.monotonic() + timeout
        try:
            while len(outcomes) < world_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    rank, ok, payload = results.get(timeout=min(left, 0.2))
                except queue.Empty:
                    for rank, p in enumerate(procs):
                        if p.exitcode not in (None, 0) and rank not in outcomes:
                            outcomes[rank] = (False, f"exited with code {p.exitcode}")
                            if first_failure is None:
                                first_failure = (rank, outcomes[rank][1])
                                deadline = min(deadline, time.monotonic() + grace)
                    continue
                outcomes[rank] = (ok, payload)
                if not ok and first_failure is None:
                    first_failure = (rank, payload)
                    deadline = min(deadline, time.monotonic() + grace)
        finally:
            for p in procs:
                p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5.0)
    if first_failure is not None:
        raise RankFailed(*first_failure)
    if len(outcomes) < world_size:
        missing = sorted(set(range(world_size)) - set(outcomes))
        raise TimeoutError(f"ranks {missing} did not finish within {timeout:g} s (killed).")
    return [pickle.loads(outcomes[rank][1]) for rank in range(world_size)]
