"""The per-layer job runner: results by name, errors after every job, the schedule."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from curvlib.linalg.parallel import MIN_CONCURRENT_COST, default_workers, run_jobs

BIG = MIN_CONCURRENT_COST
"""A cost per job large enough that two of them run concurrently."""


def test_results_come_back_by_name_in_the_order_of_the_jobs() -> None:
    jobs = {name: (lambda n=name: n * 2) for name in ["c", "a", "b", "d"]}
    costs = {"c": BIG, "a": 3 * BIG, "b": 2 * BIG, "d": 2 * BIG}
    out = run_jobs(jobs, costs, workers=2)
    assert list(out) == ["c", "a", "b", "d"]
    assert out == {"c": "cc", "a": "aa", "b": "bb", "d": "dd"}


def test_one_worker_runs_every_job_in_order_on_the_calling_thread() -> None:
    seen: list[tuple[str, int | None]] = []

    def job(name: str) -> None:
        seen.append((name, threading.get_ident()))

    run_jobs({n: (lambda n=n: job(n)) for n in "xyz"}, dict.fromkeys("xyz", BIG), workers=1)
    assert seen == [(n, threading.get_ident()) for n in "xyz"]


def test_small_jobs_run_concurrently_on_single_threaded_workers() -> None:
    barrier = threading.Barrier(2, timeout=10)
    threads: dict[str, tuple[int, int]] = {}

    def job(name: str) -> None:
        barrier.wait()  # both jobs must be running at once to get past this
        threads[name] = (threading.get_ident(), torch.get_num_threads())

    run_jobs({n: (lambda n=n: job(n)) for n in "ab"}, {"a": BIG, "b": BIG}, workers=2)
    assert threads["a"][0] != threads["b"][0]
    assert all(num == 1 for _, num in threads.values())
    assert threading.get_ident() not in {ident for ident, _ in threads.values()}


def test_a_job_larger_than_a_workers_share_runs_alone_on_the_calling_thread() -> None:
    where: dict[str, int] = {}

    def job(name: str) -> str:
        where[name] = threading.get_ident()
        return name

    costs = {"big": 10 * BIG, "s1": BIG, "s2": BIG, "s3": BIG}
    run_jobs({n: (lambda n=n: job(n)) for n in costs}, costs, workers=2)
    assert where["big"] == threading.get_ident()
    assert where["s1"] != threading.get_ident()


def test_an_error_is_raised_after_every_other_job_finished() -> None:
    finished: list[str] = []

    def slow() -> None:
        time.sleep(0.2)
        finished.append("slow")

    def failing() -> None:
        raise RuntimeError("planted failure")

    jobs = {"fail": failing, "slow": slow, "other": lambda: finished.append("other")}
    with pytest.raises(RuntimeError, match="planted failure"):
        run_jobs(jobs, dict.fromkeys(jobs, BIG), workers=2)
    assert sorted(finished) == ["other", "slow"]


def test_the_first_failing_job_in_order_is_the_one_raised() -> None:
    def fail(msg: str) -> None:
        raise ValueError(msg)

    jobs = {"a": lambda: None, "b": lambda: fail("b"), "c": lambda: fail("c")}
    with pytest.raises(ValueError, match=r"^b$"):
        run_jobs(jobs, dict.fromkeys("abc", BIG), workers=2)


def test_bad_worker_counts_are_rejected() -> None:
    with pytest.raises(ValueError, match="workers must be >= 1"):
        run_jobs({"a": lambda: 1}, {"a": BIG}, workers=0)


def test_workers_follow_torch_threads_on_the_cpu_only() -> None:
    assert default_workers(torch.device("cpu")) == torch.get_num_threads()
    assert default_workers(torch.device("meta")) == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_a_pool_of_its_own() -> None:
    costs = {"a": BIG, "b": BIG}
    run_jobs({"a": lambda: 1, "b": lambda: 2}, costs, workers=2)  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # the child: the parent's worker threads do not exist here
        try:
            ok = run_jobs({"a": lambda: 1, "b": lambda: 2}, costs, workers=2) == {"a": 1, "b": 2}
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_cheap_jobs_run_in_order_on_the_calling_thread() -> None:
    where: list[int] = []
    jobs = {n: (lambda: where.append(threading.get_ident())) for n in "ab"}
    run_jobs(jobs, dict.fromkeys("ab", MIN_CONCURRENT_COST / 4), workers=2)
    assert where == [threading.get_ident()] * 2


@pytest.mark.parametrize("enabled", [True, False])
def test_the_callers_grad_mode_holds_in_the_workers(enabled: bool) -> None:
    x = torch.ones(2, requires_grad=True)
    jobs = {n: (lambda: (x * 2).requires_grad) for n in "ab"}
    with torch.set_grad_enabled(enabled):
        out = run_jobs(jobs, dict.fromkeys("ab", BIG), workers=2)
    assert out == {"a": enabled, "b": enabled}
