"""KPSVD's sample-space fits on the statistics of the digits CNN and convolutional autoencoder.

Trains default KPSVD for 11 steps on each task, keeps the per-sample statistics that
its update at step 10 fits in the sample-space form, and times, per layer, building
the operator (its Gram matrices), the power iterations, and forming the factors.
Run it under the code to measure (``PYTHONPATH=<checkout>`` for another commit):

    python benchmarks/results/experiments/sample_space_gram/fit_times.py
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "examples")]

import convergence  # noqa: E402

import curvlib.approx.kpsvd as kpsvd_module  # noqa: E402
from curvlib import KPSVD, PreconditionedOptimizer  # noqa: E402
from curvlib.linalg import power_svd  # noqa: E402
from curvlib.linalg.sample_space import RearrangedForm, SampleSpaceFisher  # noqa: E402

torch.set_num_threads(2)
warnings.simplefilter("ignore")


def captured(task_name: str) -> list:
    """The per-sample statistics of the sample-space fits of step 10."""
    task = convergence.TASKS[task_name](False)
    torch.manual_seed(0)
    model = task.make_model()
    opt = PreconditionedOptimizer(model, KPSVD(), loss_fn=task.loss_fn)
    seen: list = []
    inner = kpsvd_module.rearranged

    def recording(io, *args, **kwargs):
        op, form = inner(io, *args, **kwargs)
        if form is RearrangedForm.SAMPLE_SPACE:
            seen.append(io)
        return op, form

    kpsvd_module.rearranged = recording
    order = torch.Generator().manual_seed(0)
    try:
        for _ in range(11):
            seen.clear()
            idx = torch.randperm(len(task.inputs), generator=order)[: task.batch_size]
            opt.zero_grad()
            with opt.record():
                task.loss_fn(model(task.inputs[idx]), task.targets[idx]).backward()
            opt.step()
    finally:
        kpsvd_module.rearranged = inner
    return list(seen)


def median_ms(fn, rounds: int = 11) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    """Print the fits' times of both tasks."""
    for name in ("digits-cnn", "digits-convae"):
        for io in captured(name):
            op = SampleSpaceFisher(io)
            triple = power_svd(op)
            shape = tuple(io.inputs.shape), tuple(io.output_grads.shape)
            build = median_ms(lambda io=io: SampleSpaceFisher(io))
            iterate = median_ms(lambda op=op: power_svd(op))
            form = median_ms(lambda op=op, t=triple: (op.in_matrix(t.v), op.out_matrix(t.u)))
            print(
                f"{name} inputs {shape[0]} grads {shape[1]}: build {build:.2f} ms, "
                f"iterations ({triple.iterations}) with factors {iterate:.2f} ms, "
                f"factors alone {form:.2f} ms"
            )


if __name__ == "__main__":
    main()
