"""KFAC with steps undone where the next batch's loss jumped: epochs to tuned Adam's final loss.

Default KFAC's batch losses on the ReLU autoencoder jump now and then while it leaves
the mean-image plateau (``loss_trace.py``). Here a wrapper reads each step's loss (a forward hook
on the loss module) and, where it exceeds ``RHO`` times a running average of the
accepted steps' losses (weight 0.3 on the newest), undoes the previous step: the weights
go back to where they were before it, the momentum buffers are zeroed and the step is
taken with zero gradients (so the statistics of a statistics step are still folded in);
``SHRINK < 1`` also multiplies the KL clip by it, recovering by ``SHRINK**-0.25`` per
accepted step up to the default. The library does not do this. One thread; epochs
depend on the seeds only.

    python undo_spikes.py TASKS SEEDS RHO [SHRINK]
    python undo_spikes.py digits-ae 0,1,2 1.3
"""

import sys
from pathlib import Path
from typing import Any

root = Path(__file__).resolve().parents[4]
here = root / "benchmarks" / "results" / "experiments"
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples"), str(here / "refresh_on_move")]
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

torch.set_num_threads(1)
import convergence as cv  # noqa: E402
from steps import report  # noqa: E402

from curvlib.optim.engine import CurvatureEngine  # noqa: E402


class UndoSpikes:
    """The optimizer, with the previous step undone where this step's loss jumped."""

    def __init__(self, opt: Any, model: nn.Module, loss_fn: nn.Module, rho: float, shrink: float):
        self.opt, self.model, self.rho, self.shrink = opt, model, rho, shrink
        self.params = list(model.parameters())
        self.before: list[Tensor] | None = None  # the weights before the previous step
        self.average: float | None = None
        self.loss = 0.0
        self.undone = 0
        self.clip = opt.kl_clip
        loss_fn.register_forward_hook(self._read)

    def _read(self, _: nn.Module, __: Any, out: Tensor) -> None:
        if self.model.training and torch.is_grad_enabled():
            self.loss = float(out)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.opt, name)

    def zero_grad(self) -> None:
        """The optimizer's."""
        self.opt.zero_grad()

    def record(self) -> Any:
        """The optimizer's."""
        return self.opt.record()

    def step(self) -> None:
        """Undo the previous step where this one's loss jumped, else step."""
        spike = self.average is not None and self.before is not None
        if spike and self.loss > self.rho * self.average:
            self.undone += 1
            for p in self.params:
                assert p.grad is not None
                p.grad.zero_()
                buffer = self.opt.state.get(p, {}).get("momentum_buffer")
                if buffer is not None:
                    buffer.zero_()
            self.opt.step()
            with torch.no_grad():
                for p, old in zip(self.params, self.before, strict=True):
                    p.copy_(old)
            self.opt.kl_clip *= self.shrink
            self.before = None
            return
        self.average = self.loss if self.average is None else 0.7 * self.average + 0.3 * self.loss
        self.before = [p.detach().clone() for p in self.params]
        self.opt.step()
        self.opt.kl_clip = min(self.clip, self.opt.kl_clip / self.shrink**0.25)


if __name__ == "__main__":
    tasks, seeds = sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")]
    rho = float(sys.argv[3])
    shrink = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
    STATS: list[int] = []
    RUNS: list[UndoSpikes] = []
    prepare = CurvatureEngine.prepare

    def counted(self: CurvatureEngine, ahead: bool = False) -> None:
        if self.stats_due:
            STATS.append(self.step_count)
        prepare(self, ahead=ahead)

    CurvatureEngine.prepare = counted  # type: ignore[method-assign]
    for name in tasks:
        task = cv.TASKS[name](False)
        for seed in seeds:
            method = cv.curvature("kfac", "x")

            def build(model: nn.Module, loss_fn: nn.Module, inner: cv.Method = method) -> Any:
                RUNS.append(UndoSpikes(inner.build(model, loss_fn), model, loss_fn, rho, shrink))
                return RUNS[-1]

            wrapped = cv.Method(method.name, method.config, build, method.curvature)
            report(task, seed, wrapped, STATS, f"rho{rho}")
            print("   undone", RUNS[-1].undone, flush=True)
