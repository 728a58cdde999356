"""The statistics step with the factorisation pool's threshold at 2^22 and at 2^27, in turn.

One run per task and approximation at the library's defaults; from step 20 on,
the statistics steps (every 10th) set ``curvlib.linalg.parallel.MIN_CONCURRENT_COST``
to the library's 2^22 and to the 2^27 tried, two at a time, so that both
see the same load of the machine and, for EKFAC, as many eigenbasis steps
(every 20th) each. Prints the median milliseconds of the whole step (forward,
backward, ``step()``) per threshold, eigenbasis steps apart, and of the
factorisations alone (the calls of ``run_jobs`` in the step). The recorded
``ab_pool.txt`` ran on a working-tree change that compared the threshold with
the jobs the pool would share, the large ones left out; the library compares it
with all of them (the same schedule here except on the CNN and the
convolutional autoencoder, whose one large job counts there).

    python ab_pool.py [TASK,...] [APPROX,...] [STEPS]     (from this folder or by path)
"""

import statistics
import sys
import time
import warnings
from pathlib import Path

root = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples")]
import torch  # noqa: E402

torch.set_num_threads(2)
warnings.simplefilter("ignore")
import convergence as cv  # noqa: E402

import curvlib.approx.base as base  # noqa: E402
import curvlib.linalg.parallel as par  # noqa: E402
from curvlib import EKFAC, KFAC, PreconditionedOptimizer  # noqa: E402

APPROX = {"kfac": KFAC, "ekfac": EKFAC}
OLD, NEW = 22, 27
_run_jobs = base.run_jobs
_jobs_ms: list[float] = []


def _timed_run_jobs(*args, **kwargs):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = _run_jobs(*args, **kwargs)
    _jobs_ms.append((time.perf_counter() - start) * 1e3)
    return out


base.run_jobs = _timed_run_jobs


def run(task: cv.Task, approx: str, steps: int) -> dict[tuple[str, int, bool], list[float]]:
    torch.manual_seed(0)
    model = task.make_model()
    opt = PreconditionedOptimizer(model, APPROX[approx](), loss_fn=task.loss_fn)
    bs, batches = task.batch_size, len(task.inputs) // task.batch_size
    times: dict[tuple[str, int, bool], list[float]] = {}
    k = 0
    for s in range(steps):
        i = s % batches
        x, y = task.inputs[i * bs : (i + 1) * bs], task.targets[i * bs : (i + 1) * bs]
        timed = s % 10 == 0 and s >= 20
        if timed:
            arm = (OLD, NEW)[(k // 2) % 2]
            k += 1
            par.MIN_CONCURRENT_COST = 2.0**arm
        _jobs_ms.clear()
        start = time.perf_counter()
        opt.zero_grad()
        with opt.record():
            task.loss_fn(model(x), y).backward()
        opt.step()
        if timed:
            even = s % 20 == 0
            times.setdefault(("step", arm, even), []).append((time.perf_counter() - start) * 1e3)
            times.setdefault(("jobs", arm, even), []).append(sum(_jobs_ms))
    return times


def main() -> None:
    tasks = sys.argv[1].split(",") if len(sys.argv) > 1 else list(cv.TASKS)
    approxes = sys.argv[2].split(",") if len(sys.argv) > 2 else list(APPROX)
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 500
    for approx in approxes:
        for name in tasks:
            times = run(cv.TASKS[name](False), approx, steps)
            for even in (True, False):
                parts = []
                for part in ("step", "jobs"):
                    old = statistics.median(times[part, OLD, even])
                    new = statistics.median(times[part, NEW, even])
                    parts.append(f"{part} 2^22 {old:.1f} ms, 2^27 {new:.1f} ms ({new / old:.2f})")
                label = "steps 20, 40, ..." if even else "steps 30, 50, ..."
                print(f"{approx} {name} {label}: " + "; ".join(parts), flush=True)


if __name__ == "__main__":
    main()
