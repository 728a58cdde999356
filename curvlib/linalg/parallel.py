r"""Independent per-layer factorisations, spread over the CPU's threads.

A statistics step factorises one or two small matrices per layer (Cholesky and
its inverse, ``eigh``). On the CPU, LAPACK parallelises a single factorisation
of a few hundred rows poorly: on two threads a $512\times512$ Cholesky
inverse is barely faster than on one. Factorising different layers at the
same time, each on one thread, uses the cores instead.

[`run_jobs`][curvlib.linalg.parallel.run_jobs] runs named jobs and returns
their results by name. Jobs too large to share a core (more than a worker's
share of the total cost) run first, one after the other, on every thread; the
rest run largest first on a pool of single-threaded workers. Each result is
what the job returns when run alone on one thread (or, for the large ones, on
all of them), so a step's numbers do not depend on the order the pool finishes
in. A job that raises is re-raised after every other job has finished, so no
job is still writing when the caller handles the error.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] | None = None  # (process id, workers)


def default_workers(device: torch.device) -> int:
    """Workers for per-layer jobs on ``device``: torch's intra-op threads on the CPU, else 1.

    On an accelerator the kernels are queued asynchronously already; threads
    would only contend for the queue.
    """
    return torch.get_num_threads() if device.type == "cpu" else 1


def _single_threaded() -> None:
    torch.set_num_threads(1)


def _executor(workers: int) -> ThreadPoolExecutor:
    """The shared pool of ``workers`` single-threaded workers (a new one after ``fork``)."""
    global _pool, _pool_key
    key = (os.getpid(), workers)
    with _lock:
        if _pool is None or _pool_key != key:
            if _pool is not None and _pool_key is not None and _pool_key[0] == key[0]:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(
                max_workers=workers,
                thread_name_prefix="curvlib-linalg",
                initializer=_single_threaded,
            )
            _pool_key = key
        return _pool


MIN_CONCURRENT_COST = 2.0**22
"""Below this total cost (about four million multiply-adds) jobs run in order.

Handing a job to a worker and collecting it costs tens of microseconds, more
than a few small products save.
"""


def run_jobs(
    jobs: Mapping[K, Callable[[], R]], costs: Mapping[K, float], workers: int
) -> dict[K, R]:
    r"""Run independent jobs, concurrently where that pays; results in the order of ``jobs``.

    Args:
        jobs: Zero-argument callables by name. They must not depend on each
            other. Autograd's grad mode of the calling thread is carried into
            the workers; other thread-local state is not.
        costs: A cost per job in multiply-adds (e.g. $n^3$ for an $n\times n$
            factorisation), used to schedule.
        workers: How many jobs may run at once; 1 runs them in order on the
            calling thread, as does a total cost below
            [`MIN_CONCURRENT_COST`][curvlib.linalg.parallel.MIN_CONCURRENT_COST].

    Returns:
        Each job's result, keyed as ``jobs``.

    Raises:
        Exception: The first failing job's error (in the order of ``jobs``),
            after every started job has finished.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}.")
    total = sum(max(costs[name], 0.0) for name in jobs)
    if workers == 1 or len(jobs) < 2 or total < MIN_CONCURRENT_COST:
        return {name: job() for name, job in jobs.items()}
    large = [name for name in jobs if costs[name] * workers > total]
    results: dict[K, R] = {name: jobs[name]() for name in large}
    small = sorted((name for name in jobs if name not in results), key=lambda n: -costs[n])
    if len(small) < 2:
        results.update({name: jobs[name]() for name in small})
    else:
        grad_mode = torch.is_grad_enabled()

        def in_grad_mode(job: Callable[[], R]) -> R:
            with torch.set_grad_enabled(grad_mode):
                return job()

        pool = _executor(workers)
        futures = {name: pool.submit(in_grad_mode, jobs[name]) for name in small}
        wait(futures.values())
        for name in jobs:
            future = futures.get(name)
            if future is not None and future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
        results.update({name: future.result() for name, future in futures.items()})
    return {name: results[name] for name in jobs}
