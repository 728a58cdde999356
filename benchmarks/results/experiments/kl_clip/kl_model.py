r"""How far the curvature the KL clip measures is from the exact GGN, along each step.

Run (one thread; the numbers depend on the seed only):

    python kl_model.py TASKS SEED STEPS [OPTIMIZER_JSON]
    python kl_model.py curves,digits-ae,digits-mlp,digits-cnn,digits-convae,synthetic-cnn 0 40

For every step $\delta$ that default KFAC takes, it prints the exact GGN's
quadratic form $\delta^\top G\delta$ (linearised network, the loss's own Hessian
in the outputs, on the step's batch: twice the linearised KL for a likelihood
loss), KFAC's undamped $\delta^\top C\delta$ (the estimate the clip's metric
is built on) and their ratio, and per task the quartiles of the ratio and the
share of steps where the clip was active. ``synthetic-cnn`` is the examples'
CNN (``examples/cnn.py``) on 1,500 of its generated 32x32 images, batch 128.
"""

import json
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch.func import functional_call, grad, jvp

ROOT = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "examples")]


def synthetic_cnn():  # the examples' CNN on its own generated images
    import convergence as cv
    from data import load_images
    from networks import kpsvd_cnn

    split = load_images("synthetic", num_train=1500, num_test=100, seed=0)
    return cv.Task(
        "synthetic-cnn", "examples' CNN, 1,500 generated images", lambda: kpsvd_cnn(3, 32, 10),
        torch.nn.CrossEntropyLoss(), split.train_x, split.train_y, 128, 8,
    )  # fmt: skip


def forms(model, loss_fn, layers, approx, old, x, y):
    """``(exact, kfac)``: the step's quadratic forms in the exact GGN and in KFAC's C."""
    new = {k: v.detach() for k, v in model.named_parameters()}
    delta = {k: new[k] - old[k] for k in new}
    out, d_out = jvp(lambda p: functional_call(model, p, (x,)), (old,), (delta,))
    _, h_d_out = jvp(grad(lambda z: loss_fn(z, y)), (out.detach(),), (d_out.detach(),))
    exact = float((d_out * h_d_out).sum())
    mats = {
        layer.name: layer.to_matrix(delta[f"{layer.name}.weight"], delta.get(f"{layer.name}.bias"))
        for layer in layers
    }
    curv = approx.matvec(mats)
    return exact, sum(float((mats[n] * curv[n]).sum()) for n in mats)


def run(task, seed: int, steps: int, optimizer: dict) -> dict:
    from curvlib import KFAC, PreconditionedOptimizer

    torch.manual_seed(seed)
    model, loss_fn = task.make_model(), task.loss_fn
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=loss_fn, **optimizer)
    layers = list(opt.extractor.layout.layers)
    order = torch.Generator().manual_seed(seed)
    n, bs = len(task.inputs), task.batch_size
    ratios, clipped = [], 0
    while len(ratios) < steps:
        perm = torch.randperm(n, generator=order)
        for b in range(task.steps_per_epoch):
            idx = perm[b * bs : (b + 1) * bs]
            x, y = task.inputs[idx], task.targets[idx]
            old = {k: v.detach().clone() for k, v in model.named_parameters()}
            opt.zero_grad()
            with opt.record():
                loss = loss_fn(model(x), y)
                loss.backward()
            opt.step()
            nu = opt.last_stats.get("kl_clip_factor") or 1.0
            clipped += nu < 1.0
            exact, kfac = forms(model, loss_fn, layers, opt.approx, old, x, y)
            ratios.append(exact / kfac)
            print(
                task.name, len(ratios) - 1, f"loss {float(loss):.4g} nu {nu:.3f}",
                f"exact {exact:.3e} kfac {kfac:.3e} ratio {exact / kfac:.3g}", flush=True,
            )  # fmt: skip
            if len(ratios) == steps:
                break
    q = statistics.quantiles(ratios, n=4)
    return {"task": task.name, "steps": steps, "quartiles": q, "clipped": clipped / steps}


def main() -> None:
    import convergence as cv

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    names, seed, steps = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3])
    optimizer = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    for name in names:
        task = synthetic_cnn() if name == "synthetic-cnn" else cv.TASKS[name](False)
        summary = run(task, seed, steps, optimizer)
        print("summary", json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
