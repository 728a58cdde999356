"""What float32 can do for the undamped natural gradient of a wide network.

On the network and data of ``examples/wide_ngd.py`` (3-layer ReLU MLP, He
initialisation, N digit images of two classes, MSE) this compares the float32
function-space directions at damping 0 (exact, block-diagonal,
block-tridiagonal) and the float32 parameter-space exact natural gradient
(Woodbury, ``ExactNaturalGradient``) at small dampings, each against the same
computation in float64 from the same weights and data. Prints a table and
writes ``wide_float32.json`` with the machine, commit and command.

    python benchmarks/wide_float32.py --width 1024 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from curvlib import CurvatureExtractor, FisherType, StatKind
from curvlib.approx import ExactNaturalGradient, FunctionSpaceForm, function_space_direction
from curvlib.approx.wide import sample_rows
from curvlib.extract.residual import sample_space_residual

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import wide_ngd
from _harness import command, commit, machine, write_json

DAMPINGS = (1e-4, 1e-6, 1e-8)


def _flat(step: dict[str, Tensor]) -> Tensor:
    return torch.cat([v.flatten().double() for v in step.values()])


def directions(width: int, num_samples: int, dtype: torch.dtype) -> dict[str, Tensor | float]:
    """Every direction of one dtype, and the kernel's condition number."""
    x, y = wide_ngd.digits_two_classes(num_samples, (0, 1), torch.float64)
    x, y = x.to(dtype), y.to(dtype)
    model = wide_ngd.wide_mlp(x.shape[1], width, 0, dtype)
    loss_fn = nn.MSELoss()
    extractor = CurvatureExtractor(
        model, loss_fn, stats={StatKind.PER_SAMPLE_IO}, fisher_type=FisherType.EXACT
    )
    with extractor.collect():
        output = model(x)
        loss_fn(output, y).backward()
    stats = extractor.statistics()
    residual = sample_space_residual(loss_fn, output, y).residual
    out: dict[str, Tensor | float] = {
        f"function space {form.value}, damping 0": _flat(
            function_space_direction(stats, residual, 0.0, form)
        )
        for form in FunctionSpaceForm
    }
    exact = ExactNaturalGradient()
    exact.update(stats)
    grads = {layer.name: layer.grad_matrix() for layer in extractor.layout.layers}
    for damping in DAMPINGS:
        out[f"parameter space exact, damping {damping:g}"] = _flat(
            exact.inverse(damping).apply(grads)
        )
    kernel = torch.stack([rows.gram() for rows in sample_rows(stats).values()]).sum(0).double()
    values = torch.linalg.eigvalsh(kernel)
    out["cond"] = float(values[-1] / values[0])
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    reference = directions(args.width, args.num_samples, torch.float64)
    single = directions(args.width, args.num_samples, torch.float32)
    errors: dict[str, float] = {}
    for name, value in single.items():
        ref = reference[name]
        if isinstance(value, Tensor) and isinstance(ref, Tensor):
            errors[name] = float((value - ref).norm() / ref.norm())
    print(f"cond(Theta) = {reference['cond']:.2e}; relative error of float32 against float64:")
    for name, err in errors.items():
        print(f"  {name:45s} {err:9.2e}")
    write_json(
        args.out / "wide_float32.json",
        {
            "machine": machine(),
            "commit": commit(),
            "command": command(argv),
            "width": args.width,
            "num_samples": args.num_samples,
            "cond_theta": reference["cond"],
            "relative_errors": errors,
        },
    )
    return errors


if __name__ == "__main__":
    main()
