"""KFAC's refresh schedule varied from outside: epochs to tuned Adam's loss, and a step-count model.

    python variants.py TASKS SEEDS SPEC [SPEC ...]

``SPEC`` is ``MODE:KWARGS``, ``KWARGS`` the optimizer's (``refresh_on_move=0.3,warmup=3``).
``MODE`` patches when the engine refreshes (statistics and inverse together):

- ``mod``: as the library does, on the warm-up's powers of two and every
  ``t_cov`` steps (``k % t_cov == 0``), and where the weights moved;
- ``since``: ``t_cov`` steps after the last refresh, whatever triggered it;
- ``modw``: as ``mod``, the movement rule off during the warm-up;
- ``modgN``: as ``mod``, a movement refresh only ``N`` steps or more after the last one.

The epochs to tuned Adam's final loss depend on the seeds alone (Adam's losses
are read from the Results' ``convergence.json``). The time is modelled as
``../refresh_on_move/model.py`` models it: the steps before the target at the
median regular-step time, the refreshes among them at the median statistics-step
time, over tuned Adam's steps at its median step time, from ``costs.json``
(``costs.py``, measured once on this machine).
"""

import json
import sys
import warnings
from pathlib import Path

here = Path(__file__).resolve().parent
root = here.parents[3]
sys.path[:0] = [str(root / "benchmarks")]
import torch  # noqa: E402

torch.set_num_threads(2)
warnings.simplefilter("ignore")
import convergence as cv  # noqa: E402

from curvlib import KFAC, PreconditionedOptimizer  # noqa: E402
from curvlib.optim.engine import CurvatureEngine  # noqa: E402

mode = "mod"
refreshes: list[int] = []


def scheduled(engine: CurvatureEngine) -> bool:
    k = engine.step_count
    if mode == "since":
        last = getattr(engine, "_last_refresh", None)
        return engine._warming_up or last is None or k - last >= engine.t_cov
    return engine._warming_up or k % engine.t_cov == 0


def stats_due(engine: CurvatureEngine) -> bool:
    k = engine.step_count
    cached = getattr(engine, "_due_at", None)
    if cached is not None and cached[0] == k:
        return cached[1]
    last = getattr(engine, "_last_refresh", None)
    if mode.startswith("modg"):
        moved = (last is None or k - last >= int(mode[4:])) and engine._moved
    elif mode == "modw":
        moved = k >= engine.warmup and engine._moved
    else:
        moved = engine._moved
    due = moved or scheduled(engine)
    engine._due_at = (k, due)
    if due:
        engine._last_refresh = k
        if not refreshes or refreshes[-1] != k:
            refreshes.append(k)
    return due


CurvatureEngine.stats_due = property(stats_due)
CurvatureEngine._inverse_due = property(lambda e: e._precond is None or e.stats_due)

tasks, seeds = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")]
results = json.loads((root / "benchmarks/results/convergence.json").read_text())
costs = json.loads((here / "costs.json").read_text())
for spec in sys.argv[3:]:
    mode, _, kwargs = spec.partition(":")
    options = {k: float(v) if "." in v else int(v) for k, v in
               (item.split("=") for item in kwargs.split(",") if item)}  # fmt: skip
    row = []
    for name in tasks:
        task = cv.TASKS[name](False)
        tuned = [r for r in results["runs"] if r["task"] == name and r["method"] == "adam"]
        targets = {r["seed"]: r["adam_final_loss"] for r in tuned if r["tuned_choice"]}
        cost, adam_steps = costs[name], task.epochs * task.steps_per_epoch
        times, epochs = [], []
        for seed in seeds:
            refreshes.clear()
            method = cv.Method("kfac", spec, lambda m, lf, kw=options: PreconditionedOptimizer(
                m, KFAC(), loss_fn=lf, **kw), True)  # fmt: skip
            run = cv.train(task, method, seed, None)
            reach = run.curve.epochs_to(targets[seed])
            if reach is None:
                times.append("—")
                epochs.append("—")
                continue
            steps = reach * task.steps_per_epoch
            extra = sum(k < steps for k in refreshes) * (cost["stats"] - cost["reg"])
            times.append(f"{(steps * cost['reg'] + extra) / (adam_steps * cost['adam']):.2f}")
            epochs.append(f"{reach / task.epochs:.3f}")
        row.append(f"{name}: {' '.join(times)} (epochs {' '.join(epochs)})")
    print(spec, "|", " | ".join(row), flush=True)
