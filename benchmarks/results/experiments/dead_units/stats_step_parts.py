"""The parts of the statistics steps of KFAC and the two-term methods, 6 of them averaged.

As ``../two_term_floor/stats_step_parts.py`` (the step-time benchmark's MNIST
autoencoder on random inputs, batch 1000, ``t_cov = t_inv = 10``, one thread), but
averaged over the statistics steps 10, 20, ..., 60, and counting the float32 ``eigh``
calls that failed and were retried. Run it with the code under test first on
``PYTHONPATH``:

    PYTHONPATH=<checkout> python stats_step_parts.py
"""

import collections
import sys
import warnings
from pathlib import Path

root = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(root / "benchmarks")]
import torch  # noqa: E402

torch.set_num_threads(1)
warnings.simplefilter("ignore")
import step_time  # noqa: E402

import curvlib  # noqa: E402
import curvlib.linalg.factors as factors  # noqa: E402

attempt = factors._eigh_attempt
retries = collections.Counter()


def counted(mat, number, clamp_negative):
    if number:
        retries[current] += 1
    return attempt(mat, number, clamp_negative)


factors._eigh_attempt = counted
print("curvlib from", curvlib.__file__)
torch.manual_seed(0)
start_weights = step_time.autoencoder().state_dict()
x = torch.rand(1000, 784)
loss_fn = torch.nn.BCEWithLogitsLoss()
for current in ("KFAC", "Deflation", "KFACCorrected", "Lanczos"):
    model = step_time.autoencoder()
    model.load_state_dict(start_weights)
    opt = curvlib.PreconditionedOptimizer(
        model, getattr(curvlib, current)(), loss_fn=loss_fn, damping=1e-3, kl_clip=1e-2,
        momentum=0.9, t_cov=10, t_inv=10,
    )  # fmt: skip
    parts: dict[str, list[float]] = collections.defaultdict(list)
    for step in range(61):
        opt.zero_grad()
        with opt.record():
            loss_fn(model(x), x).backward()
        opt.step()
        if step >= 10 and step % 10 == 0:
            for key, value in opt.last_stats.items():
                if key.startswith("time_"):
                    parts[key[5:]].append(value)
    means = {k: round(1e3 * sum(v) / len(v)) for k, v in parts.items()}
    print(current, means, "ms; eigh retries over all 61 steps:", retries[current], flush=True)
