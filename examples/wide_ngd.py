"""Natural gradient on a wide network: the figure of Karakida & Osawa (NeurIPS 2020).

A 3-layer ReLU MLP (width 4096 by default, He initialisation, zero biases) is
fitted with the squared error to one-hot targets of N = 100 real 8x8 digit
images of two classes (scikit-learn's bundled ``load_digits``), full batch, in
float64. Gradient descent and the undamped function-space natural gradient of
three Fisher approximations, each at its optimal learning rate
(``curvlib.approx.optimal_learning_rate``), are compared over a few steps:

* ``gd``: gradient descent at learning rate ``1 / lambda_max(Theta)`` of the
  initial kernel (the largest step that overshoots no direction of the
  linearised model);
* ``exact``: the full Fisher, learning rate 1;
* ``block_diagonal``: one block per layer, learning rate 1/L = 1/3;
* ``block_tridiagonal``: neighbouring layers coupled, learning rate
  1/(1^T T^-1 1) = 1 for three layers;
* ``kfac`` (on request, ``--methods``): K-FAC's Kronecker factors of the batch
  inverted in sample space, learning rate 1/(N (L - 1) + 1). Its isotropy needs
  a regular input kernel, so inputs of dimension at least N - 1: the 64 pixels
  of the digits fall short at N = 100 (the first layer moves the outputs by
  less), use ``--num-samples 64`` or fewer;
* ``unit_wise`` (on request): one block per unit, each solved in its own
  2N x 2N kernel, learning rate 1/(gamma (L - 1) M / K + 1) with half the
  ReLU units active (gamma = 1/2) and K = 2 outputs. Its kernels take
  8 M (2N)^2 bytes per hidden layer: use ``--num-samples 40`` at width 4096.
  Units whose derivative to the output nearly vanishes get very long
  undamped steps; if the loss does not follow, ``--damping 1e-6`` caps them.

The natural-gradient steps are ``Delta theta = U^T (Theta + rho I)^-1 r`` with
the empirical NTK ``Theta = U U^T`` (``curvlib.approx.function_space_direction``)
at ``rho = --damping`` (0 by default, the paper's setting). Writes
``wide_ngd.png`` (training loss against step, log scale), ``wide_ngd.csv``,
``wide_ngd.json`` (with the command and the date) and prints a table.

    python examples/wide_ngd.py --width 4096 --out runs/wide_ngd
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from curvlib import CurvatureExtractor, FisherType, StatKind
from curvlib.approx import (
    FunctionSpaceForm,
    function_space_direction,
    optimal_learning_rate,
)
from curvlib.approx.wide import sample_rows
from curvlib.core import CurvatureStatistics
from curvlib.extract.residual import sample_space_residual

METHODS = ("gd", "exact", "block_diagonal", "block_tridiagonal", "kfac", "unit_wise")
DEFAULT_METHODS = METHODS[:4]
"""The figure's methods; ``kfac`` and ``unit_wise`` run on request (``--methods``)."""
RELU_ACTIVE_FRACTION = 0.5
"""The fraction of ReLU units active on a sample at He initialisation with zero biases."""


