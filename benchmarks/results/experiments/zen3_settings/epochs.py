"""Epochs to tuned Adam's final loss for KFAC with one setting changed (no clock).

Tuned Adam's final loss per task and seed is read from the Results'
``benchmarks/results/convergence.json`` (Adam at 3e-3, the tuned rate of every
task); KFAC trains through ``convergence.train`` on the same weights and
batches. Epochs depend on the seeds and the thread count only.

    python benchmarks/results/experiments/zen3_settings/epochs.py TASKS SEEDS VARIANT [VARIANT ...]

``VARIANT`` is ``default``, ``reset`` (the momentum buffers dropped on every
step whose inverse was rebuilt, before the step reads them) or optimizer
arguments ``key=value/key=value`` (``warmup=17``).
"""

import json
import sys
import warnings
from pathlib import Path
from typing import Any

root = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples")]
import torch  # noqa: E402

torch.set_num_threads(2)
warnings.simplefilter("ignore")
import convergence as cv  # noqa: E402

from curvlib import KFAC, PreconditionedOptimizer  # noqa: E402


class ResetOnRebuild(PreconditionedOptimizer):
    """Momentum restarted on the steps whose inverse was rebuilt (after ``prepare``)."""

    def _buffer_matrices(self) -> dict[str, torch.Tensor]:
        if any(engine.inverse_rebuilt for engine in self.engines):
            for layer in self.layers:
                for p in layer.parameters:
                    self.state[p]["momentum_buffer"] = None
                self.state[layer.weight].pop("momentum_norm", None)
            return {}
        return super()._buffer_matrices()


def method(variant: str) -> cv.Method:
    cls = ResetOnRebuild if variant == "reset" else PreconditionedOptimizer
    kwargs: dict[str, Any] = {}
    if variant not in ("default", "reset"):
        for item in variant.split("/"):
            key, value = item.split("=")
            kwargs[key] = cv.parse_value(value)
    return cv.Method(
        "kfac", variant, lambda model, loss_fn: cls(model, KFAC(), loss_fn=loss_fn, **kwargs), True
    )


tasks, seeds = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")]
results = json.loads((root / "benchmarks/results/convergence.json").read_text())
target = {
    (r["task"], r["seed"]): r["final_loss"]
    for r in results["runs"]
    if r["method"] == "adam" and r["config"] == "lr=0.003"
}
for name in tasks:
    task = cv.TASKS[name](False)
    for variant in sys.argv[3:]:
        for seed in seeds:
            run = cv.train(task, method(variant), seed, None)
            reached = run.curve.epochs_to(target[(name, seed)])
            epochs = None if reached is None else round(reached / task.epochs, 3)
            final = run.curve.losses[-1]
            print(
                name, variant, seed, "epochs", epochs, "final", round(final, 4),
                "adam_final", round(target[(name, seed)], 4), "diverged", run.diverged,
                flush=True,
            )  # fmt: skip
