r"""Amortised step time of every approximation, next to Adam, SGD and the cost floor.

Run from the repository root::

    python benchmarks/step_time.py                     # batch 512 and 1000, T = 10 and 100
    python benchmarks/step_time.py --quick             # smoke test, writes nothing
    python benchmarks/step_time.py --methods kfac,sgd --batch-sizes 512 --threads 1
    python benchmarks/step_time.py --profile kfac      # cProfile of one window, batch 512, T=10
    python benchmarks/step_time.py --device cuda       # in one process on the GPU (below)

**Two modes.** Without ``--device``, this script times on the CPU in paired subprocesses,
as described here. With ``--device cpu|cuda`` it runs the in-process device benchmark of
``benchmarks/device_step.py`` instead (batch 1000 and 8192, ResNet-18 at batch 128; host
reads, kernel launches, peak memory and each method's floor on that device; its
docstring says what it measures), which reuses this module's problems, rows
(``build_step``) and floor components (``floor_components(batch, device)``).

Network: the MNIST autoencoder 784-1000-500-250-30-250-500-1000-784 (ReLU, linear code
layer, logits out), ``BCEWithLogitsLoss`` against targets in [0, 1], random data (``x``
uniform in [0, 1], target ``x``), float32, CPU.

**Rows.** ``adam`` (``torch.optim.Adam``) is the baseline; ``sgd`` is SGD with momentum.
Each ``REGISTRY`` entry is a ``PreconditionedOptimizer`` (MC Fisher, damping 1e-3, KL
clip 1e-2, momentum 0.9, ``t_cov = t_inv = T``) with that approximation at its defaults,
at every interval ``T``; an entry whose module does not import gives a row saying why.
``asdl-kfac`` is ASDL's ``KfacGradientMaker`` (``asdfghjkl``, optional) with SGD: its MC
Fisher knows only cross-entropy and MSE likelihoods, so it samples Gaussian targets
(``loss_type="mse"``), which costs the same sampled backward as Bernoulli targets.

**Amortised time.** Any ``T`` consecutive steps hold exactly one statistics step and one
inverse step: the time of such a window over ``T`` is the amortised step time (wall time
of ``zero_grad``, forward, backward and ``step``). Each interval gets
``max(1, --window-steps // T)`` windows (default: 3 at T=10, 1 at T=100). A method whose
first statistics+inverse step (cold, in the warm-up) takes over ``--slow-seconds`` is
*estimated* as ``(special + (T-1) * regular) / T`` from that step and the regular steps
that follow it (``est.``); one whose steps exceed ``--max-step-seconds`` is stopped, a lower
bound is reported, and it is not run at larger batches. Intervals above ``--direct-max``
are composed the same way from the first interval's windows instead of being timed.

``kfac+<space>`` rows wrap KFAC (PI) in ``TwoLevel`` with that coarse space (residual
form unless named ``-additive``; ``-krylov``: Krylov enrichment); their floor is KFAC's,
so the row's ratio to the ``kfac`` row is the price of the coarse level.

**Ratios to Adam in one run.** Every configuration has its own worker subprocess (seeded
model and data, warm-up steps) that the parent drives one command at a time: rows take
turns and share no allocator state. Steps run in chunks of ``CHUNK``, each right after
one Adam step of the Adam worker; a window's ratio is ``sum(step times) / sum(Adam step
before each step's chunk)``, and a row's time and ratio are medians over its windows.
Before a window the parent waits up to ``--idle-wait`` s until other processes leave
``--threads`` CPUs idle (``/proc/stat``); windows run on a busy machine are noted. GC is
paused within a chunk. On a shared machine use ``--threads 1``: with torch's 2 threads on
2 cores any other process stalls OpenMP's barriers, and steps get up to 10x slower in
bursts that pairing with Adam cannot cancel.

**Interleaved mode** (``--interleave ROUNDS``; for the price of the coarse level on a busy
machine): the ``--only`` rows run in one process, one step of each in turn (the row order
rotates every round), for ``ROUNDS`` windows of the first interval ``T``; each row's median
plain step and median statistics+inverse step give its amortised time at every interval,
``(special + (T - 1) * plain) / T``, and its ratio to the first row. Load that comes and goes
then hits all rows alike. Writes ``step_time_interleaved.md`` and ``.json`` to ``--out``.

**Cost floor** (same run; each component timed right after an Adam step, median ratio
over ``--floor-rounds``), for all 8 layers at the batch size, from real activations and
output gradients: ``adam`` an Adam step (forward, backward, update; the design's choice:
a cheaper update, e.g. SGD's, can put a method slightly below the floor); ``apply2``
``G⁻¹ V A⁻¹`` with dense inverses (2 products); ``apply4`` the eigenbasis apply
``Q_G((Q_Gᵀ V Q_A) ⊘ S) Q_Aᵀ`` (4 products, as for two-term methods); ``gemm`` the
factors ``A = āᵀā`` (bias column appended) and ``G = gᵀg``; ``mc_backward`` sampling MC
targets and backpropagating that column through the network (products with ``W`` and
ReLU masks, no weight gradients: the statistics step's extra backward); ``cholesky``
``(F + γI)⁻¹`` of both factors via Cholesky; ``eigh`` of both factors; ``ng_kernel`` the
sample-space kernel ``Σ_l (g gᵀ) ⊙ (ā āᵀ)``, ``ng_cholesky`` its Cholesky (block NG: one
per layer, ``ng_cholesky_block``), ``ng_apply`` the Woodbury apply (2 products with ``ā``
and ``g`` per layer). Then ``floor(T) = adam + apply + (stats + inverse) / T`` as ratios
to Adam, with ``FLOORS[Spec.floor]`` naming the parts: KFAC-PI, KPSVD and ASDL need
apply2, gemm + mc_backward, cholesky; KFAC-EIGEN apply4, gemm + mc_backward, eigh;
two-term methods apply4, gemm + mc_backward, cholesky + eigh; NG ng_apply, mc_backward +
ng_kernel, its Cholesky; EKFAC apply4, gemm + mc_backward, eigh + ``ekfac_scalings``
(``ā`` and ``g`` rotated into the eigenbases, then ``(g')²ᵀ (ā')²``); the diagonals
``diag_apply`` (``V ⊘ (d + λ)``), ``diag_gemm`` (``(g²)ᵀ ā²``) + mc_backward (none for
the empirical diagonal, whose ``g`` is the gradient's own backward). Left out: power
iterations, whitening products and O(P) work (momentum, KL clip, running averages).

Outputs: the printed table, ``step_time.json`` (every window and time split) and
``step_time.md`` in ``--out`` (default ``benchmarks/results``; ``--quick``: only with ``--out``);
the device mode writes ``step_time_<device>.json`` and ``.md`` instead.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import importlib
import importlib.metadata
import itertools
import json
import os
import pstats
import queue
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvlib.optim.report import TIME_PARTS
from curvlib.wiring import PreconditionedOptimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # device_step (--device), _harness
import _harness

WIDTHS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
LR, DAMPING, KL_CLIP, MOMENTUM, DECAY = 1e-3, 1e-3, 1e-2, 0.9, 0.95
WARMUP, CHUNK, PAUSE, SETUP_TIMEOUT, PREFIX = 2, 5, 0.02, 300.0, "@step-time "
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
FLAT = ("steps", "special", "adam")  # per-step lists of a window


@dataclass(frozen=True)
class Spec:
    """An approximation to time: its module, class, arguments and ``FLOORS`` entry."""

    label: str
    module: str
    cls: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    floor: str = "pi"
    fisher: str = "mc"
    coarse: tuple[str, dict[str, Any]] | None = None
    form: str = "residual"
    two_level: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)  # more PreconditionedOptimizer kwargs


def _two_level(
    space: str, form: str = "residual", two_level: dict[str, Any] | None = None, **kwargs: Any
) -> Spec:
    """KFAC (PI) with a two-level correction: ``coarse`` names a class of ``approx.coarse``.

    ``two_level``: keyword arguments of ``TwoLevel`` (e.g. ``max_samples``).
    """
    label = f"KFAC + {space}{' (krylov)' if kwargs.get('krylov') else ''}, {form}"
    if two_level:
        label += ", " + ", ".join(f"{k}={v}" for k, v in two_level.items())
    return Spec(
        label, KFAC, "KFAC", {"damping_mode": "pi"}, coarse=(space, kwargs), form=form,
        two_level=dict(two_level or {}),
    )  # fmt: skip


APPROX, TWO = "curvlib.approx", "two-term"
KFAC, NG, DIAG = f"{APPROX}.kfac", f"{APPROX}.natural_gradient", f"{APPROX}.diagonal"
REGISTRY: dict[str, Spec] = {
    "kfac": Spec("KFAC (PI)", KFAC, "KFAC", {"damping_mode": "pi"}),
    "kfac-eigen": Spec("KFAC (EIGEN)", KFAC, "KFAC", {"damping_mode": "eigen"}, "eigen"),
    "kfac-host-checks": Spec(
        "KFAC (PI), checks read on the host", KFAC, "KFAC", {"damping_mode": "pi"},
        optimizer={"deferred_checks": False},
    ),
    "kfac-deferred": Spec(
        "KFAC (PI), checks deferred", KFAC, "KFAC", {"damping_mode": "pi"},
        optimizer={"deferred_checks": True},
    ),
    "kfac-overlap": Spec(
        "KFAC (PI), inverses overlapped (stale by one rebuild)", KFAC, "KFAC",
        {"damping_mode": "pi"}, optimizer={"overlap_inverse": 1000},  # > T: the next rebuild
    ),
    "ekfac": Spec("EKFAC", f"{APPROX}.ekfac", "EKFAC", floor="ekfac"),
    "diag": Spec("Diagonal (GGN, MC)", DIAG, "Diagonal", floor="diag"),
    "diag-ef": Spec("Diagonal (empirical)", DIAG, "Diagonal", floor="diag-ef", fisher="empirical"),
    "kpsvd": Spec("KPSVD", f"{APPROX}.kpsvd", "KPSVD"),
    "deflation": Spec("Deflation", f"{APPROX}.deflation", "Deflation", floor=TWO),
    "kfac-corrected": Spec("KFAC-corrected", f"{APPROX}.kfac_corrected", "KFACCorrected", {}, TWO),
    "lanczos": Spec("Lanczos", f"{APPROX}.lanczos", "Lanczos", floor=TWO),
    "block-ng": Spec("block NG", NG, "BlockNaturalGradient", floor="ng-block"),
    "exact-ng": Spec("exact NG", NG, "ExactNaturalGradient", floor="ng-exact"),
    "kfac+nicolaides": _two_level("Nicolaides"),
    "kfac+nicolaides-additive": _two_level("Nicolaides", "additive"),
    "kfac+nicolaides-krylov": _two_level("Nicolaides", krylov=True),
    "kfac+nicolaides-all": _two_level("Nicolaides", two_level={"max_samples": None}),
    "kfac+nicolaides-krylov-all": _two_level(
        "Nicolaides", krylov=True, two_level={"max_samples": None}
    ),
    "kfac+residual-all": _two_level("ResidualSpace", two_level={"max_samples": None}),
    "kfac+spectral-128": _two_level("Spectral", two_level={"max_samples": 128}),
    "kfac+residual": _two_level("ResidualSpace"),
    "kfac+spectral": _two_level("Spectral"),
    "kfac+tselepidis": _two_level("Tselepidis"),
    "asdl-kfac": Spec("ASDL K-FAC", "asdl", "KfacGradientMaker"),
}  # fmt: skip
BASELINES = {"adam": "Adam", "sgd": "SGD (momentum 0.9)"}
DEVICE_ROWS = ("adam", "sgd", "kfac", "kfac-host-checks", "kfac-deferred", "kfac-overlap", "ekfac",
               "kpsvd", "diag", "exact-ng")  # --device default  # fmt: skip
FLOORS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # (every step, every T steps)
    "pi": (("apply2",), ("gemm", "mc_backward", "cholesky")),
    "eigen": (("apply4",), ("gemm", "mc_backward", "eigh")),
    "ekfac": (("apply4",), ("gemm", "mc_backward", "eigh", "ekfac_scalings")),
    "diag": (("diag_apply",), ("mc_backward", "diag_gemm")),
    "diag-ef": (("diag_apply",), ("diag_gemm",)),
    TWO: (("apply4",), ("gemm", "mc_backward", "cholesky", "eigh")),
    "ng-block": (("ng_apply",), ("mc_backward", "ng_kernel", "ng_cholesky_block")),
    "ng-exact": (("ng_apply",), ("mc_backward", "ng_kernel", "ng_cholesky")),
}
COMPONENTS = list(dict.fromkeys(c for parts in FLOORS.values() for p in parts for c in p))
StepFn = Callable[[], tuple[bool, dict[str, float]]]  # -> (statistics+inverse step?, split)
Problem = tuple[nn.Module, nn.Module, Tensor, Tensor]  # model, loss, inputs, targets


# -- worker side ------------------------------------------------------------------------


def autoencoder() -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(WIDTHS)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(WIDTHS) - 2 and d_out != min(WIDTHS):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def autoencoder_problem(batch: int, device: str | torch.device = "cpu") -> Problem:
    """Seeded autoencoder, loss and data (``x`` uniform in [0, 1], target ``x``) on ``device``."""
    torch.manual_seed(0)
    model, loss_fn = autoencoder(), nn.BCEWithLogitsLoss()
    x = torch.rand(batch, WIDTHS[0])
    return model.to(device), loss_fn, x.to(device), x.clone().to(device)


def make_step(name: str, batch: int, interval: int) -> StepFn:
    """Seeded model, data and optimizer; returns the function that runs one training step."""
    return build_step(name, *autoencoder_problem(batch), interval)


def build_step(
    name: str, model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, interval: int
) -> StepFn:
    """The training step of row ``name`` (a baseline or a ``REGISTRY`` entry) on this problem.

    Every ``REGISTRY`` row is a ``PreconditionedOptimizer`` with the module docstring's
    hyper-parameters and ``t_cov = t_inv = interval``; the step reports whether it was
    a statistics+inverse step, and the optimizer's time split.
    """
    batch = x.shape[0]
    spec = REGISTRY.get(name)
    module = importlib.import_module(spec.module) if spec else None
    if spec is None or module is None or spec.module == "asdl":
        opt: torch.optim.Optimizer = (
            torch.optim.Adam(model.parameters(), lr=LR)
            if name == "adam"
            else torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        )
        maker = None
        if module is not None:
            config = module.PreconditioningConfig(
                data_size=batch, damping=DAMPING, ema_decay=1 - DECAY,
                preconditioner_upd_interval=interval, curvature_upd_interval=interval,
            )  # fmt: skip
            maker = module.KfacGradientMaker(model, config, loss_type="mse")  # MC Fisher

        def plain() -> tuple[bool, dict[str, float]]:
            opt.zero_grad(set_to_none=True)
            if maker is None:
                loss_fn(model(x), y).backward()
                opt.step()
                return False, {}
            special = bool(maker.do_update_curvature(maker.state["step"]))
            maker.setup_loss_call(loss_fn, maker.setup_model_call(model, x), y)
            maker.forward_and_backward()
            opt.step()
            return special, {}

        return plain
    approx = getattr(module, spec.cls)(**spec.kwargs)
    if spec.coarse is not None:
        from curvlib.approx import coarse, two_level

        space = getattr(coarse, spec.coarse[0])(**spec.coarse[1])
        approx = two_level.TwoLevel(approx, space, form=spec.form, **spec.two_level)
    popt = PreconditionedOptimizer(
        model, approx, loss_fn=loss_fn, lr=LR,
        damping=DAMPING, kl_clip=KL_CLIP, momentum=MOMENTUM, t_cov=interval, t_inv=interval,
        refresh_on_move=0,  # statistics exactly every `interval` steps: the cost at that T
        fisher_type=spec.fisher, **spec.optimizer,
    )  # fmt: skip

    def curvlib() -> tuple[bool, dict[str, float]]:
        popt.zero_grad(set_to_none=True)
        with popt.record():
            loss_fn(model(x), y).backward()
        popt.step()
        # Only the times: reading a deferred step's answers would wait for the device.
        stats = popt.last_stats
        split = {k[5:]: stats[k] for k in stats if k.startswith("time_")}
        return "inverse" in split, split

    return curvlib


def floor_components(
    batch: int, device: str | torch.device = "cpu"
) -> dict[str, Callable[[], object]]:
    """The operations of the cost floor (module docstring), on real activations on ``device``.

    ``base_step`` (not part of this mode's floor; ``device_step.py``'s) is a regular
    step without a preconditioner and without a host read: forward, backward, then
    momentum and parameter update with ``torch._foreach`` kernels.
    """
    torch.manual_seed(0)
    model = autoencoder().to(device)
    h = x0 = torch.rand(batch, WIDTHS[0]).to(device)
    params = list(model.parameters())
    linears = [m for m in model if isinstance(m, nn.Linear)]
    acts, outs = [], []
    for m in model:
        acts += [h.detach()] if isinstance(m, nn.Linear) else []
        h = m(h)
        if isinstance(m, nn.Linear):
            h.retain_grad()
            outs.append(h)
    mc_loss = nn.functional.binary_cross_entropy_with_logits(h, torch.bernoulli(torch.sigmoid(h)))
    torch.autograd.backward(mc_loss)
    logits, masks = h.detach(), [(o > 0).float() for o in outs]
    abar = [torch.cat([a, torch.ones(batch, 1, device=device)], 1) for a in acts]
    gs = [o.grad.detach() * batch for o in outs if o.grad is not None]
    facs = [a.T @ a / batch for a in abar] + [g.T @ g / batch for g in gs]  # A_1..A_8, G_1..G_8
    damped = [f + DAMPING**0.5 * torch.eye(f.shape[0], device=device) for f in facs]
    invs = [torch.cholesky_inverse(torch.linalg.cholesky(f)) for f in damped]
    eigs = [torch.linalg.eigh(f) for f in damped]
    n, eye_n = len(linears), DAMPING * torch.eye(batch, device=device)
    vs = [torch.randn(m.out_features, m.in_features + 1, device=device) for m in linears]
    diags = [g.square().T @ a.square() / batch for g, a in zip(gs, abar, strict=True)]
    kernels = [(g @ g.T) * (a @ a.T) / batch for g, a in zip(gs, abar, strict=True)]
    chol = torch.linalg.cholesky(sum(kernels) + eye_n)

    def gemm() -> None:
        for a, g in zip(acts, gs, strict=True):
            ab = torch.cat([a, torch.ones(batch, 1, device=device)], 1)
            _ = ab.T @ ab, g.T @ g

    def mc_backward() -> None:
        p = torch.sigmoid(logits)
        d = p - torch.bernoulli(p)
        for k in range(n - 1, 0, -1):  # into the input of layer k; the code layer has no ReLU
            d = d @ linears[k].weight if k == 4 else (d @ linears[k].weight) * masks[k - 1]

    def apply4() -> None:
        for v, ea, eg in zip(vs, eigs[:n], eigs[n:], strict=True):
            s = eg.eigenvalues[:, None] * ea.eigenvalues[None, :] + DAMPING
            qg, qa = eg.eigenvectors, ea.eigenvectors
            _ = qg @ ((qg.T @ v @ qa) / s) @ qa.T

    def ekfac_scalings() -> None:
        for a, g, ea, eg in zip(abar, gs, eigs[:n], eigs[n:], strict=True):
            _ = (g @ eg.eigenvectors).square().T @ (a @ ea.eigenvectors).square()

    def diag_gemm() -> None:
        for a, g in zip(abar, gs, strict=True):
            _ = g.square().T @ a.square()

    def diag_apply() -> None:
        for v, d in zip(vs, diags, strict=True):
            _ = v / (d + DAMPING)

    buffers = [torch.zeros_like(p) for p in params]

    def base_step() -> None:
        for p in params:
            p.grad = None
        nn.functional.binary_cross_entropy_with_logits(model(x0), x0).backward()
        with torch.no_grad():
            torch._foreach_mul_(buffers, MOMENTUM)
            torch._foreach_add_(buffers, [p.grad for p in params])
            torch._foreach_add_(params, buffers, alpha=-LR)

    def ng_apply() -> None:
        c = sum(((g @ v) * a).sum(1) for g, v, a in zip(gs, vs, abar, strict=True))
        c = torch.cholesky_solve(torch.as_tensor(c)[:, None], chol)
        _ = [g.T @ (c * a) for g, a in zip(gs, abar, strict=True)]

    return {
        "gemm": gemm, "mc_backward": mc_backward, "apply4": apply4, "ng_apply": ng_apply,
        "ekfac_scalings": ekfac_scalings, "diag_gemm": diag_gemm, "diag_apply": diag_apply,
        "base_step": base_step,
        "apply2": lambda: [gi @ v @ ai for v, ai, gi in zip(vs, invs[:n], invs[n:], strict=True)],
        "cholesky": lambda: [torch.cholesky_inverse(torch.linalg.cholesky(f)) for f in damped],
        "eigh": lambda: [torch.linalg.eigh(f) for f in damped],
        "ng_kernel": lambda: sum((g @ g.T) * (a @ a.T) for g, a in zip(gs, abar, strict=True)),
        "ng_cholesky": lambda: torch.linalg.cholesky(kernels[0] + eye_n),
        "ng_cholesky_block": lambda: [torch.linalg.cholesky(k + eye_n) for k in kernels],
    }  # fmt: skip


def reply(tag: str, payload: Any) -> None:
    print(f"{PREFIX}{tag} {json.dumps(payload)}", flush=True)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def worker(name: str, batch: int) -> None:
    """Serve one configuration; commands ``steps T n``, ``floor COMPONENT``, ``quit``."""
    warnings.filterwarnings("ignore")
    steps: dict[int, StepFn] = {}
    try:
        comps = floor_components(batch) if name == "floor" else {}
        if name in REGISTRY:
            importlib.import_module(REGISTRY[name].module)
    except Exception as err:  # the row says why
        reply("error", f"not available: {type(err).__name__}: {err}")
        return
    reply("ready", torch.get_num_threads())
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "quit":
            return
        try:
            gc.collect()
            if cmd == "floor":
                reply("floor", timed(comps[args[0]])[0])
                continue
            interval, count = int(args[0]), int(args[1])
            if interval not in steps:
                steps[interval] = make_step(name, batch, interval)
            step = steps[interval]
            gc.disable()
            out = [timed(step) for _ in range(count)]
            gc.enable()
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            reply("steps", {"steps": [[t, s, p] for t, (s, p) in out], "rss_mib": rss})
        except Exception as err:
            reply("error", f"{type(err).__name__}: {err}")
            return


# -- parent side ------------------------------------------------------------------------


class WorkerError(RuntimeError):
    """A worker failed, timed out or could not set up its configuration."""


class Worker:
    """A subprocess of this script holding one configuration; a thread reads its answers."""

    def __init__(self, name: str, batch: int, threads: int | None) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
        cmd += ["--batch-sizes", str(batch)] + (["--threads", str(threads)] if threads else [])
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                self.lines.put(line[len(PREFIX) :])
        self.lines.put(None)

    def ask(self, command: str | None, timeout: float) -> Any:
        """Send ``command`` (if any); the payload of the answer, within ``timeout`` s."""
        if command is not None and self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write(command + "\n")
                self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise WorkerError(f"no answer within {timeout:.0f} s, stopped") from None
        if line is None:
            self.proc.wait()
            self.stderr.seek(0)
            tail = " | ".join(self.stderr.read().strip().splitlines()[-2:])
            raise WorkerError(f"worker exited ({self.proc.returncode}): {tail}")
        tag, _, payload = line.partition(" ")
        if tag == "error":
            raise WorkerError(json.loads(payload))
        return json.loads(payload)

    def close(self) -> None:
        """Stop the worker (killed if it does not quit at once)."""
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def _cpu_ticks() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(v) - v[3] - v[4], sum(v)  # busy, total


def wait_for_idle(max_wait: float, threads: int) -> bool:
    """Wait until ``threads`` CPUs (+10%) are idle for 50 ms; ``False`` if not in ``max_wait``."""
    cpus = os.cpu_count() or 1
    limit, deadline = 0.1 + max(cpus - threads, 0) / cpus, time.monotonic() + max_wait
    while True:
        start = _cpu_ticks()
        time.sleep(0.05)
        end = _cpu_ticks()
        if start is None or end is None:
            return True
        if end[1] > start[1] and end[0] - start[0] <= limit * (end[1] - start[1]):
            return True
        if time.monotonic() >= deadline:
            return False


@dataclass
class Row:
    """One row of the table (times in seconds per step, ratios to Adam)."""

    name: str
    label: str
    batch: int
    interval: int | None
    floor_kind: str | None = None
    windows: list[dict[str, Any]] = field(default_factory=list)
    estimate: dict[str, float] | None = None
    seconds: float | None = None
    ratio: float | None = None
    floor: float | None = None
    rss_mib: float | None = None
    error: str | None = None


class Bench:
    """The workers of one batch size, timed against the Adam worker."""

    def __init__(self, batch: int, names: Sequence[str], args: argparse.Namespace) -> None:
        self.args, self.adam_times, self.rss = args, list[float](), dict[str, float]()
        self.workers = {n: Worker(n, batch, args.threads) for n in ["adam", *names]}
        self.errors: dict[str, str] = {}
        start = time.monotonic()
        for name in list(self.workers):  # they import at the same time
            try:
                self.workers[name].ask(None, SETUP_TIMEOUT)
            except WorkerError as err:
                self.errors[name] = str(err)
                self.workers.pop(name).close()
        if "adam" in self.errors:
            raise SystemExit(f"the Adam baseline failed: {self.errors['adam']}")
        for _ in range(WARMUP):
            self.adam()
        print(
            f"  {len(self.workers)} workers ready in {time.monotonic() - start:.0f} s", flush=True
        )

    def adam(self) -> float:
        """Time one Adam step, after a pause that lets the last worker's threads sleep."""
        time.sleep(PAUSE)
        self.adam_times.append(self.workers["adam"].ask("steps 1 1", 120)["steps"][0][0])
        time.sleep(PAUSE)
        return self.adam_times[-1]

    def run(self, name: str, interval: int, count: int) -> tuple[list[list[Any]], list[float]]:
        """``count`` steps in chunks after an Adam step each: the steps and their Adam times."""
        samples: list[list[Any]] = []
        refs: list[float] = []
        while len(samples) < count:
            k, ref = min(CHUNK, count - len(samples)), self.adam()
            out = self.workers[name].ask(f"steps {interval} {k}", self.args.max_step_seconds * k)
            samples, refs, self.rss[name] = samples + out["steps"], refs + [ref] * k, out["rss_mib"]
        return samples, refs

    def drop(self, name: str) -> None:
        """Stop one worker and forget it."""
        self.workers.pop(name).close()

    def floor(self) -> dict[str, dict[str, float]]:
        """Median time and ratio to the Adam step before it, of each floor component."""
        times: dict[str, list[float]] = {c: [] for c in COMPONENTS}
        ratios: dict[str, list[float]] = {c: [] for c in COMPONENTS}
        for r in range(self.args.floor_rounds + 1):  # round 0 warms up
            for c in COMPONENTS:
                ref = self.adam()
                seconds = float(self.workers["floor"].ask(f"floor {c}", 300))
                if r:
                    times[c].append(seconds)
                    ratios[c].append(seconds / ref)
        med = statistics.median
        return {c: {"seconds": med(times[c]), "ratio": med(ratios[c])} for c in COMPONENTS}