def digits_two_classes(
    num_samples: int, classes: tuple[int, int], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``num_samples`` digit images of two classes (half each), standardised, one-hot targets.

    Features are standardised over the chosen images (constant pixels become 0)
    and every image is scaled to norm sqrt(64), the scale He initialisation
    assumes.
    """
    digits = load_digits()
    images = torch.tensor(digits.data, dtype=dtype)
    labels = torch.tensor(digits.target)
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    half = num_samples // 2
    counts = (num_samples - half, half)
    if any(len(idx) < k for idx, k in zip(per_class, counts, strict=True)):
        raise ValueError(f"load_digits has too few images of classes {classes} for {num_samples}.")
    chosen = torch.cat([idx[:k] for idx, k in zip(per_class, counts, strict=True)])
    x = images[chosen]
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(x.shape[1])
    y = torch.zeros(len(chosen), 2, dtype=dtype)
    y[torch.arange(len(chosen)), (labels[chosen] == classes[1]).long()] = 1.0
    return x, y


def wide_mlp(in_dim: int, width: int, seed: int, dtype: torch.dtype) -> nn.Sequential:
    """Linear-ReLU-Linear-ReLU-Linear at He initialisation with zero biases.

    Drawn in float64 and then cast, so that every dtype starts from the same weights.
    """
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2)
    ).double()
    for index, layer in enumerate([model[0], model[2], model[4]]):
        gain = 2.0 if index < 2 else 1.0
        nn.init.normal_(layer.weight, std=math.sqrt(gain / layer.in_features))
        nn.init.zeros_(layer.bias)
    return model.to(dtype)


def train(
    method: str, x: Tensor, y: Tensor, args: argparse.Namespace, dtype: torch.dtype
) -> list[float]:
    """The training loss before each step and after the last, for one method."""
    model = wide_mlp(x.shape[1], args.width, args.seed, dtype)
    loss_fn = nn.MSELoss()
    extractor = CurvatureExtractor(
        model, loss_fn, stats={StatKind.PER_SAMPLE_IO}, fisher_type=FisherType.EXACT
    )
    layers = {layer.name: layer for layer in extractor.layout.layers}
    losses: list[float] = []
    gd_lr: float | None = None
    for _ in range(args.steps):
        model.zero_grad()
        with extractor.collect():
            output = model(x)
            loss = loss_fn(output, y)
            loss.backward()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
        residual = sample_space_residual(loss_fn, output, y)
        stats = extractor.statistics()
        if method == "gd":
            if gd_lr is None:
                gd_lr = 1.0 / top_kernel_eigenvalue(stats)
            step = {name: layer.grad_matrix() for name, layer in layers.items()}
            lr = gd_lr
        else:
            form = FunctionSpaceForm(method)
            step = function_space_direction(stats, residual.residual, args.damping, form)
            lr = learning_rate(form, args)
        with torch.no_grad():
            for name, layer in layers.items():
                weight, bias = layer.from_matrix(step[name])
                layer.weight.sub_(lr * weight)
                if bias is not None and layer.bias is not None:
                    layer.bias.sub_(lr * bias)
    with torch.no_grad():
        losses.append(float(loss_fn(model(x), y)))
    return losses


def learning_rate(form: FunctionSpaceForm, args: argparse.Namespace) -> float:
    """The form's optimal learning rate on the example's 3-layer MLP with two outputs."""
    return optimal_learning_rate(
        form,
        num_layers=3,
        num_samples=args.num_samples,
        width=args.width,
        active_fraction=RELU_ACTIVE_FRACTION,
        num_outputs=2,
    )


def top_kernel_eigenvalue(stats: CurvatureStatistics) -> float:
    """``lambda_max`` of the empirical NTK ``Theta = U U^T`` of the statistics."""
    grams = [rows.gram() for rows in sample_rows(stats).values()]
    return float(torch.linalg.eigvalsh(torch.stack(grams).sum(0))[-1])


def commit() -> str:
    """The curvlib commit the example runs from, or ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def write_outputs(results: dict[str, list[float]], args: argparse.Namespace, out: Path) -> None:
    """PNG, CSV and JSON of the losses, with the command, date and commit."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "wide_ngd.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "step", "loss"])
        for method, losses in results.items():
            writer.writerows([method, step, f"{loss:.6e}"] for step, loss in enumerate(losses))
    meta = {
        "command": "python examples/wide_ngd.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "learning_rates": {
            m: learning_rate(FunctionSpaceForm(m), args) for m in results if m != "gd"
        },
        "losses": results,
    }
    (out / "wide_ngd.json").write_text(json.dumps(meta, indent=2))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method, losses in results.items():
        ax.semilogy(range(len(losses)), losses, marker="o", markersize=3, label=method)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (MSE)")
    ax.set_title(f"width {args.width}, N = {args.num_samples}, damping {args.damping:g}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "wide_ngd.png", dpi=120)
    plt.close(fig)


def table(results: dict[str, list[float]]) -> str:
    """Initial loss, loss after one step and after the last step, per method."""
    lines = [f"{'method':18s} {'initial':>10s} {'step 1':>10s} {'final':>10s} {'1-step gain':>12s}"]
    for method, losses in results.items():
        gain = losses[0] / losses[1] if len(losses) > 1 and losses[1] > 0 else float("nan")
        lines.append(
            f"{method:18s} {losses[0]:10.3e} {losses[min(1, len(losses) - 1)]:10.3e} "
            f"{losses[-1]:10.3e} {gain:11.1f}x"
        )
    return "\n".join(lines)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096, help="hidden width (default 4096)")
    parser.add_argument("--num-samples", type=int, default=100, help="training images")
    parser.add_argument("--steps", type=int, default=8, help="training steps per method")
    parser.add_argument("--damping", type=float, default=0.0, help="rho of the NTK solve")
    parser.add_argument("--classes", type=int, nargs=2, default=(0, 1), help="two digits")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated subset of {', '.join(METHODS)}",
    )
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/wide_ngd"))
    args = parser.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, list[float]]:
    args = parse(argv)
    dtype = getattr(torch, args.dtype)
    x, y = digits_two_classes(args.num_samples, tuple(args.classes), dtype)
    results = {method: train(method, x, y, args, dtype) for method in args.methods.split(",")}
    write_outputs(results, args, args.out)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
