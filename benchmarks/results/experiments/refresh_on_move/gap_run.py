r"""Run a script with ``refresh_on_move`` limited to at most one refresh every GAP steps.

The rule may then fire only when at least GAP steps have passed since the last
statistics (patched into the engine of commit ``40c5248`` from outside).

    python gap_run.py GAP SCRIPT ARGS...       (from the repository root)
    python benchmarks/results/experiments/refresh_on_move/gap_run.py 5 \
        benchmarks/results/experiments/refresh_on_move/steps.py curves 0,1,2 \
        '{"warmup": 3, "refresh_on_move": 0.3}'
"""

import runpy
import sys

from curvlib.optim.engine import CurvatureEngine

GAP = int(sys.argv[1])
moved, take = CurvatureEngine._moved, CurvatureEngine._take_reference


def limited(self: CurvatureEngine) -> bool:
    last = getattr(self, "_reference_step", -GAP)
    return self.step_count - last >= GAP and moved.fget(self)


def taken(self: CurvatureEngine) -> None:
    self._reference_step = self.step_count
    take(self)


CurvatureEngine._moved = property(limited)  # type: ignore[method-assign,assignment]
CurvatureEngine._take_reference = taken  # type: ignore[method-assign]
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
