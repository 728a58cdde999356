"""Default KFAC's steps on the examples' DCGAN generator, split into their parts.

The generator of ``examples/dcgan_kfac.py`` at its defaults (``nz=32``, width 16,
28x28 images: transposed convolutions on 1x1, 7x7 and 14x14 inputs) trained by
KFAC at the library's defaults on a regression to random images (``MSELoss``),
batch 64, 40 steps; the statistics steps (every 10th, from step 10) split into
the loss hook (Monte Carlo targets and pull-back), the session's ``finish`` (the
input factors' Gram matrices), the running average and the inverse, timed by
wrapping the library's methods from outside. Medians in ms, 2 threads. ``ROOT``
picks the checkout whose examples are used (``PYTHONPATH`` the library).

    python generator_phases.py
"""

import collections
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

root = Path(os.environ.get("ROOT", Path(__file__).resolve().parents[4]))
sys.path[:0] = [str(root / "examples")]
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(2)
warnings.simplefilter("ignore")
from gan_models import generator  # noqa: E402

from curvlib import KFAC, PreconditionedOptimizer  # noqa: E402
from curvlib.extract._session import CollectSession  # noqa: E402
from curvlib.optim.engine import CurvatureEngine  # noqa: E402

parts: dict[str, float] = collections.defaultdict(float)


def timed(cls: type, name: str, key: str) -> None:
    """Add the time of every call of ``cls.name`` to ``parts[key]``."""
    method = getattr(cls, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            parts[key] += time.perf_counter() - start

    setattr(cls, name, wrapper)


timed(CollectSession, "_loss_hook", "MC targets+pull-back")
timed(CollectSession, "finish", "factors' Grams")
timed(CurvatureEngine, "_update", "running average")
timed(CurvatureEngine, "_invert", "inverse")

torch.manual_seed(0)
model = generator(32, 1, 28, 16)
loss_fn = nn.MSELoss()
opt = PreconditionedOptimizer(model, KFAC(), loss_fn=loss_fn)
rows: dict[str, list[float]] = collections.defaultdict(list)
for s in range(40):
    z, target = torch.randn(64, 32), torch.rand(64, 1, 28, 28)
    parts.clear()
    start = time.perf_counter()
    opt.zero_grad()
    with opt.record():
        loss_fn(model(z), target).backward()
    opt.step()
    elapsed = time.perf_counter() - start
    if s < 10:
        continue
    kind = "statistics step" if s % 10 == 0 else "plain step"
    rows[kind].append(elapsed)
    if s % 10 == 0:
        for key, value in parts.items():
            rows[key].append(value)
shapes = " ".join(f"{n}:{b.out_dim}x{b.in_dim}" for n, b in opt.engines[0].approx._blocks.items())
medians = " | ".join(f"{k} {1e3 * statistics.median(v):.1f}" for k, v in rows.items())
print(f"generator ({shapes}): {medians}")
