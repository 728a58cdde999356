"""KFAC's factorisations with the pool and in order, in separate processes, alternating.

Each process trains one task at the library's defaults for 61 steps with
``run_jobs`` forced to the pool (the threshold at 0) or to run in order (one
worker) and prints the milliseconds of the factorisations of the last three
statistics steps (steps 40, 50, 60), each job's own time and its cost.

    python pool_or_order.py TASK [pool|order]       one process
    python pool_or_order.py TASK,... ROUNDS         alternating processes, ROUNDS each way
"""

import subprocess
import sys
import time
import warnings
from pathlib import Path

root = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples")]


def one(task_name: str, mode: str) -> None:
    import torch

    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    import convergence as cv

    import curvlib.approx.base as base
    import curvlib.linalg.parallel as par
    from curvlib import KFAC, PreconditionedOptimizer

    par.MIN_CONCURRENT_COST = 0.0
    run_jobs = par.run_jobs
    log: list[str] = []

    def timed(jobs, costs, workers):  # type: ignore[no-untyped-def]
        per: dict[str, float] = {}

        def wrap(name, job):  # type: ignore[no-untyped-def]
            def run():  # type: ignore[no-untyped-def]
                start = time.perf_counter()
                out = job()
                per[name] = (time.perf_counter() - start) * 1e3
                return out

            return run

        start = time.perf_counter()
        out = run_jobs({n: wrap(n, j) for n, j in jobs.items()}, costs,
                       workers if mode == "pool" else 1)  # fmt: skip
        total = (time.perf_counter() - start) * 1e3
        each = ", ".join(f"{per[n]:.2f} (cost {costs[n]:.2g})" for n in jobs)
        log.append(f"{task_name} {mode}: {total:.2f} ms; jobs {each}")
        return out

    base.run_jobs = timed
    task = cv.TASKS[task_name](False)
    torch.manual_seed(0)
    model = task.make_model()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=task.loss_fn)
    bs, batches = task.batch_size, len(task.inputs) // task.batch_size
    for s in range(61):
        i = s % batches
        x, y = task.inputs[i * bs : (i + 1) * bs], task.targets[i * bs : (i + 1) * bs]
        opt.zero_grad()
        with opt.record():
            task.loss_fn(model(x), y).backward()
        opt.step()
    print("\n".join(log[-3:]), flush=True)


def main() -> None:
    if sys.argv[2] in ("pool", "order"):
        one(sys.argv[1], sys.argv[2])
        return
    for task in sys.argv[1].split(","):
        for _ in range(int(sys.argv[2])):
            for mode in ("pool", "order"):
                subprocess.run([sys.executable, __file__, task, mode], check=True)


if __name__ == "__main__":
    main()
