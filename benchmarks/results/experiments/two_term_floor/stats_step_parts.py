"""Where KFAC's and the two-term methods' statistics steps go on the MNIST autoencoder.

The step-time benchmark's network and settings (random data, batch 1000, damping
1e-3, KL clip 1e-2, momentum 0.9, ``t_cov = t_inv = 10``), one thread; the parts of
``opt.last_stats`` on statistics steps 20 and 30, averaged. (``step_time.py`` prints
the same parts averaged over whole windows, plain steps included.)

    python stats_step_parts.py
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

torch.manual_seed(0)
start_weights = step_time.autoencoder().state_dict()
x = torch.rand(1000, 784)
loss_fn = torch.nn.BCEWithLogitsLoss()
for name in ("KFAC", "Deflation", "KFACCorrected", "Lanczos"):
    model = step_time.autoencoder()
    model.load_state_dict(start_weights)
    opt = curvlib.PreconditionedOptimizer(
        model, getattr(curvlib, name)(), loss_fn=loss_fn, damping=1e-3, kl_clip=1e-2,
        momentum=0.9, t_cov=10, t_inv=10,
    )  # fmt: skip
    parts: dict[str, list[float]] = collections.defaultdict(list)
    for step in range(31):
        opt.zero_grad()
        with opt.record():
            loss_fn(model(x), x).backward()
        opt.step()
        if step in (20, 30):
            for key, value in opt.last_stats.items():
                if key.startswith("time_"):
                    parts[key[5:]].append(value)
    print(name, {k: round(1e3 * sum(v) / len(v)) for k, v in parts.items()}, "ms")
