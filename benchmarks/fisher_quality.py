r"""How close each Kronecker approximation is to the exact Fisher block along an Adam run.

Run from the repository root::

    python benchmarks/fisher_quality.py                    # the default configuration
    python benchmarks/fisher_quality.py --fisher mc        # Monte-Carlo statistics instead
    python benchmarks/fisher_quality.py --layer enc4       # the 100->50 layer (slow: 5050 params)
    python benchmarks/fisher_quality.py --quick --out tmp  # tiny smoke-test configuration

**What.** The comparison of Koroko et al. (2023, the KPSVD paper): the relative
Frobenius error $\lVert F - C\rVert_F / \lVert F\rVert_F$ and the relative
spectrum error $\lVert\lambda(F) - \lambda(C)\rVert_2 / \lVert\lambda(F)\rVert_2$
(sorted eigenvalues; the definitions of
[`curvlib.approx.diagnostics`][curvlib.approx.diagnostics]) of KFAC, EKFAC,
KPSVD, KFAC-corrected, Deflation and Lanczos, and of the diagonal of the
Fisher as a reference point, on one layer of the CURVES autoencoder, at
checkpoints along an Adam run. Expected: KFAC worst of the Kronecker methods,
EKFAC below KFAC, Deflation (= Lanczos) best.

**How.**

* Network: the CURVES autoencoder of Hinton & Salakhutdinov (2006),
  784-400-200-100-50-25-6 mirrored to 6-25-50-100-200-400-784, ``nn.Linear``
  layers named ``enc1`` ... ``enc6`` (``enc6`` is the linear 25->6 code layer) and
  ``dec1`` ... ``dec6`` (``dec6`` gives the 784 logits), ``--activation`` (ReLU by
  default) after every other layer; Glorot-uniform weights with the
  activation's gain (gain 1 for the two linear layers), zero biases.
  ``BCEWithLogitsLoss`` of the logits against the images.
* Data: ``--num-train`` CURVES images from
  [`generate_curves`][curvlib.data.curves.generate_curves] with ``--seed``.
* Training: Adam (``--lr`` 1e-3) for ``--steps`` steps of ``--batch-size``
  images drawn without replacement (reshuffled every epoch), float32.
* Checkpoints: at step 0 and every ``--every`` steps, the first
  ``--eval-batch`` images of the training set (the same images every time) go
  through a float64 copy of the network inside a
  [`CurvatureExtractor`][curvlib.extract.CurvatureExtractor] with
  ``include=[--layer]``, ``stats={KRONECKER, PER_SAMPLE_IO, DIAGONAL}`` and
  ``fisher_type=--fisher``: ``exact`` backpropagates all 784 columns of the loss
  Hessian's square root per image (the type-2 Fisher / GGN of the batch),
  ``mc`` ``--mc-samples`` sampled columns. **Everything is float64**: the
  statistics (extracted from the float64 copy), the exact block, the fitted
  approximations (``dtype=torch.float64``) and the eigenvalues.
* The exact block is the Fisher of exactly those statistics,
  $F = \frac1N\sum_{k,n} \operatorname{vec}(g_{kn}\bar a_n^\top)
  \operatorname{vec}(g_{kn}\bar a_n^\top)^\top = \frac1N\sum_n G_n\otimes A_n$
  with $G_n = \sum_k g_{kn}g_{kn}^\top$, $A_n = \bar a_n\bar a_n^\top$: one GEMM
  over samples. [`exact_block`][curvlib.approx.diagnostics.exact_block] forms
  the $K N$ per-sample gradients instead, which for ``exact`` ($K = 784$) costs
  $KNP^2$ flops and $KNP$ memory (12 s and 2 GB for ``enc5`` at $N = 256$;
  16 GB for ``enc4``). So the benchmark uses the GEMM and checks it against
  ``exact_block`` on the first 16 images at every checkpoint (column
  ``exact_block_check`` of the JSON: relative Frobenius difference).
* Each method is a fresh approximation fitted with **one** ``update`` on the
  statistics of the checkpoint (default ``tol``/``max_iter``), so it is that
  batch's own estimate, with no running average. Its dense block comes from
  ``to_dense``; the errors are those of
  [`block_error`][curvlib.approx.diagnostics.block_error], computed with the
  exact block's eigenvalues shared between the methods (one ``eigvalsh`` per
  matrix instead of two per method; the smoke test checks the equality).

**Why this layer.** ``--layer enc5`` (50->25, $25 \times 51 = 1275$
parameters) by default: a middle layer next to the code layer, wide enough
($d_o \ne d_i$, both > 20) for the Kronecker structure to matter, and small
enough for dense float64 blocks: one ``eigvalsh`` of 1275 x 1275 takes about
0.15 s single-threaded, so a checkpoint costs about 15 s, dominated by the
``exact`` extraction and the power iterations. The 100->50 layer ``enc4``
(5050 parameters) takes 8 s per ``eigvalsh`` single-threaded (about 30 s with
two threads on the loaded machine), six per checkpoint, plus 10 to 20 s of
fitting: about 10 minutes for the default run. Any layer name works with
``--layer``.

**Expected orderings.** For the batch's own statistics, the Frobenius errors
satisfy KPSVD $\le$ KFAC (KFAC's product is one candidate of KPSVD's
minimisation), EKFAC $\le$ KFAC (EKFAC is the best matrix diagonal in KFAC's
eigenbasis, KFAC one of them), Deflation $\le$ KPSVD (adding a second term
cannot hurt), KFAC-corrected $\le$ KFAC (likewise), and Deflation $=$ Lanczos (same
minimiser), up to the restriction to symmetric factors (not binding for the top
pair of a PSD block) and the iterations' tolerance. The spectrum errors have no
such guarantee. Both are checked at every checkpoint with a relative slack of
``--slack`` and every violation is reported.

**Threads.** ``--threads 1`` by default: on the 2 shared cores this was
developed on (load average 4 to 7 from other jobs), MKL's two-threaded
``eigvalsh`` took 1.3 s for a 156 x 156 matrix and 1.7 s for 1275 x 1275,
against 1 ms and 0.18 s single-threaded, and the extraction and the fits were
also faster on one thread. Runtimes are those of a shared machine: the
per-phase split is in the JSON (``seconds``).

**Outputs.** The table is printed and written to
``benchmarks/results/fisher_quality.{json,md,png}`` (or to ``--out DIR``); the
PNG has two panels, Frobenius and spectrum error against the step, one line per
method, log scale. ``--quick`` (a few steps, a small evaluation batch and, unless
``--layer`` is given, the 156-parameter code layer ``enc6``) writes nothing
unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import math
import shlex
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness

from curvlib.approx import (
    EKFAC,
    KFAC,
    KPSVD,
    Deflation,
    Diagonal,
    KFACCorrected,
    Lanczos,
    LayerwiseApprox,
    exact_block,
)
from curvlib.core import FisherType, StatKind
from curvlib.core.stats import LayerStatistics, PerSampleIO
from curvlib.data import generate_curves
from curvlib.extract import CurvatureExtractor

WIDTHS = (784, 400, 200, 100, 50, 25, 6)
"""Encoder widths of the CURVES autoencoder, input first, code last."""

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_LAYER = "enc5"
QUICK_LAYER = "enc6"
MAX_ITER = 100
"""``max_iter`` of the power-iteration methods (their default)."""
KPSVD_TOL = 1e-6
"""KPSVD's ``tol`` here: its default before it became $10^{-2}$, and the two-term
methods' default (which they keep); the table compares the fits, not their cost."""
CHECK_SAMPLES = 16
"""Images on which the GEMM exact block is checked against ``exact_block``."""

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}

