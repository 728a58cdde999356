"""Modelled time to tuned Adam's loss from the step counts of ``steps.py``/``prototype.py``.

(plain steps x plain cost + statistics steps x statistics cost) / Adam's steps, with
the per-step costs in Adam steps measured step by step against Adam for statistics
from half of each batch (``../stats_fraction/costs.py``, the table on the docs'
convergence page), medians over the seeds.

    python model.py [--amd] FILE [FILE ...]

``--amd``: the per-step costs measured the same way on a 2-core AMD EPYC (no AVX-512) on
2026-12-06 at commit ``6f0f57c`` (``../stats_fraction/costs.py TASK '{"default": {}}' 100``,
``costs_amd.txt``), where the preconditioning products cost more next to Adam's step.
"""

import collections
import statistics
import sys

# task: (plain step, statistics step, Adam's steps in the whole run)
COST = {
    "curves": (1.47, 5.25, 300), "digits-ae": (1.50, 5.98, 240), "digits-mlp": (1.53, 6.30, 120),
    "digits-cnn": (1.18, 6.11, 80), "digits-convae": (1.17, 6.89, 240),
}  # fmt: skip
COST_AMD = {
    "curves": (1.99, 5.91, 300), "digits-ae": (1.78, 6.31, 240), "digits-mlp": (1.60, 6.34, 120),
    "digits-cnn": (1.14, 4.35, 80), "digits-convae": (1.16, 8.24, 240),
}  # fmt: skip

paths = sys.argv[1:]
if paths and paths[0] == "--amd":
    COST, paths = COST_AMD, paths[1:]

for path in paths:
    times, epochs = collections.defaultdict(list), collections.defaultdict(list)
    with open(path) as fh:
        lines = fh.readlines()
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or fields[0] not in COST:
            continue
        row = dict(zip(fields[2::2], fields[3::2], strict=False))
        plain, stats, total = COST[fields[0]]
        if row["steps"] == "None":
            times[fields[0]].append(float("inf"))
            epochs[fields[0]].append(float("inf"))
            continue
        steps, before = int(row["steps"]), int(row["stats_before"])
        times[fields[0]].append(((steps - before) * plain + before * stats) / total)
        epochs[fields[0]].append(float(row["ep"]))
    med = {
        t: (statistics.median(epochs[t]), statistics.median(times[t])) for t in COST if t in times
    }
    print(path, " | ".join(f"{t} ep {e:.3f} time {m:.2f}" for t, (e, m) in med.items()),
          "| within 0.6x:", sum(m <= 0.6 for _, m in med.values()))  # fmt: skip