def window_stats(samples: list[list[Any]], refs: list[float], busy: bool) -> dict[str, Any]:
    split: dict[str, float] = {}
    for _, _, p in samples:
        for k, v in p.items():
            split[k] = split.get(k, 0.0) + v / len(samples)
    total = sum(s[0] for s in samples)
    return {
        "seconds": total / len(samples), "ratio": total / sum(refs), "busy": busy,
        "split": split, "steps": [s[0] for s in samples], "adam": refs,
        "special": [bool(s[1]) for s in samples],
    }  # fmt: skip


def compose(
    steps: list[float], special: list[bool], refs: list[float], source: str
) -> dict[str, Any]:
    """Median special (statistics+inverse) and regular step: seconds and ratios to Adam."""
    out: dict[str, Any] = {"source": source}
    for kind, flag in (("special", True), ("regular", False)):
        pick = [(t, t / r) for t, s, r in zip(steps, special, refs, strict=True) if s == flag]
        out[f"{kind}_steps"] = len(pick)
        out[f"{kind}_seconds"] = statistics.median(t for t, _ in pick)
        out[f"{kind}_ratio"] = statistics.median(q for _, q in pick)
    return out


def measure(
    batch: int, names: Sequence[str], args: argparse.Namespace, too_slow: dict[str, int]
) -> dict[str, Any]:
    """Rows and floor of one batch; ``too_slow``: method -> batch where a step timed out."""
    why = f"not run: a step took over {args.max_step_seconds:g} s at batch"
    not_run = {n: f"{why} {b}" for n, b in too_slow.items() if b <= batch}
    methods = [n for n in names if n in REGISTRY and n not in not_run]
    bench = Bench(batch, [n for n in names if n not in not_run] + ["floor"] * bool(methods), args)
    rows: dict[tuple[str, int | None], Row] = {}
    for name in names:
        spec, error = REGISTRY.get(name), bench.errors.get(name) or not_run.get(name)
        for t in args.intervals if spec else [None]:
            label, kind = (spec.label, spec.floor) if spec else (BASELINES[name], None)
            rows[name, t] = Row(name, label, batch, t, kind, error=error)
    t0, direct = args.intervals[0], [("sgd", None)] if "sgd" in bench.workers else []
    try:
        for name in [n for n in methods if n in bench.workers]:
            try:  # warm up at the first interval: step 0 (statistics+inverse), step 1
                (first, *_), refs = bench.run(name, t0, 1)
                if first[0] <= args.slow_seconds:
                    bench.run(name, t0, WARMUP - 1)
                    direct += [(name, t) for t in args.intervals if t <= args.direct_max or t == t0]
                    continue
                more, more_refs = bench.run(name, t0, max(t0 - 1, 1))  # regular steps only
                skip = 1 if len(more) > 1 else 0  # step 1 is the first regular step: cold
                steps = [first[0]] + [m[0] for m in more[skip:]]
                special = [True] + [False] * (len(steps) - 1)
                source = "cold first statistics+inverse step, regular steps"
                est = compose(steps, special, refs + more_refs[skip:], source)
                for t in args.intervals:
                    rows[name, t].estimate, rows[name, t].rss_mib = est, bench.rss.get(name)
            except WorkerError as err:
                for t in args.intervals:
                    rows[name, t].error = str(err)
                bench.drop(name)
                if "no answer within" in str(err):
                    too_slow[name] = batch
        for t in args.intervals:
            todo = [k for k in direct if k[1] == t or (k[1] is None and t == t0)]
            for r in range(max(1, args.window_steps // t) if todo else 0):
                for key in todo[r % len(todo) :] + todo[: r % len(todo)]:  # rotate the order
                    if key[0] not in bench.workers:
                        continue
                    try:
                        if t != t0 and not rows[key].windows:  # warm up this interval
                            bench.run(key[0], t, WARMUP)
                        busy = not wait_for_idle(args.idle_wait, torch.get_num_threads())
                        samples, refs = bench.run(key[0], t, t if key[1] else 2 * CHUNK)
                    except WorkerError as err:
                        rows[key].error = str(err)
                        bench.drop(key[0])
                        continue
                    rows[key].windows.append(window_stats(samples, refs, busy))
                    rows[key].rss_mib = bench.rss.get(key[0])
        floor = bench.floor() if "floor" in bench.workers else {}
    finally:
        for name in list(bench.workers):
            bench.drop(name)
    adam = Row("adam", "Adam", batch, None, seconds=statistics.median(bench.adam_times), ratio=1)
    adam.rss_mib = bench.rss.get("adam")
    for row in rows.values():
        base = rows.get((row.name, t0))
        if row.interval and not row.windows and not row.estimate and base and base.windows:
            steps, special, refs = ([v for w in base.windows for v in w[k]] for k in FLAT)
            row.estimate = compose(steps, special, refs, f"steps of the T={t0} windows")
            row.rss_mib = base.rss_mib
        if row.windows:
            row.seconds = statistics.median(w["seconds"] for w in row.windows)
            row.ratio = statistics.median(w["ratio"] for w in row.windows)
        elif row.estimate and row.interval:
            e, t = row.estimate, row.interval
            row.seconds = (e["special_seconds"] + (t - 1) * e["regular_seconds"]) / t
            row.ratio = (e["special_ratio"] + (t - 1) * e["regular_ratio"]) / t
        if row.floor_kind and floor and row.interval:
            every, per_t = FLOORS[row.floor_kind]
            row.floor = 1 + sum(floor[c]["ratio"] for c in every)
            row.floor += sum(floor[c]["ratio"] for c in per_t) / row.interval
        if row.error and ("no answer within" in row.error or row.name in not_run) and row.interval:
            row.error += f": amortised >= {args.max_step_seconds / row.interval:.1f} s/step"
    return {
        "adam_seconds": adam.seconds, "floor": floor, "floor_error": bench.errors.get("floor"),
        "rows": [adam, *rows.values()],
    }  # fmt: skip


# -- reporting --------------------------------------------------------------------------

HEADER = ["method", "batch", "T", "windows", "ms/step", "ratio", "floor", "ratio/floor", "note"]
SPLIT = (*(part for part in TIME_PARTS if part != "closure"), "step")  # no LM closure here


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in result["rows"]:
        t = "-" if r.interval is None else str(r.interval)
        if r.error:
            out.append([r.label, str(r.batch), t, "", "", "", "", "", r.error[:150]])
            continue
        over = None if r.ratio is None or r.floor is None else r.ratio / r.floor
        busy = sum(w["busy"] for w in r.windows)
        note = f"{busy} window(s) on a busy machine" if busy else ""
        if r.estimate:
            e = r.estimate
            note = f"est.: {e['special_seconds']:.2f} s special, {e['regular_seconds'] * 1e3:.0f} ms regular step"  # noqa: E501
        n = "est." if r.estimate else str(len(r.windows)) if r.windows else "-"
        ms = None if r.seconds is None else r.seconds * 1e3
        nums = [_num(ms, ".1f"), *(_num(v, ".2f") for v in (r.ratio, r.floor, over))]
        out.append([r.label, str(r.batch), t, n, *nums, note])
    return out


def text_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = []
    for row in [HEADER, *rows]:
        cells = zip(row, widths, strict=True)
        lines.append(
            "  ".join(c.ljust(w) if i in (0, 8) else c.rjust(w) for i, (c, w) in enumerate(cells))
        )
    return "\n".join(line.rstrip() for line in lines)


def floor_line(result: dict[str, Any]) -> str:
    if not result["floor"]:
        return f"floor not measured: {result['floor_error']}"
    parts = [
        f"{c} {v['seconds'] * 1e3:.1f} ms ({v['ratio']:.2f})" for c, v in result["floor"].items()
    ]
    return f"Adam step {result['adam_seconds'] * 1e3:.1f} ms; floor components: {', '.join(parts)}"


def machine() -> dict[str, Any]:
    """``_harness.machine()``, the load at the start and the comparison packages' versions."""
    info = _harness.machine()
    info["load_average_start"] = info.pop("load_average")
    for dist in ("backpack-for-pytorch", "asdfghjkl"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[dist] = importlib.metadata.version(dist)
    return info


def markdown(info: dict[str, Any], args: argparse.Namespace, results: dict[int, Any]) -> str:
    cmd = "python benchmarks/step_time.py --batch-sizes " + ",".join(map(str, args.batch_sizes))
    cmd += " --intervals " + ",".join(map(str, args.intervals))
    cmd += f" --threads {args.threads}" if args.threads else ""
    cmd += f" --methods {args.only}" if args.only else ""
    lines = [
        "# Step time", "", f"Reproduce: `{cmd}` (its docstring says what is measured).", "",
        f"- Date: {info['date']}; run took {info['seconds']:.0f} s; load average "
        f"{info['load_average_start']} at the start, {info['load_average_end']} at the end",
        f"- Machine: {_harness.cpu_line(info)}, {info['cpu_count']} logical CPUs, "
        f"{info['platform']}",
        f"- Software: Python {info['python']}, torch {info['torch']} (threads: {info['threads']}), "
        f"BackPACK {info.get('backpack-for-pytorch')}, "
        f"asdfghjkl {info.get('asdfghjkl', 'not installed')}",
        f"- Network: MNIST autoencoder {'-'.join(map(str, WIDTHS))}, ReLU, BCEWithLogitsLoss, "
        "random data, float32, CPU",
        "- ms/step: amortised over windows of T steps (one statistics and one inverse step "
        "each), median over windows; ratio: over Adam's step timed next to it; est.: estimated "
        "from one (cold) statistics+inverse step and regular steps, for methods too slow for "
        "whole windows",
        "- floor: what a perfect implementation must do, as a ratio to Adam: an Adam step + the "
        "apply every step + (factor GEMMs + MC backward + inverses) / T; KFAC-PI, KPSVD, ASDL: "
        "2-product apply, Cholesky; EIGEN: 4-product apply, eigh; two-term methods: 4-product "
        "apply, Cholesky + eigh; NG: Woodbury apply, kernel and its Cholesky (docstring of "
        "`benchmarks/step_time.py`). Its Adam step is the design's choice: SGD's step is cheaper, "
        "so a method with an SGD-like update (ASDL) can sit below the floor",
        *(["- threads: 1, for a machine shared with other jobs (with 2 threads on 2 cores, any "
           "other process stalls OpenMP's barriers and steps get up to 10x slower in bursts)"]
          if args.threads == 1 else []), "",
        "| " + " | ".join(HEADER) + " |", "|---" * 3 + "|---:" * 5 + "|---|",
    ]  # fmt: skip
    for result in results.values():
        lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    lines += ["", *(f"- batch {b}: {floor_line(r)}" for b, r in results.items())]
    lines += [
        "", "Time split (ms per step, mean over the windows, from `opt.last_stats`: statistics = "
        "forward and backward of the statistics steps; forward_backward = those of the other "
        "steps; update = folding statistics into the approximation; parameters = momentum and "
        "parameter update; step = the `record()` blocks and `opt.step()`) and the worker's peak "
        "RSS (torch included):", "",
        "| method | batch | T | " + " | ".join(SPLIT) + " | peak RSS [MiB] |",
        "|---" * 3 + "|---:" * (len(SPLIT) + 1) + "|",
    ]  # fmt: skip
    for r in (r for result in results.values() for r in result["rows"] if r.rss_mib):
        split = [sum(w["split"].get(k, 0.0) for w in r.windows) for k in SPLIT]
        n = max(len(r.windows), 1)
        cells = [f"{1e3 * v / n:.1f}" if any(split) else "" for v in split]
        row = [r.label, str(r.batch), str(r.interval or "-"), *cells, f"{r.rss_mib:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def profile(name: str, batch: int, interval: int) -> None:
    """Print a cProfile of one window of ``interval`` steps after the warm-up."""
    step = make_step(name, batch, interval)
    for _ in range(WARMUP):
        step()
    prof = cProfile.Profile()
    prof.runcall(lambda: [step() for _ in range(interval)])
    stats = pstats.Stats(prof).strip_dirs()
    stats.sort_stats("cumulative").print_stats(35)
    stats.sort_stats("tottime").print_stats(20)


def interleaved(args: argparse.Namespace) -> None:
    """Time the ``--only`` rows step by step in one process (module docstring)."""
    batch, first, rounds = args.batch_sizes[0], args.intervals[0], args.interleave
    names = [n for n in args.names if n not in BASELINES]
    steps = {name: make_step(name, batch, first) for name in names}
    for name in names:  # warm-up: one whole window each
        for _ in range(first):
            steps[name]()
    times: dict[str, dict[bool, list[float]]] = {n: {False: [], True: []} for n in names}
    start, load_start = time.monotonic(), [round(v, 2) for v in os.getloadavg()]
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for _ in range(first):
            for name in order:
                gc.disable()
                elapsed, (special, _split) = timed(steps[name])
                gc.enable()
                times[name][special].append(elapsed)
    med = {n: {k: statistics.median(v) for k, v in t.items() if v} for n, t in times.items()}
    base = names[0]

    def amortised(name: str, interval: int) -> float:
        return (med[name][True] + (interval - 1) * med[name][False]) / interval

    head = ["method", "plain step [ms]", "statistics step [ms]"]
    head += [f"T={t} [ms]" for t in args.intervals] + [f"T={t} ratio" for t in args.intervals]
    rows = [head]
    for name in names:
        row = [REGISTRY[name].label, *(f"{1e3 * med[name][k]:.1f}" for k in (False, True))]
        row += [f"{1e3 * amortised(name, t):.1f}" for t in args.intervals]
        row += [f"{amortised(name, t) / amortised(base, t):.3f}" for t in args.intervals]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in
                        enumerate(zip(row, widths, strict=True))))  # fmt: skip
    info = machine()
    info.update(threads=torch.get_num_threads(), seconds=time.monotonic() - start,
                load_average_start=load_start,
                load_average_end=[round(v, 2) for v in os.getloadavg()])  # fmt: skip
    if args.out is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = (f"python benchmarks/step_time.py --interleave {rounds} --batch-sizes {batch} "
           f"--intervals {','.join(map(str, args.intervals))} --threads {info['threads']} "
           f"--only {','.join(names)}")  # fmt: skip
    lines = [
        f"Reproduce: `{cmd}`; {info['date']}, {_harness.cpu_line(info)} "
        f"({info['cpu_count']} logical CPUs), "
        f"torch {info['torch']}, {info['threads']} thread(s); {rounds} rounds of {first} steps "
        f"per row, {info['seconds']:.0f} s; load average {load_start} at the start, "
        f"{info['load_average_end']} at the end. Ratios are to the first row.", "",
        "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|",
        *("| " + " | ".join(row) + " |" for row in rows[1:]),
    ]  # fmt: skip
    (args.out / "step_time_interleaved.md").write_text("\n".join(lines) + "\n")
    split = {n: {"plain": t[False], "special": t[True]} for n, t in times.items()}
    payload = {"machine": info, "batch": batch, "interval": first, "rounds": rounds, "times": split}
    (args.out / "step_time_interleaved.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out / 'step_time_interleaved.md'} and .json")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(v) for v in text.split(",") if v.strip()]

    # Rows that change only an optimizer option run when named (--device's default has them).
    names = [*BASELINES, *(n for n, spec in REGISTRY.items() if not spec.optimizer)]
    p = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    p.add_argument(
        "--batch-sizes",
        type=ints,
        default=None,
        help="default: 512,1000 (CPU mode), 1000,8192 (--device)",
    )
    p.add_argument("--intervals", type=ints, default=[10, 100], help="T = t_cov = t_inv")
    p.add_argument("--quick", action="store_true", help="batch 64, T=2, few steps; no files")
    rows = f"comma-separated of: {', '.join(names)}"
    p.add_argument("--methods", "--only", dest="only", default="", help=rows)
    p.add_argument("--out", type=Path, default=None, help=f"default: {DEFAULT_OUT}")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--window-steps", type=int, default=30, help="windows = this // T (>= 1)")
    p.add_argument("--floor-rounds", type=int, default=5)
    p.add_argument("--direct-max", type=int, default=100, help="larger T: composed, not timed")
    p.add_argument("--slow-seconds", type=float, default=5.0, help="estimate slower methods")
    p.add_argument("--max-step-seconds", type=float, default=30.0, help="stop slower steps")
    p.add_argument("--idle-wait", type=float, default=0.5, help="most seconds to wait for idle")
    p.add_argument("--profile", default=None, help="print a cProfile of one window of this row")
    p.add_argument("--interleave", type=int, default=0, help="rounds of the interleaved mode")
    p.add_argument("--plot", type=Path, default=None, help="only redraw the chart of this JSON")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    device = p.add_argument_group("device mode (benchmarks/device_step.py)")
    device.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="time in one process on this device")  # fmt: skip
    device.add_argument("--windows", type=int, default=5, help="timed windows per row")
    device.add_argument("--resnet-batch", type=int, default=128, help="ResNet-18 batch; 0: none")
    device.add_argument("--budget", type=float, default=None,
                        help="seconds; rows that would start later are not run")  # fmt: skip
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.batch_sizes is None:
        args.batch_sizes = [1000, 8192] if args.device else [512, 1000]
    if args.quick:
        args.batch_sizes, args.intervals, args.window_steps = [64], [2], 4
        args.floor_rounds, args.idle_wait, args.max_step_seconds = 1, 0.0, 10.0
        args.windows, args.resnet_batch = 1, 0
    if args.device and not args.only:
        args.only = ",".join(DEVICE_ROWS)
    args.names = [n.strip() for n in args.only.split(",") if n.strip()] or names
    known = [*BASELINES, *REGISTRY]
    if set(args.names) - set(known):
        p.error(f"unknown names {sorted(set(args.names) - set(known))}; choose from {known}")
    args.names = [n for n in dict.fromkeys(args.names) if n != "adam"]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args.worker, args.batch_sizes[0])
    if args.device:
        import device_step

        return device_step.run(args)
    if args.profile:
        return profile(args.profile, args.batch_sizes[0], args.intervals[0])
    if args.interleave:
        return interleaved(args)
    if args.plot:
        return plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
    info, start, results, too_slow = machine(), time.monotonic(), {}, dict[str, int]()
    info["threads"] = torch.get_num_threads()
    print(f"torch {info['torch']}, {info['threads']} threads, load {info['load_average_start']}")
    for batch in args.batch_sizes:
        print(f"batch {batch}: {', '.join(['adam', *args.names])}", flush=True)
        results[batch] = measure(batch, args.names, args, too_slow)
        print(text_table(table_rows(results[batch])), floor_line(results[batch]), sep="\n")
        print(f"({time.monotonic() - start:.0f} s so far)", flush=True)
    info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    info["seconds"] = time.monotonic() - start
    out: Path | None = args.out or (None if args.quick else DEFAULT_OUT)
    if out is None:
        return None
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": info, "config": {k: v for k, v in vars(args).items() if k != "out"},
        "settings": {"lr": LR, "damping": DAMPING, "kl_clip": KL_CLIP, "momentum": MOMENTUM,
                     "warmup": WARMUP, "chunk": CHUNK, "floors": FLOORS},
        "results": {b: {**r, "rows": [vars(row) for row in r["rows"]]} for b, r in results.items()},
    }  # fmt: skip
    (out / "step_time.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (out / "step_time.md").write_text(markdown(info, args, results))
    plot(json.loads((out / "step_time.json").read_text()), out / "step_time.png")
    print(f"wrote {out / 'step_time.json'}, .md and .png")
    return None


def plot(payload: dict[str, Any], path: Path) -> None:
    """Bar chart: each method's step as a ratio to Adam, with its floor marked, per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted(payload["results"], key=int)
    fig, axes = plt.subplots(
        len(batches), 1, figsize=(11, 3.6 * len(batches)), squeeze=False, constrained_layout=True
    )
    for ax, batch in zip(axes[:, 0], batches, strict=True):
        rows = [r for r in payload["results"][batch]["rows"] if r["interval"] and r["ratio"]]
        intervals = sorted({r["interval"] for r in rows})
        labels = list(dict.fromkeys(r["label"] for r in rows))
        width = 0.8 / len(intervals)
        for k, interval in enumerate(intervals):
            by_label = {r["label"]: r for r in rows if r["interval"] == interval}
            xs = [i + (k - (len(intervals) - 1) / 2) * width for i in range(len(labels))]
            ratios = [by_label[lb]["ratio"] if lb in by_label else 0.0 for lb in labels]
            ax.bar(xs, ratios, width, label=f"T = {interval}", alpha=0.85)
            floors = [(x, by_label[lb]["floor"]) for x, lb in zip(xs, labels, strict=True)
                      if lb in by_label and by_label[lb]["floor"]]  # fmt: skip
            ax.scatter([x for x, _ in floors], [f for _, f in floors], marker="_", s=300,
                       color="black", zorder=3, label="floor" if k == 0 else None)  # fmt: skip
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("step time / Adam's")
        ax.set_title(f"batch {batch}: amortised step (statistics and inverse every T steps)")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