METHODS: dict[str, Callable[[], LayerwiseApprox]] = {
    "KFAC": lambda: KFAC(dtype=torch.float64),
    "EKFAC": lambda: EKFAC(dtype=torch.float64),
    "KPSVD": lambda: KPSVD(tol=KPSVD_TOL, max_iter=MAX_ITER, dtype=torch.float64),
    "KFAC-corrected": lambda: KFACCorrected(max_iter=MAX_ITER, dtype=torch.float64),
    "Deflation": lambda: Deflation(max_iter=MAX_ITER, dtype=torch.float64),
    "Lanczos": lambda: Lanczos(dtype=torch.float64),
    "Diagonal": lambda: Diagonal(dtype=torch.float64),
}
"""The compared approximations, in the order of the table; default settings, float64."""


STYLES: dict[str, dict[str, Any]] = {
    "KFAC": {"color": "tab:red", "marker": "o"},
    "EKFAC": {"color": "tab:purple", "marker": "v"},
    "KPSVD": {"color": "tab:blue", "marker": "s"},
    "KFAC-corrected": {"color": "tab:orange", "marker": "^"},
    "Deflation": {"color": "tab:green", "marker": "D"},
    "Lanczos": {"color": "black", "marker": "x", "linestyle": "--"},
    "Diagonal": {"color": "tab:gray", "marker": ".", "linestyle": ":"},
}

