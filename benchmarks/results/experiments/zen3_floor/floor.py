"""Default KFAC's time to tuned Adam's loss, measured and at the floor of each part.

For each task, one process:

1. Default KFAC trains on seeds 0-2 through ``convergence.train`` (no clock): the
   step at which it first reaches tuned Adam's final loss (read from the Results'
   ``convergence.json``) and how many of the steps before it refreshed the
   statistics and the inverse.
2. Adam (lr 3e-3) and default KFAC train side by side on the task's first batches
   (steps 20-119 counted, as ``../unfold/phases.py``), and after each KFAC step the
   floors of its parts are timed on the same tensors:
   - *products*: each layer's live inverse applied to its gradient by two bare
     ``torch.mm`` (``G'^{-1} g A'^{-1}`` in float32), no other work;
   - *inverse*: a bare Cholesky and Cholesky inverse of every damped factor,
     largest first on curvlib's pool of single-threaded workers (the library's
     own schedule, without its checks, condition estimates and flushing).
   The statistics' extra backward, unfolding and Gram products are kept at their
   measured cost (earlier experiments found them near their GEMMs' rate).
3. Time to Adam's loss per seed = (plain steps x plain step + refreshes x
   statistics step) / (tuned Adam's steps x Adam's step), with the steps measured
   (``measured``) and with KFAC's plain step at Adam's step plus the bare products,
   and its statistics step at that plus the statistics' extra forward-backward
   plus the bare inverse (``floor``): no overhead at all beyond Adam's own update.

Medians in ms, 2 threads.

    python benchmarks/results/experiments/zen3_floor/floor.py [TASK ...]
"""

import collections
import json
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

from curvlib import KFAC, PreconditionedOptimizer  # noqa: E402
from curvlib.approx.kfac import KroneckerInverse  # noqa: E402
from curvlib.linalg import parallel  # noqa: E402
from curvlib.optim.defaults import DEFAULTS  # noqa: E402
from curvlib.optim.engine import layer_grads  # noqa: E402

SEEDS = (0, 1, 2)


def refreshes_before(step: int) -> int:
    """Statistics steps among steps ``0 .. step`` at the defaults (warm-up and every ``t_cov``)."""
    warm = {s for s in (0, 1, 2, 4, 8) if s < DEFAULTS.warmup}
    return sum(1 for s in range(step + 1) if s in warm or s % DEFAULTS.t_cov == 0)


def steps_to_target(task: cv.Task, target: dict[int, float]) -> dict[int, int | None]:
    """Per seed, the step (0-based) after which default KFAC first reached tuned Adam's loss."""
    method = cv.Method(
        "kfac", "default", lambda m, f: PreconditionedOptimizer(m, KFAC(), loss_fn=f), True
    )
    out: dict[int, int | None] = {}
    for seed in SEEDS:
        run = cv.train(task, method, seed, None)
        epochs = run.curve.epochs_to(target[seed])
        out[seed] = None if epochs is None else round(epochs * task.steps_per_epoch) - 1
    return out


def bare_products(opt: PreconditionedOptimizer) -> float:
    precond = opt.engines[0]._precond
    grads = layer_grads(opt.layers)
    inverses = precond._inverses.items()
    pairs = [(inv.g_inv.float(), inv.a_inv.float(), grads[name].float())
             for name, inv in inverses if isinstance(inv, KroneckerInverse)]  # fmt: skip
    start = time.perf_counter()
    for g_inv, a_inv, grad in pairs:
        torch.mm(torch.mm(g_inv, grad), a_inv)
    return time.perf_counter() - start


def bare_inverse(approx: KFAC) -> float:
    mats = []
    for block in approx._blocks.values():
        for factor in (block.A, block.G):
            shift = 1e-3 * float(factor.diagonal().mean())
            mats.append(factor + shift * torch.eye(factor.shape[0]))
    mats.sort(key=lambda m: -m.shape[0])
    pool = parallel._executor(torch.get_num_threads())

    def job(m: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_inverse(torch.linalg.cholesky(m))

    start = time.perf_counter()
    list(pool.map(job, mats))
    return time.perf_counter() - start


def timings(task: cv.Task) -> dict[str, float]:
    bs, batches = task.batch_size, len(task.inputs) // task.batch_size
    torch.manual_seed(0)
    model, adam_model = task.make_model(), task.make_model()
    adam = torch.optim.Adam(adam_model.parameters(), 3e-3)
    approx = KFAC()
    opt = PreconditionedOptimizer(model, approx, loss_fn=task.loss_fn)
    rows: dict[str, list[float]] = collections.defaultdict(list)
    for s in range(120):
        i = s % batches
        x, y = task.inputs[i * bs : (i + 1) * bs], task.targets[i * bs : (i + 1) * bs]
        start = time.perf_counter()
        adam.zero_grad()
        task.loss_fn(adam_model(x), y).backward()
        adam.step()
        adam_time = time.perf_counter() - start
        start = time.perf_counter()
        opt.zero_grad()
        with opt.record():
            task.loss_fn(model(x), y).backward()
        mid = time.perf_counter()
        opt.step()
        end = time.perf_counter()
        if s < 20:
            continue
        rows["adam"].append(adam_time)
        kind = "statistics" if s % 10 == 0 else "plain"
        rows[f"{kind} forward+backward"].append(mid - start)
        rows[f"{kind} step"].append(end - mid)
        if kind == "plain":
            rows["bare products"].append(bare_products(opt))
        else:
            rows["bare inverse"].append(bare_inverse(approx))
    return {key: 1e3 * statistics.median(values) for key, values in rows.items()}


def main() -> None:
    results = json.loads((root / "benchmarks/results/convergence.json").read_text())
    names = sys.argv[1:] or list(cv.TASKS)[:5]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"# {when}, torch {torch.__version__}, {cpu}, 2 threads")
    for name in names:
        task = cv.TASKS[name](False)
        target = {
            r["seed"]: r["final_loss"] for r in results["runs"]
            if r["task"] == name and r["method"] == "adam" and r["config"] == "lr=0.003"
        }  # fmt: skip
        reach = steps_to_target(task, target)
        t = timings(task)
        plain = t["plain forward+backward"] + t["plain step"]
        stats = t["statistics forward+backward"] + t["statistics step"]
        extra_record = t["statistics forward+backward"] - t["plain forward+backward"]
        plain_floor = t["adam"] + t["bare products"]
        stats_floor = plain_floor + extra_record + t["bare inverse"]
        adam_total = task.epochs * task.steps_per_epoch * t["adam"]
        print(f"{name}: " + " | ".join(f"{k} {v:.2f}" for k, v in t.items()))
        for seed, step in reach.items():
            if step is None:
                print(f"  seed {seed}: not reached")
                continue
            n_stats = refreshes_before(step)
            n_plain = step + 1 - n_stats
            measured = (n_plain * plain + n_stats * stats) / adam_total
            floor = (n_plain * plain_floor + n_stats * stats_floor) / adam_total
            print(f"  seed {seed}: {step + 1} steps, {n_stats} refreshes | "
                  f"measured {measured:.2f} | floor {floor:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
