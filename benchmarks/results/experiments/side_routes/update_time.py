"""KPSVD's update on the first batch of the convergence benchmark's convolutional tasks.

One thread; the statistics of the first 100 images (the MC Fisher, seed 0) are
extracted once and ``KPSVD().update`` is timed five times on them (median), with
the form and, for the layers in sample space with several positions, the route of
each side. Then one Gram product of the digits CNN's second convolution's output
side each way.

    python update_time.py          (from this folder or by path; on a checkout from
                                    before the routes, only the update times)
"""

import inspect
import statistics
import sys
import time
import warnings
from pathlib import Path

root = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples")]
import torch  # noqa: E402

torch.set_num_threads(1)
import convergence as cv  # noqa: E402

from curvlib import KPSVD  # noqa: E402
from curvlib.extract import CurvatureExtractor  # noqa: E402
from curvlib.linalg.sample_space import SampleSpaceFisher  # noqa: E402

warnings.simplefilter("ignore")
ROUTES = "route" in inspect.signature(SampleSpaceFisher).parameters
"""Whether this checkout has the per-side routes (the script also runs on commits before them)."""


def median_ms(fn, repeat: int = 5) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


for name in ("digits-cnn", "digits-convae"):
    task = cv.TASKS[name](False)
    torch.manual_seed(0)
    model = task.make_model()
    extractor = CurvatureExtractor(model, task.loss_fn, stats=KPSVD.required_stats, seed=0)
    with extractor.collect():
        task.loss_fn(model(task.inputs[:100]), task.targets[:100]).backward()
    stats = extractor.statistics()
    approx = KPSVD()
    update_ms = median_ms(lambda stats=stats: KPSVD().update(stats))
    print(f"{name}: KPSVD update {update_ms:.1f} ms")
    approx.update(stats)
    for layer, (form, iterations) in approx.last_products().items():
        io = stats[layer].io
        assert io is not None
        routes = ""
        if ROUTES and form.value == "sample_space" and io.inputs.shape[1] > 1:
            routes = " routes " + "/".join(r.value for r in SampleSpaceFisher(io).routes)
        print(f"  layer {layer}: {tuple(io.output_grads.shape)} x {io.inputs.shape[-1]}, "
              f"{form.value}, {iterations} products{routes}")  # fmt: skip
    if ROUTES and name == "digits-cnn":
        io = stats["3"].io
        assert io is not None
        coef = torch.randn(io.inputs.shape[0] * io.inputs.shape[1] ** 2, dtype=torch.float64)
        for route in ("gram", "features"):
            op = SampleSpaceFisher(io, route=route)
            product_ms = median_ms(lambda op=op, coef=coef: op.metric_out(coef), 10)
            print(f"  layer 3, output side through its {route}: {product_ms:.2f} ms a product")
