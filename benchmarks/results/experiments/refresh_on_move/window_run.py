r"""Run a script with ``refresh_on_move`` active only on the first WINDOW steps.

After step WINDOW the curvature is refreshed on the regular schedule only
(patched into the engine from outside).

    python window_run.py WINDOW SCRIPT ARGS...       (from the repository root)
    python benchmarks/results/experiments/refresh_on_move/window_run.py 50 \
        benchmarks/results/experiments/refresh_on_move/steps.py curves 0,1,2 \
        '{"warmup": 3, "refresh_on_move": 0.3}'
"""

import runpy
import sys

from curvlib.optim.engine import CurvatureEngine

WINDOW = int(sys.argv[1])
moved = CurvatureEngine._moved


def windowed(self: CurvatureEngine) -> bool:
    return self.step_count < WINDOW and moved.fget(self)


CurvatureEngine._moved = property(windowed)  # type: ignore[method-assign,assignment]
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
