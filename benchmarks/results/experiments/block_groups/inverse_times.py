"""Default KFAC's inverse alone, on the factors of 41 training steps, per task.

KFAC trains 41 steps at the library defaults on the task's batches; its
``inverse`` at the last damping is then timed alone (median of 40 calls after
5 untimed, ms, 2 threads; the cache of the input factors' groups
cleared before each, as a statistics step's new factors find it), and so is
``independent_blocks`` on every input factor it looks at (those of at least
``MIN_BLOCKWISE_SIZE`` rows). ``ROOT``
picks the checkout whose benchmarks and examples are used (``PYTHONPATH`` the
library).

    python inverse_times.py TASK [TASK ...]
"""

import os
import statistics
import sys
import time
import warnings
from pathlib import Path

root = Path(os.environ.get("ROOT", Path(__file__).resolve().parents[4]))
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples")]
import torch  # noqa: E402

torch.set_num_threads(2)
warnings.simplefilter("ignore")
import convergence as cv  # noqa: E402

from curvlib import KFAC, PreconditionedOptimizer  # noqa: E402
from curvlib.linalg import factors  # noqa: E402


def median_ms(fn: object, calls: int = 40) -> float:
    for _ in range(5):
        fn()  # type: ignore[operator]
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(name: str) -> str:
    """The line of one task: the inverse and the group search, in ms."""
    task = cv.TASKS[name](False)
    bs, batches = task.batch_size, len(task.inputs) // task.batch_size
    torch.manual_seed(0)
    model = task.make_model()
    approx = KFAC()
    opt = PreconditionedOptimizer(model, approx, loss_fn=task.loss_fn)
    for s in range(41):
        i = s % batches
        x, y = task.inputs[i * bs : (i + 1) * bs], task.targets[i * bs : (i + 1) * bs]
        opt.zero_grad()
        with opt.record():
            task.loss_fn(model(x), y).backward()
        opt.step()
    damping = opt.engine.damping

    def fresh_inverse() -> None:
        for block in approx._blocks.values():
            block._blocks_of = None  # found once per new factor, as in training
        approx.inverse(damping)

    large = [b.A for b in approx._blocks.values() if b.A.shape[0] >= factors.MIN_BLOCKWISE_SIZE]
    inverse = median_ms(fresh_inverse)
    groups = median_ms(lambda: [factors.independent_blocks(a) for a in large])
    sizes = ", ".join(str(a.shape[0]) for a in large)
    return f"{name}: inverse {inverse:.2f} ms | independent_blocks of A ({sizes}) {groups:.2f} ms"


for name in sys.argv[1:]:
    print(measure(name))