RELATIONS: tuple[tuple[str, str, bool], ...] = (
    ("KPSVD", "KFAC", True),
    ("EKFAC", "KFAC", True),
    ("Deflation", "KPSVD", True),
    ("KFAC-corrected", "KFAC", True),
)
"""``(smaller, larger, guaranteed for Frobenius)``: the orderings checked at every checkpoint."""

METRICS = ("frobenius", "spectrum")


# -- model and data ---------------------------------------------------------------------------


def autoencoder(activation: str = "relu") -> nn.Sequential:
    """The CURVES autoencoder, layers ``enc1..enc6`` and ``dec1..dec6`` (module docstring)."""
    dims = [*WIDTHS, *reversed(WIDTHS[:-1])]
    names = [f"enc{i}" for i in range(1, len(WIDTHS))] + [f"dec{i}" for i in range(1, len(WIDTHS))]
    linear_only = {f"enc{len(WIDTHS) - 1}", f"dec{len(WIDTHS) - 1}"}
    gain = nn.init.calculate_gain(activation)  # type: ignore[arg-type]
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    for name, fan_in, fan_out in zip(names, dims[:-1], dims[1:], strict=True):
        linear = nn.Linear(fan_in, fan_out)
        nn.init.xavier_uniform_(linear.weight, gain=1.0 if name in linear_only else gain)
        nn.init.zeros_(linear.bias)
        modules[name] = linear
        if name not in linear_only:
            modules[f"{name}_act"] = ACTIVATIONS[activation]()
    return nn.Sequential(modules)


def layer_names() -> list[str]:
    """Names of the ``Linear`` layers, input side first."""
    return [n for n, m in autoencoder().named_modules() if isinstance(m, nn.Linear)]


# -- exact block and errors ---------------------------------------------------------------------


def fisher_block(io: PerSampleIO) -> Tensor:
    r"""$F = \frac1N\sum_n G_n \otimes A_n$ of a layer with one output position (module docstring).

    Equal to [`exact_block`][curvlib.approx.diagnostics.exact_block] of the same
    statistics (row-major $[W \mid b]$ vectorisation) at $O(N P^2)$ instead of
    $O(K N P^2)$ cost.

    Raises:
        ValueError: For statistics with several output positions (convolutions).
    """
    grads, inputs = io.output_grads, io.inputs  # [K, N, T, out], [N, T, in]
    if grads.shape[2] != 1:
        raise ValueError("fisher_block handles layers with one output position (Linear) only.")
    g, a = grads[:, :, 0], inputs[:, 0]
    n, d_out, d_in = a.shape[0], g.shape[-1], a.shape[-1]
    g_n = torch.einsum("kno,knp->nop", g, g).reshape(n, -1)
    a_n = torch.einsum("ni,nj->nij", a, a).reshape(n, -1)
    block = (g_n.T @ a_n / n).reshape(d_out, d_out, d_in, d_in)
    return block.permute(0, 2, 1, 3).reshape(d_out * d_in, d_out * d_in)


def check_fisher_block(stats: LayerStatistics, samples: int = CHECK_SAMPLES) -> float:
    """Relative Frobenius difference of ``fisher_block`` and ``exact_block`` on a few images."""
    assert stats.io is not None
    io = PerSampleIO(stats.io.inputs[:samples], stats.io.output_grads[:, :samples])
    reference = exact_block(LayerStatistics(layer=stats.layer, io=io))
    return float((fisher_block(io) - reference).norm() / reference.norm())


def eigenvalues(matrix: Tensor) -> Tensor:
    """Sorted eigenvalues of the symmetric part, as in ``block_error``."""
    return torch.linalg.eigvalsh((matrix + matrix.T) / 2)


