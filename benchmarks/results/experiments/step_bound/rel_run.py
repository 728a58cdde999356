r"""Run a script with each layer's step bounded by RHO times the norm of its weights.

After the optimizer's update, a curvature layer whose weights $[W \mid b]$ moved
by more than ``RHO`` times their norm is moved back to that distance along the
same step, and its momentum buffers are scaled alike (patched into the library
from outside; ``RHO=0`` leaves the library as it is). The library's own bound,
``max_move`` (the default since commit ``4979577``), acts before this one: pass
``max_move=None`` to the optimizer to see this patch alone. Set ``RELLOG=1`` to print
each step's largest relative move before the bound.

    python rel_run.py RHO SCRIPT ARGS...       (from the repository root)
"""

import os
import runpy
import sys

import torch

import curvlib.optim.optimizer as optimizer_module
from curvlib.optim.optimizer import CurvatureOptimizer

RHO = float(sys.argv[1])
LOG = bool(os.environ.get("RELLOG"))
layer_step = optimizer_module.layer_step
step = CurvatureOptimizer.step
SCALES: dict = {}


def bounded(state, group, layers, directions, want_deltas, clip=1.0, **kwargs):  # type: ignore[no-untyped-def]
    before = [[p.detach().clone() for p in layer.parameters] for layer in layers]
    out = layer_step(state, group, layers, directions, want_deltas, clip=clip, **kwargs)
    worst = 0.0
    with torch.no_grad():
        for layer, old in zip(layers, before, strict=True):
            pairs = zip(layer.parameters, old, strict=True)
            moved = sum(float((p - o).pow(2).sum()) for p, o in pairs) ** 0.5
            norm = sum(float(o.pow(2).sum()) for o in old) ** 0.5
            ratio = moved / norm if norm > 0 else 0.0
            worst = max(worst, ratio)
            if RHO and ratio > RHO:
                s = RHO / ratio
                for p, o in zip(layer.parameters, old, strict=True):
                    p.copy_(o + s * (p - o))
                    buf = state[p].get("momentum_buffer")
                    if buf is not None:
                        buf.mul_(s)
                SCALES[layer.weight] = s * s
    if LOG:
        print("relmove", round(worst, 4), flush=True)
    return out


def stepped(self, closure=None):  # type: ignore[no-untyped-def]
    SCALES.clear()
    result = step(self, closure)
    for weight, s2 in SCALES.items():
        if "momentum_norm" in self.state[weight]:
            self.state[weight]["momentum_norm"] *= s2
    return result


optimizer_module.layer_step = bounded
CurvatureOptimizer.step = stepped  # type: ignore[method-assign]
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
