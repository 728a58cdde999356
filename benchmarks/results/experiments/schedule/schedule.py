"""Epochs to tuned Adam's final loss under other refresh schedules, and a step-count model.

Run (one thread; epochs and final losses depend on the seeds only):

    python schedule.py run TASKS SEEDS OPTIMIZER_JSON [KFAC_JSON]
    python schedule.py run curves,digits-ae 0,1,2 '{"t_cov": 5, "t_inv": 5}' '{"decay": 0.707}'

Model (the time to Adam's loss that these epochs imply, in Adam steps):

    python schedule.py model T FILE [FILE ...]
    python schedule.py model T:W FILE [FILE ...]    # warm-up below W (default 10)

The model counts the steps KFAC takes to reach the target (median epochs over the
seeds times the task's steps), prices statistics steps (0, 1, 2, 4, 8 and every
T-th) and plain steps at their measured cost relative to an Adam step
(``../stats_fraction/costs.txt``, statistics from half the batch) and divides by
Adam's steps in the whole budget.
"""

import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

# Plain and statistics step over Adam's, half the batch (../stats_fraction/costs.txt).
COSTS = {
    "curves": (1.47, 5.25),
    "digits-ae": (1.50, 5.98),
    "digits-mlp": (1.53, 6.30),
    "digits-cnn": (1.18, 6.11),
    "digits-convae": (1.17, 6.89),
}
ADAM_STEPS = {  # 15, 30, 15, 10 and 30 epochs
    "curves": 300,
    "digits-ae": 240,
    "digits-mlp": 120,
    "digits-cnn": 80,
    "digits-convae": 240,
}


def run(tasks: list[str], seeds: list[int], optimizer: dict, kfac: dict) -> None:
    root = Path(__file__).resolve().parents[4]
    sys.path[:0] = [str(root / "benchmarks"), str(root / "examples")]
    import torch

    torch.set_num_threads(1)
    import convergence as cv

    from curvlib import KFAC, PreconditionedOptimizer

    def build(model: torch.nn.Module, loss_fn: torch.nn.Module) -> PreconditionedOptimizer:
        return PreconditionedOptimizer(model, KFAC(**kfac), loss_fn=loss_fn, **optimizer)

    for name in tasks:
        task = cv.TASKS[name](False)
        for seed in seeds:
            target = cv.train(task, cv.adam(3e-3), seed, None).curve.losses[-1]
            result = cv.train(task, cv.Method("kfac", "x", build, True), seed, None)
            curve = result.curve
            reached = [i for i, loss in enumerate(curve.losses) if loss <= target]
            epochs = curve.epochs[reached[0]] / task.epochs if reached else None
            print(
                name, seed, "target", round(target, 4), "final", round(curve.losses[-1], 4),
                "ep", None if epochs is None else round(epochs, 3), "div", result.diverged,
                flush=True,
            )  # fmt: skip


def model_ratio(task: str, epochs: float, interval: int, warmup: int = 10) -> float:
    plain, stats = COSTS[task]
    steps = math.ceil(epochs * ADAM_STEPS[task])
    due = [(k < warmup and k & (k - 1) == 0) or k % interval == 0 for k in range(steps)]
    return sum(stats if d else plain for d in due) / ADAM_STEPS[task]


def model(interval: int, paths: list[str], warmup: int = 10) -> None:
    for path in paths:
        epochs: dict[str, list[float]] = defaultdict(list)
        for line in Path(path).read_text().splitlines():
            words = line.split()
            at = words.index("ep") + 1
            epochs[words[0]].append(math.inf if words[at] == "None" else float(words[at]))
        cells = []
        for task, values in epochs.items():
            median = statistics.median(values)
            ratio = model_ratio(task, median, interval, warmup)
            cells.append(f"{task} {median:.3f} -> {ratio:.2f}")
        print(f"{path} (T={interval}, warmup={warmup}): " + ", ".join(cells))


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(
            sys.argv[2].split(","), [int(s) for s in sys.argv[3].split(",")],
            json.loads(sys.argv[4]), json.loads(sys.argv[5]) if len(sys.argv) > 5 else {},
        )  # fmt: skip
    else:
        interval, _, warmup = sys.argv[2].partition(":")
        model(int(interval), sys.argv[3:], int(warmup or 10))