def relative_errors(
    exact: Tensor, approx: Tensor, exact_eigenvalues: Tensor | None = None
) -> dict[str, float]:
    """The errors of ``block_error``, reusing the exact block's eigenvalues if given."""
    exact = exact.to(approx.dtype)
    eig_exact = eigenvalues(exact) if exact_eigenvalues is None else exact_eigenvalues
    eig_approx = eigenvalues(approx)
    return {
        "frobenius": float((exact - approx).norm()) / float(exact.norm()),
        "spectrum": float((eig_exact - eig_approx).norm() / eig_exact.norm()),
    }


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Config:
    """The resolved command line."""

    steps: int
    every: int
    batch_size: int
    eval_batch: int
    num_train: int
    layer: str
    fisher: str
    mc_samples: int
    activation: str
    lr: float
    seed: int
    slack: float
    threads: int
    quick: bool


@dataclass
class Timer:
    """Seconds spent per phase."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Any:
        """Add the time spent in the ``with`` block to ``phase``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def evaluate_checkpoint(model: nn.Module, x: Tensor, cfg: Config, timer: Timer) -> dict[str, Any]:
    """Errors of every method on the evaluation batch for the current weights."""
    loss_fn = nn.BCEWithLogitsLoss()
    model64 = copy.deepcopy(model).to(torch.float64)
    x64 = x.to(torch.float64)
    extractor = CurvatureExtractor(
        model64,
        loss_fn,
        stats={StatKind.KRONECKER, StatKind.PER_SAMPLE_IO, StatKind.DIAGONAL},
        fisher_type=FisherType(cfg.fisher),
        mc_samples=cfg.mc_samples,
        include=[cfg.layer],
        seed=cfg.seed,
    )
    with timer("extract"):
        with extractor.collect():
            loss = loss_fn(model64(x64), x64)
            loss.backward()
        stats = extractor.statistics()
    layer_stats = stats.layers[cfg.layer]
    assert layer_stats.io is not None
    with timer("exact block"):
        exact = fisher_block(layer_stats.io)
        check = check_fisher_block(layer_stats)
    with timer("eigvalsh"):
        exact_eigs = eigenvalues(exact)
    errors: dict[str, dict[str, float]] = {}
    iterations: dict[str, int | None] = {}
    fit_seconds: dict[str, float] = {}
    for name, make in METHODS.items():
        approx = make()
        start = time.perf_counter()
        approx.update(stats)
        dense = approx.to_dense(cfg.layer)
        fit_seconds[name] = time.perf_counter() - start
        timer.seconds["fit"] = timer.seconds.get("fit", 0.0) + fit_seconds[name]
        block = approx.blocks[cfg.layer]
        iterations[name] = getattr(block, "last_iterations", None)
        with timer("eigvalsh"):
            errors[name] = relative_errors(exact, dense, exact_eigs)
    return {
        "loss": float(loss.detach()),
        "fisher_norm": float(exact.norm()),
        "errors": errors,
        "iterations": iterations,
        "fit_seconds": fit_seconds,
        "exact_block_check": check,
    }


def train_and_measure(cfg: Config) -> tuple[list[dict[str, Any]], Timer]:
    """Train with Adam and evaluate every ``cfg.every`` steps (and at step 0)."""
    timer = Timer()
    with timer("data"):
        data = generate_curves(num_train=cfg.num_train, num_test=0, seed=cfg.seed).train
    torch.manual_seed(cfg.seed)
    model = autoencoder(cfg.activation)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(cfg.seed)
    x_eval = data[: cfg.eval_batch]
    order = torch.randperm(len(data), generator=generator)
    cursor = 0
    checkpoints: list[dict[str, Any]] = []
    for step in range(cfg.steps + 1):
        if step % cfg.every == 0 or step == cfg.steps:
            start = time.perf_counter()
            record = {"step": step, **evaluate_checkpoint(model, x_eval, cfg, timer)}
            record["seconds"] = time.perf_counter() - start
            checkpoints.append(record)
            print(progress_line(record), flush=True)
        if step == cfg.steps:
            break
        with timer("train"):
            if cursor + cfg.batch_size > len(data):
                order, cursor = torch.randperm(len(data), generator=generator), 0
            x = data[order[cursor : cursor + cfg.batch_size]]
            cursor += cfg.batch_size
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), x).backward()
            optimizer.step()
    return checkpoints, timer


def progress_line(record: dict[str, Any]) -> str:
    errs = "  ".join(
        f"{name} {e['frobenius']:.3e}/{e['spectrum']:.3e}" for name, e in record["errors"].items()
    )
    head = f"step {record['step']:>5}  loss {record['loss']:.4f}"
    return f"{head}  {errs}  ({record['seconds']:.1f} s)"


