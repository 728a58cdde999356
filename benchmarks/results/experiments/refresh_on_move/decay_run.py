"""Run a script with the running average's decay per ``T`` steps instead of per update.

The weight of the old estimate becomes ``decay ** (elapsed / T)``, with ``elapsed`` the
steps since the approximation's last update (patched into the engine and the
approximations of commit ``7984e34`` from outside): refreshing more often then no
longer forgets faster.

    python decay_run.py T SCRIPT ARGS...       (from the repository root)
"""

import runpy
import sys

from curvlib.approx.base import LayerwiseApprox
from curvlib.optim.engine import CurvatureEngine

PERIOD = float(sys.argv[1])
prepare, old_weight = CurvatureEngine.prepare, LayerwiseApprox._old_weight


def timed_prepare(self: CurvatureEngine) -> None:
    if self.stats_due:
        last = getattr(self, "_last_update_step", None)
        self.approx._elapsed = None if last is None else self.step_count - last  # type: ignore[attr-defined]
        self._last_update_step = self.step_count
    prepare(self)


def per_step(self: LayerwiseApprox, num_samples: int) -> float:
    elapsed = getattr(self, "_elapsed", None)
    if elapsed is None or self.decay == 1.0:
        return old_weight(self, num_samples)
    return min(1.0 - 1.0 / (self.num_updates + 1), self.decay ** (elapsed / PERIOD))


CurvatureEngine.prepare = timed_prepare  # type: ignore[method-assign]
LayerwiseApprox._old_weight = per_step  # type: ignore[method-assign]
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
