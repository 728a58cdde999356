"""KFAC refreshed also where its layers' inputs drifted: epochs to tuned Adam's final loss.

On every step a forward hook measures each ``Linear``'s mean squared input per feature
(each ``Conv2d``'s per input channel), the diagonal of the layer's input factor up to
the bias and the unfolding, and the next step folds in statistics and rebuilds the
inverse when, for some layer, that diagonal differs from its running average over the
statistics steps (the factor's own ``decay=0.5``) by ``TAU`` of its L1 norm:
``||d - d_ref||_1 / ||d_ref||_1 >= TAU``. The rule is patched into
``CurvatureEngine._moved`` (the hook ``refresh_on_move`` uses); the library does not
have it. ``TAU=100`` never fires (the library's schedule). One thread; epochs depend on
the seeds only.

    python input_drift.py TASKS SEEDS TAU
    python input_drift.py curves,digits-ae 0,1,2 0.3
"""

import sys
from pathlib import Path

root = Path(__file__).resolve().parents[4]
here = root / "benchmarks" / "results" / "experiments"
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples"), str(here / "refresh_on_move")]
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

torch.set_num_threads(1)
import convergence as cv  # noqa: E402
from steps import report  # noqa: E402

from curvlib.optim.engine import CurvatureEngine  # noqa: E402

CURRENT: dict[int, Tensor] = {}  # this step's diagonal per module
REFERENCE: dict[int, Tensor] = {}  # its running average over the statistics steps
STATS: list[int] = []
ON = [False]  # hooks measure during the KFAC runs only


def measure(module: nn.Module, inputs: tuple[Tensor, ...], _: Tensor) -> None:
    if not ON[0] or not isinstance(module, nn.Linear | nn.Conv2d):
        return
    x = inputs[0].detach()
    if isinstance(module, nn.Conv2d):
        CURRENT[id(module)] = x.square().mean(dim=(0, 2, 3))
    else:
        CURRENT[id(module)] = x.reshape(-1, x.shape[-1]).square().mean(0)


def drift() -> float:
    out = 0.0
    for key, now in CURRENT.items():
        ref = REFERENCE.get(key)
        if ref is None:
            return 0.0
        out = max(out, float((now - ref).abs().sum() / ref.abs().sum().clamp_min(1e-12)))
    return out


prepare = CurvatureEngine.prepare


def counted(self: CurvatureEngine, ahead: bool = False) -> None:
    if self.stats_due:
        STATS.append(self.step_count)
        for key, now in CURRENT.items():
            ref = REFERENCE.get(key)
            REFERENCE[key] = now.clone() if ref is None else 0.5 * ref + 0.5 * now
    prepare(self, ahead=ahead)


if __name__ == "__main__":
    tasks, seeds = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")]
    tau = float(sys.argv[3])
    torch.nn.modules.module.register_module_forward_hook(measure)
    CurvatureEngine.prepare = counted  # type: ignore[method-assign]
    CurvatureEngine._moved = property(  # type: ignore[method-assign,assignment]
        lambda self: bool(REFERENCE) and self.step_count > 0 and drift() >= tau
    )
    for name in tasks:
        task = cv.TASKS[name](False)
        for seed in seeds:
            method = cv.curvature("kfac", "x")

            def build(model: nn.Module, loss_fn: nn.Module, inner: cv.Method = method):
                ON[0] = True
                CURRENT.clear()
                REFERENCE.clear()
                return inner.build(model, loss_fn)

            ON[0] = False  # Adam runs first inside report()
            timed = cv.Method(method.name, method.config, build, method.curvature)
            report(task, seed, timed, STATS, f"drift{tau}")
