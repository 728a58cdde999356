"""The movement rule as first tried, on the library's engine from outside (no warm-up).

Epochs to tuned Adam's final loss (Adam at 3e-3, the tuned rate of every task) and
the statistics steps before them, KFAC at the optimizer's defaults with the engine's
warm-up replaced by the rule: statistics and inverses at step 0, every ``t_cov`` and
``t_inv`` steps, and on any step where some layer's ``[W | b]`` has moved by
``TAU`` of its norm since the last statistics. ``TAU = 0`` keeps the library's
schedule of the commit it runs on (the files here: ``warmup=10``, commit ``1a44f1f``).
One thread; epochs depend on the seeds only.

    python prototype.py TASKS SEEDS TAU [KWARGS_JSON]     (from this folder or by path)
    python prototype.py curves,digits-ae 0,1,2 0.3 '{"t_cov": 20, "t_inv": 20}'
"""

import json
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples")]
import torch  # noqa: E402

torch.set_num_threads(1)
import convergence as cv  # noqa: E402
from steps import report  # noqa: E402

from curvlib.optim.engine import CurvatureEngine  # noqa: E402

tasks, seeds = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")]
tau = float(sys.argv[3])
kwargs = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
STATE: dict = {}
library_rule = CurvatureEngine._warming_up


def weights() -> list[torch.Tensor]:
    return [
        m.weight.detach().flatten()
        if m.bias is None
        else torch.cat([m.weight.detach().flatten(), m.bias.detach()])
        for m in STATE["layers"]
    ]


def moved(self: CurvatureEngine) -> bool:
    k = self.step_count
    if STATE.get("k") == k:
        return STATE["v"]
    distance = 0.0
    if STATE.get("ref") is not None:
        distance = max(
            float((w - r).norm() / r.norm()) for w, r in zip(weights(), STATE["ref"], strict=True)
        )
    v = library_rule.fget(self) if tau == 0 else (k == 0 or distance >= tau)
    if v or k % self.t_cov == 0:
        STATE["ref"] = [w.clone() for w in weights()]
        STATE["stats"].append(k)
    STATE["k"], STATE["v"] = k, v
    return v


CurvatureEngine._warming_up = property(moved)  # type: ignore[method-assign]
for name in tasks:
    task = cv.TASKS[name](False)
    for seed in seeds:
        STATE.clear()
        STATE["stats"] = []
        method = cv.curvature("kfac", "x", **kwargs)

        def build(model: torch.nn.Module, loss_fn: torch.nn.Module, make=method.build):
            kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)
            STATE["layers"] = [m for m in model.modules() if isinstance(m, kinds)]
            return make(model, loss_fn)

        report(task, seed, cv.Method(method.name, method.config, build, True), STATE["stats"], tau)