# -- summaries ----------------------------------------------------------------------------------


def means(checkpoints: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean error per method and metric over the checkpoints."""
    return {
        name: {
            metric: sum(c["errors"][name][metric] for c in checkpoints) / len(checkpoints)
            for metric in METRICS
        }
        for name in METHODS
    }


def orderings(checkpoints: Sequence[dict[str, Any]], slack: float) -> dict[str, Any]:
    """Whether each relation ``smaller <= larger * (1 + slack)`` held at every checkpoint."""
    result: dict[str, Any] = {}
    for metric in METRICS:
        for small, large, guaranteed in RELATIONS:
            violations = [
                {
                    "step": c["step"],
                    small: c["errors"][small][metric],
                    large: c["errors"][large][metric],
                }
                for c in checkpoints
                if c["errors"][small][metric] > c["errors"][large][metric] * (1.0 + slack)
            ]
            result[f"{metric}: {small} <= {large}"] = {
                "metric": metric,
                "smaller": small,
                "larger": large,
                "guaranteed": guaranteed and metric == "frobenius",
                "held": len(checkpoints) - len(violations),
                "checkpoints": len(checkpoints),
                "violations": violations,
            }
        chain = sorted(
            {
                v["step"]
                for small, large, _ in RELATIONS
                for v in result[f"{metric}: {small} <= {large}"]["violations"]
            }
        )
        result[f"{metric}: all"] = {"metric": metric, "violated_at": chain, "held": not chain}
    gap = max(
        abs(c["errors"]["Lanczos"]["frobenius"] - c["errors"]["Deflation"]["frobenius"])
        / max(c["errors"]["Deflation"]["frobenius"], sys.float_info.min)
        for c in checkpoints
    )
    result["frobenius: Lanczos = Deflation"] = {"max_relative_difference": gap}
    return result


def ranking(mean: dict[str, dict[str, float]], metric: str, slack: float) -> str:
    """Methods from the smallest to the largest mean error, ``=`` for ties within ``slack``."""
    names = sorted(mean, key=lambda name: mean[name][metric])
    text = names[0]
    for prev, name in itertools.pairwise(names):
        tie = mean[name][metric] <= mean[prev][metric] * (1.0 + slack)
        text += f" {'=' if tie else '<'} {name}"
    return text


def machine() -> dict[str, Any]:
    return _harness.machine()


def layer_shape(name: str) -> tuple[int, int]:
    """``(out, in + 1)``: the shape of the layer's ``[W | b]`` matrix."""
    module = dict(autoencoder().named_modules())[name]
    assert isinstance(module, nn.Linear)
    return module.out_features, module.in_features + 1


def render_table(checkpoints: Sequence[dict[str, Any]], mean: dict[str, dict[str, float]]) -> str:
    head = ["step", "loss"] + [f"{n} {m[:4]}." for n in METHODS for m in METRICS]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---:" for _ in head) + "|",
    ]
    for c in checkpoints:
        cells = [str(c["step"]), f"{c['loss']:.4f}"] + [
            f"{c['errors'][n][m]:.3e}" for n in METHODS for m in METRICS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["**mean**", ""] + [f"**{mean[n][m]:.3e}**" for n in METHODS for m in METRICS]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_iterations(checkpoints: Sequence[dict[str, Any]]) -> str:
    names = [n for n in METHODS if checkpoints[0]["iterations"][n] is not None]
    lines = ["| step | " + " | ".join(names) + " |", "|---:" * (len(names) + 1) + "|"]
    for c in checkpoints:
        counts = " | ".join(str(c["iterations"][n]) for n in names)
        lines.append(f"| {c['step']} | {counts} |")
    return "\n".join(lines)


def render_orderings(order: dict[str, Any]) -> list[str]:
    lines = []
    for key, item in order.items():
        if "held" in item and "checkpoints" in item:
            kind = "guaranteed" if item["guaranteed"] else "not guaranteed"
            text = f"- {key} ({kind}): held at {item['held']}/{item['checkpoints']} checkpoints"
            if item["violations"]:
                small, large = item["smaller"], item["larger"]
                cases = ", ".join(
                    f"step {v['step']} ({small} {v[small]:.3e} > {large} {v[large]:.3e})"
                    for v in item["violations"]
                )
                text += f"; violated at {cases}"
            lines.append(text)
        elif "violated_at" in item:
            verdict = (
                "held at every checkpoint"
                if item["held"]
                else "violated at steps " + ", ".join(map(str, item["violated_at"]))
            )
            lines.append(
                f"- {item['metric']}: KFAC >= KPSVD >= Deflation, EKFAC <= KFAC and "
                "KFAC-corrected <= KFAC: " + verdict
            )
        else:
            lines.append(
                f"- {key}: largest relative difference {item['max_relative_difference']:.1e}"
            )
    return lines


def render_markdown(payload: dict[str, Any]) -> str:
    cfg, info, layer = payload["config"], payload["machine"], payload["layer"]
    mean = payload["mean"]
    lines = [
        "# Fisher-block approximation quality along an Adam run",
        "",
        "Generated by `benchmarks/fisher_quality.py`; see its docstring for the method.",
        "",
        f"- Command: `{payload['command']}`",
        f"- Date: {info['date']}; runtime {payload['runtime_s']:.0f} s "
        + "("
        + ", ".join(f"{k} {v:.0f} s" for k, v in payload["seconds"].items())
        + ")",
        f"- Machine: {info['cpu']}, {info['cpu_count']} logical CPUs (shared; load average "
        f"{info['load_average']} at the end), {info['platform']}",
        f"- Software: Python {info['python']}, torch {info['torch']} "
        f"(torch threads: {info['torch_threads']}), BackPACK {info['backpack']}",
        f"- Network: CURVES autoencoder {'-'.join(map(str, WIDTHS))}-"
        f"{'-'.join(map(str, reversed(WIDTHS[:-1])))}, {cfg['activation']}, BCEWithLogitsLoss; "
        f"Adam lr {cfg['lr']:g}, batch {cfg['batch_size']}, {cfg['num_train']} training images, "
        f"seed {cfg['seed']}",
        f"- Layer `{layer['name']}`: [W | b] is {layer['shape'][0]} x {layer['shape'][1]}, "
        f"{layer['num_params']} parameters",
        f"- Statistics: {cfg['fisher'].upper()} Fisher"
        + (f" ({cfg['mc_samples']} sample(s))" if cfg["fisher"] == "mc" else "")
        + f" on a fixed batch of {cfg['eval_batch']} training images; extraction, exact block, "
        "approximations and eigenvalues in float64; each approximation fitted with one "
        "update on that batch",
        "- loss: BCE (mean over pixels and images) of the evaluation batch at the checkpoint",
        "- Errors: relative Frobenius `||F - C||_F / ||F||_F` (frob.) and relative spectrum "
        "`||eig(F) - eig(C)||_2 / ||eig(F)||_2` (spec.)",
        f"- Exact block check (GEMM vs `exact_block`, first {CHECK_SAMPLES} images): largest "
        f"relative difference {payload['exact_block_check_max']:.1e}",
        "",
        render_table(payload["checkpoints"], mean),
        "",
        f"## Orderings (relative slack {cfg['slack']:g})",
        "",
        *render_orderings(payload["ordering"]),
        "",
        "Ranking by mean error (best first):",
        "",
        *[f"- {m}: {payload['ranking'][m]}" for m in METRICS],
        "",
        "Products with the rearranged block R(F) spent by each fit (one update; Deflation: both "
        f"pairs; cap {MAX_ITER} per pair for the power iterations):",
        "",
        render_iterations(payload["checkpoints"]),
        "",
        "![Frobenius and spectrum errors against the step](fisher_quality.png)",
        "",
    ]
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checkpoints = payload["checkpoints"]
    steps = [c["step"] for c in checkpoints]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    titles = {"frobenius": "relative Frobenius error", "spectrum": "relative spectrum error"}
    for ax, metric in zip(axes, METRICS, strict=True):
        for name in METHODS:
            style = {"linestyle": "-", **STYLES[name]}
            values = [c["errors"][name][metric] for c in checkpoints]
            ax.plot(steps, values, label=name, markersize=5, **style)
        ax.set_yscale("log")
        ax.set_xlabel("Adam step")
        ax.set_title(titles[metric])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    cfg, layer = payload["config"], payload["layer"]
    fig.suptitle(
        f"CURVES autoencoder, layer {layer['name']} ({layer['num_params']} params), "
        f"{cfg['fisher'].upper()} Fisher of {cfg['eval_batch']} images"
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line -------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=positive_int, default=400, help="Adam steps")
    parser.add_argument("--every", type=positive_int, default=50, help="steps between checkpoints")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="Adam batch")
    parser.add_argument(
        "--eval-batch", type=positive_int, default=256, help="images of the fixed evaluation batch"
    )
    parser.add_argument("--num-train", type=positive_int, default=4096, help="CURVES images")
    parser.add_argument(
        "--layer",
        default=None,
        help=f"layer to compare, one of {', '.join(layer_names())} "
        f"(default: {DEFAULT_LAYER}; {QUICK_LAYER} with --quick)%(default).0s",  # no auto default
    )
    parser.add_argument("--fisher", choices=("exact", "mc"), default="exact", help="Fisher flavour")
    parser.add_argument(
        "--mc-samples", type=positive_int, default=1, help="samples per image for --fisher mc"
    )
    parser.add_argument(
        "--activation", choices=tuple(ACTIVATIONS), default="relu", help="hidden units"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="data, initialisation and batches")
    parser.add_argument(
        "--slack", type=float, default=1e-6, help="relative slack of the ordering checks"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads (1: see the module docstring)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny configuration (smoke test); writes nothing unless --out is given",
    )
    parser.add_argument("--out", type=Path, default=None, help=f"output folder ({DEFAULT_OUT})")
    return parser


