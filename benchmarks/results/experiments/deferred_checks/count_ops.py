"""Operators dispatched by one regular KFAC step, by kind (a CPU proxy for GPU kernels).

    python benchmarks/results/experiments/deferred_checks/count_ops.py [--momentum 0.5]

The MNIST-sized autoencoder of the step-time benchmark (784-1000-500-250-30
mirrored, ReLU, BCEWithLogitsLoss) at batch 64, KFAC at the library's defaults;
after 23 steps, the next step (a regular one: nothing folded in, no inverse
rebuilt) with ``deferred_checks=True`` and ``False``, counted with a
``TorchDispatchMode`` below autograd: every operator that computes (views,
allocations and reads of a number left out), each of which is at least one
kernel launch on a GPU. ``torch.optim.Adam`` (foreach) on the same model for scale.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from curvlib import KFAC, PreconditionedOptimizer

NOT_COUNTED = {
    "view", "reshape", "_reshape_alias", "slice", "select", "as_strided", "t", "transpose",
    "expand", "unsqueeze", "squeeze", "detach", "alias", "empty", "empty_strided", "split",
    "unbind", "narrow", "permute", "_unsafe_view", "diagonal", "lift_fresh", "resolve_conj",
    "resolve_neg", "split_with_sizes", "_local_scalar_dense", "empty_like", "new_empty",
    "new_empty_strided", "_record_function_enter_new", "_record_function_exit",
}  # fmt: skip


class Count(TorchDispatchMode):
    """Counts the operators dispatched inside it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.__name__.split(".")[0]
        if name not in NOT_COUNTED:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def model() -> nn.Module:
    torch.manual_seed(0)
    dims = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2 and i != 3:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def count(make: Any, curvature: bool) -> collections.Counter[str]:
    net, loss_fn, x = model(), nn.BCEWithLogitsLoss(), torch.rand(64, 784)
    opt = make(net, loss_fn)

    def step(mode: Count | None = None) -> None:
        opt.zero_grad()
        if curvature:
            with opt.record():
                loss_fn(net(x), x).backward()
        else:
            loss_fn(net(x), x).backward()
        if mode is None:
            opt.step()
        else:
            with mode:
                opt.step()

    for _ in range(23):
        step()
    mode = Count()
    step(mode)
    return mode.ops


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--momentum", type=float, default=0.5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = {
        "adam": (lambda n, _: torch.optim.Adam(n.parameters(), foreach=True), False),
        **{
            f"kfac, deferred_checks={d}": (
                lambda n, f, d=d: PreconditionedOptimizer(
                    n, KFAC(), loss_fn=f, deferred_checks=d, momentum=args.momentum
                ),
                True,
            )
            for d in (True, False)
        },
    }
    for name, (make, curvature) in rows.items():
        ops = count(make, curvature)
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(8))
        print(f"{name}: {sum(ops.values())} operators ({top}, ...)")


if __name__ == "__main__":
    main()
