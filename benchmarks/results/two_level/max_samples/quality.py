"""Two-level KFAC at a batch of 1000: the coarse Fisher from 128 samples against all 500.

Run (one thread; losses depend on the seeds only, times on the machine's load):

    python quality.py SPACE SEEDS
    python quality.py Nicolaides:krylov 0,1,2
    python quality.py ResidualSpace 0,1,2

``SPACE`` names a class of ``curvlib.approx.coarse``; ``:krylov`` adds the Krylov enrichment.

The CURVES autoencoder of ``benchmarks/convergence.py`` at a batch of 1000
(statistics from 500 samples) for 40 epochs: KFAC, then ``TwoLevel(KFAC(),
SPACE())`` with ``max_samples=None`` (every statistics sample) and with 128,
all else at the library defaults, from the same initial weights and batch
order. Per run: the final loss (equal epochs), the loss at KFAC's total
training time, the time to KFAC's final loss over KFAC's time, and the
training time.
"""

import dataclasses
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import convergence as cv

from curvlib import KFAC, PreconditionedOptimizer
from curvlib.approx import coarse
from curvlib.approx.two_level import TwoLevel


def method(space: str, limit: int | str | None) -> cv.Method:
    def build(model: torch.nn.Module, loss_fn: torch.nn.Module) -> PreconditionedOptimizer:
        if limit == "kfac":
            return PreconditionedOptimizer(model, KFAC(), loss_fn=loss_fn)
        name, _, krylov = space.partition(":")
        space_ = getattr(coarse, name)(krylov=True) if krylov else getattr(coarse, name)()
        approx = TwoLevel(KFAC(), space_, max_samples=limit)
        return PreconditionedOptimizer(model, approx, loss_fn=loss_fn)

    return cv.Method(str(limit), "default", build, True)


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    space, seeds = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
    task = dataclasses.replace(cv.TASKS["curves"](False), batch_size=1000, epochs=40)
    for seed in seeds:
        kfac = cv.train(task, method(space, "kfac"), seed, None)
        for limit in ("kfac", None, 128):
            run = kfac if limit == "kfac" else cv.train(task, method(space, limit), seed, None)
            to_kfac = run.curve.time_to(kfac.curve.losses[-1])
            print(
                space, seed, f"max_samples={limit}", "final", round(run.curve.losses[-1], 3),
                "at KFAC's time", round(run.curve.loss_at(kfac.train_time), 3),
                "time to KFAC's loss / KFAC's",
                None if to_kfac is None else round(to_kfac / kfac.train_time, 3),
                "time", round(run.train_time, 1), "diverged", run.diverged, flush=True,
            )  # fmt: skip


if __name__ == "__main__":
    main()