def resolve(args: argparse.Namespace) -> Config:
    if args.quick:
        args.steps, args.every = min(args.steps, 4), min(args.every, 2)
        args.batch_size, args.eval_batch = min(args.batch_size, 32), min(args.eval_batch, 16)
        args.num_train = min(args.num_train, 256)
    if args.eval_batch > args.num_train:
        raise SystemExit("--eval-batch cannot exceed --num-train.")
    layer = args.layer or (QUICK_LAYER if args.quick else DEFAULT_LAYER)
    if layer not in layer_names():
        raise SystemExit(f"--layer {layer!r} is not one of {', '.join(layer_names())}.")
    return Config(
        steps=args.steps,
        every=args.every,
        batch_size=min(args.batch_size, args.num_train),
        eval_batch=args.eval_batch,
        num_train=args.num_train,
        layer=layer,
        fisher=args.fisher,
        mc_samples=args.mc_samples,
        activation=args.activation,
        lr=args.lr,
        seed=args.seed,
        slack=args.slack,
        threads=args.threads,
        quick=args.quick,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; return the payload written to ``fisher_quality.json``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cfg = resolve(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        start = time.perf_counter()
        checkpoints, timer = train_and_measure(cfg)
        runtime = time.perf_counter() - start
        info = machine()
    finally:
        torch.set_num_threads(threads)
    mean = means(checkpoints)
    out_shape = layer_shape(cfg.layer)
    payload: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/fisher_quality.py", *argv]),
        "config": vars(cfg),
        "layer": {
            "name": cfg.layer,
            "shape": list(out_shape),
            "num_params": out_shape[0] * out_shape[1],
        },
        "methods": list(METHODS),
        "checkpoints": checkpoints,
        "mean": mean,
        "ordering": orderings(checkpoints, cfg.slack),
        "ranking": {metric: ranking(mean, metric, cfg.slack) for metric in METRICS},
        "exact_block_check_max": max(c["exact_block_check"] for c in checkpoints),
        "runtime_s": runtime,
        "seconds": timer.seconds,
        "machine": info,
    }
    print()
    print(render_table(checkpoints, mean))
    print()
    print("\n".join(render_orderings(payload["ordering"])))
    for metric in METRICS:
        print(f"ranking by mean {metric} error: {payload['ranking'][metric]}")
    print(f"runtime {runtime:.1f} s")
    out = args.out if args.out is not None else (None if cfg.quick else DEFAULT_OUT)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "fisher_quality.json").write_text(json.dumps(payload, indent=2) + "\n")
        (out / "fisher_quality.md").write_text(render_markdown(payload))
        plot(payload, out / "fisher_quality.png")
        print(f"wrote {out / 'fisher_quality.json'}, .md and .png")
    if not all(math.isfinite(e[m]) for c in checkpoints for e in c["errors"].values() for m in e):
        print("warning: non-finite errors", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
