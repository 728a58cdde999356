"""The factors' Gram matrices with zero columns left out (``factor_gram``) against whole.

The inputs of default KFAC's statistics steps on the CNN and the ReLU autoencoder
(captured after 30 steps), multiplied with ``gram`` and with ``factor_gram``; best
of 30 in ms, 2 threads. The CNN's third convolution sees a 2x2 image through a
5x5 kernel (padding 2): 512 of its 801 input columns are zero in every row.

    python zero_columns.py
"""

import sys
import time
import warnings
from pathlib import Path

root = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples")]
import torch  # noqa: E402

torch.set_num_threads(2)
warnings.simplefilter("ignore")
import convergence as cv  # noqa: E402

import curvlib.extract._session as session  # noqa: E402
from curvlib import KFAC, PreconditionedOptimizer  # noqa: E402
from curvlib.linalg.factors import factor_gram, gram, gram_blocks  # noqa: E402

captured: dict[str, torch.Tensor] = {}
statistics_of = session.layer_statistics


def capture(layer, inputs, *args, **kwargs):  # type: ignore[no-untyped-def]
    captured[layer.name] = inputs.detach().reshape(-1, inputs.shape[-1]).clone()
    return statistics_of(layer, inputs, *args, **kwargs)


session.layer_statistics = capture


def best(fn, rounds: int = 30) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


for name in ("digits-cnn", "digits-ae"):
    task = cv.TASKS[name](False)
    torch.manual_seed(0)
    model = task.make_model()
    opt = PreconditionedOptimizer(model, KFAC(), loss_fn=task.loss_fn)
    bs, batches = task.batch_size, len(task.inputs) // task.batch_size
    for s in range(31):
        i = s % batches
        x, y = task.inputs[i * bs : (i + 1) * bs], task.targets[i * bs : (i + 1) * bs]
        opt.zero_grad()
        with opt.record():
            task.loss_fn(model(x), y).backward()
        opt.step()
    for layer, a in captured.items():
        zero = int(a.eq(0).all(0).sum())
        whole = best(lambda a=a: gram(a, gram_blocks(a)))
        parts = best(lambda a=a: factor_gram(a))
        print(f"{name} layer {layer} {tuple(a.shape)}, {zero} zero columns: "
              f"gram {whole:.3f} ms, factor_gram {parts:.3f} ms")  # fmt: skip
    captured.clear()
