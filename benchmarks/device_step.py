r"""Step time on one device, in one process: ``benchmarks/step_time.py --device cpu|cuda``.

Run from the repository root::

    python benchmarks/step_time.py --device cuda           # the full run (GPU: a few minutes)
    python benchmarks/step_time.py --device cpu --batch-sizes 1000 --intervals 10 \
        --methods adam,sgd,kfac,ekfac,diag --resnet-batch 32
    python benchmarks/step_time.py --device cpu --quick --out /tmp/st   # smoke test

``step_time.py`` parses the arguments and calls ``run`` here; without ``--device`` it
times in paired CPU subprocesses instead (its own docstring).

**Problems.** The MNIST-sized autoencoder of ``step_time.py`` (784-1000-500-250-30
mirrored, ReLU, ``BCEWithLogitsLoss``, random data) at every ``--batch-sizes`` (default
1000 and 8192), and torchvision's ResNet-18 (``resnet18(num_classes=10)``, train mode,
``CrossEntropyLoss``, random 32x32 images and labels) at ``--resnet-batch`` (default 128;
0: none). Without torchvision the ResNet rows say so. float32, torch's default
precision settings (no TF32).

**Rows** (``--methods``; default ``adam, sgd, kfac, ekfac, kpsvd, diag, exact-ng``): Adam
(always, the reference), SGD with momentum 0.9, and each named ``REGISTRY`` entry built
by ``step_time.build_step`` exactly as the CPU mode builds it (a ``PreconditionedOptimizer``
with MC Fisher, damping 1e-3, KL clip 1e-2, momentum 0.9, ``t_cov = t_inv = T``,
``refresh_on_move=0``) at every ``--intervals`` ``T`` (default 10 and 100). A row whose
set-up or step raises says why (``error``) and the run goes on.

**Timing.** Each row gets a fresh, seeded model and optimizer. The optimizer's warm-up
refreshes the curvature at steps 0, 1, 2, 4, 8; the row runs past it (``DEFAULTS.warmup``
steps) and on to its next statistics step, so that from then on statistics and inverse
come exactly every ``T`` steps. A *window* is ``T`` consecutive steps (``zero_grad``,
forward and backward in ``record()``, ``step``) holding exactly one statistics+inverse
step (checked); on CUDA the host waits for the device (``torch.cuda.synchronize``) only
at the window's ends, never inside it. ms/step is the median over ``--windows`` windows
of the window's time over ``T``: the step time amortised over ``T``. Adam and SGD
windows have ``max(10, min(T))`` steps. GC is paused within a window.

**Host reads and kernels** (outside the timed windows, on steps of the first ``T``): for
one regular step and one statistics+inverse step each, the host reads of device numbers
counted by ``curvlib.optim.syncs.host_reads`` (a dispatch-mode counter: the same count on
any device); on CUDA also the warnings of ``torch.cuda.set_sync_debug_mode("warn")`` on
the same steps; and, on other steps of each kind, ``torch.profiler``: on CUDA the kernels
the device ran (its CUDA events but memory copies and sets) and the kernel launches of the
host (``cudaLaunchKernel*`` and ``cuLaunchKernel*`` calls), on the CPU the ``aten::``
operators dispatched (nested ones included): the CPU's proxy for launches.

**Peak memory**: ``torch.cuda.max_memory_allocated`` from the row's set-up to its last
window (model, data, optimizer state, activations), after ``reset_peak_memory_stats``. On
the CPU it is ``null``: the CPU allocator keeps no such count, and the process's peak RSS
mixes all rows.

**Floor** (autoencoder only; ResNet-18 rows have none): what a step must cost on this
device, from ``step_time.floor_components(batch, device)`` (real activations, all 8
layers), each timed as the median of ``--floor-rounds`` windows of ``FLOOR_REPS`` calls,
synchronised at the window's ends: ``floor(T) = base_step + apply + (statistics +
factorisations) / T`` with ``base_step`` a sync-free regular step without preconditioner
(forward, backward, ``torch._foreach`` momentum and parameter update) and the other
parts named by ``step_time.FLOORS`` for the row's approximation: for KFAC the apply
``G⁻¹ V A⁻¹`` per layer (``apply2``), the MC backward and the factor GEMMs, the Cholesky
inverses of all factors; for EKFAC the eigenbasis apply (``apply4``), the MC backward,
GEMMs, ``eigh`` of all factors and the eigenbasis scalings. ``÷ floor`` is ms/step over
``floor(T)``; the targets (issue 27, on a GPU): KFAC within 1.15x of its floor at T = 10
and 100 and batch 1000 and 8192, EKFAC within 1.3x, the diagonal at most 1.1x Adam, KFAC
at most 1.4x SGD on ResNet-18.

**Outputs** in ``--out`` (default ``benchmarks/results``), rewritten after every problem
so that a run cut short keeps what it measured: ``step_time_<device>.json`` (every window,
count and floor component, the device's name, torch version, commit, date and command)
and ``step_time_<device>.md`` (the table under those facts). ``--budget S``: rows that
would start after ``S`` seconds are not run (their row says so). The commit is read
from git, or from ``CURVLIB_COMMIT`` where the tree has no ``.git`` (the GPU machine).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from curvlib.optim.defaults import DEFAULTS
from curvlib.optim.syncs import host_reads

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import commit, machine, write_json
from step_time import (
    BASELINES,
    DAMPING,
    DEFAULT_OUT,
    FLOORS,
    KL_CLIP,
    LR,
    MOMENTUM,
    REGISTRY,
    WIDTHS,
    Problem,
    StepFn,
    autoencoder_problem,
    build_step,
    floor_components,
)

FLOOR_REPS = 3  # calls of a floor component per timed window
BASELINE_WARMUP = 3  # steps before Adam's and SGD's windows
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel")  # prefixes of the host's launch calls
Counts = dict[str, int | None]  # per step kind: "regular", "statistics"


@dataclass
class Row:
    """One row: a method on one problem, batch and interval (times in milliseconds)."""

    problem: str
    name: str
    label: str
    batch: int
    interval: int | None
    windows_ms: list[float] = field(default_factory=list)
    ms: float | None = None
    vs_adam: float | None = None
    vs_sgd: float | None = None
    floor_ms: float | None = None
    vs_floor: float | None = None
    host_reads: Counts | None = None
    sync_warnings: Counts | None = None
    kernels: Counts | None = None
    launches: Counts | None = None
    peak_mib: float | None = None
    note: str = ""
    error: str | None = None


class RowError(RuntimeError):
    """A row cannot be measured (too slow, or its statistics do not come every ``T`` steps)."""


def resnet_problem(batch: int, device: str | torch.device) -> Problem:
    """Seeded torchvision ResNet-18 (10 classes, train mode) and 32x32 random images."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    return model.to(device), nn.CrossEntropyLoss(), x.to(device), y.to(device)


@dataclass(frozen=True)
class Task:
    """A problem at one batch size; ``floor``: whether ``floor_components`` models it."""

    name: str
    batch: int
    make: Callable[[int, torch.device], Problem]
    floor: bool


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free the last row's memory, so that the next row's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def window(fn: Callable[[], Any], count: int, device: torch.device) -> tuple[float, list[Any]]:
    """Seconds for ``count`` calls of ``fn``, synchronised before and after only."""
    sync(device)
    gc.disable()
    try:
        start = time.perf_counter()
        out = [fn() for _ in range(count)]
        sync(device)
        return time.perf_counter() - start, out
    finally:
        gc.enable()


# -- what a step does besides taking time ---------------------------------------------------


def count_reads(step: StepFn, device: torch.device) -> tuple[bool, int, int | None]:
    """One step: whether it was a statistics step, its host reads and sync warnings (CUDA)."""
    cuda = device.type == "cuda"
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with host_reads() as reads:
                special, _ = step()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    sync(device)
    flagged = sum("synchroniz" in str(w.message).lower() for w in caught)
    return special, reads.count, flagged if cuda else None


def count_kernels(step: StepFn, device: torch.device) -> tuple[bool, int, int | None]:
    """One step under ``torch.profiler``: kernels run and launched (CUDA), else aten ops."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    sync(device)
    with profile(activities=activities) as prof:
        special, _ = step()
        sync(device)
    events = prof.events()
    if not cuda:
        return special, sum(e.name.startswith("aten::") for e in events), None
    kernels = sum(
        e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
        for e in events
    )
    return special, kernels, sum(e.name.startswith(LAUNCHES) for e in events)


# -- one row ---------------------------------------------------------------------------


class Stepper:
    """A row's step with the bookkeeping of its schedule: statistics every ``T`` steps."""

    def __init__(self, step: StepFn, interval: int | None, device: torch.device, limit: float):
        self.step, self.interval, self.device, self.limit = step, interval, device, limit
        self.since: int | None = None  # steps since the last statistics step

    @property
    def next_special(self) -> bool:
        """Whether the next step is due to compute statistics and inverses."""
        return self.interval is not None and self.since == self.interval - 1

    def advance(self, special: bool, check: bool = True) -> None:
        """Book a step; once the schedule is known (and ``check``), check the step against it."""
        if check and self.since is not None and special != self.next_special:
            kind = "statistics" if special else "regular"
            raise RowError(
                f"statistics not every T={self.interval} steps: a {kind} step "
                f"{self.since + 1} steps after the last statistics step"
            )
        if special:
            self.since = 0
        elif self.since is not None:
            self.since += 1

    def run(self, count: int, check: bool = True) -> None:
        """``count`` steps, each timed on its own (warm-up): a slow one stops the row."""
        for _ in range(count):
            seconds, [(special, _)] = window(self.step, 1, self.device)
            if seconds > self.limit:
                raise RowError(f"a step took {seconds:.1f} s > --max-step-seconds {self.limit:g}")
            self.advance(special, check)

    def warm_up(self) -> None:
        """Past the optimizer's warm-up, to just after a statistics step (baselines: 3 steps)."""
        if self.interval is None:
            return self.run(BASELINE_WARMUP)
        self.run(DEFAULTS.warmup, check=False)  # statistics at 0, 1, 2, 4, 8 and every T
        self.realign()

    def realign(self) -> None:
        """Forget the schedule and run to the next statistics step."""
        self.since = None
        for _ in range(self.interval or 0):
            self.run(1)
            if self.since is not None:
                return None
        if self.interval is not None:
            raise RowError(f"no statistics step within T={self.interval} steps")

    def instrumented(self, fn: Callable[[StepFn, torch.device], tuple[bool, int, int | None]],
                     kind: str) -> tuple[int, int | None]:  # fmt: skip
        """Run regular steps until the next is of ``kind``, then that step under ``fn``."""
        while (kind == "statistics") != self.next_special:
            self.run(1)
        special, count, extra = fn(self.step, self.device)
        self.advance(special)
        return count, extra


def probe(stepper: Stepper, row: Row) -> None:
    """Host reads, sync warnings and kernels of a regular and a statistics step."""
    kinds = ["regular"] + ["statistics"] * (stepper.interval is not None)
    reads: Counts = {k: None for k in ("regular", "statistics")}
    flagged, kernels, launches = dict(reads), dict(reads), dict(reads)
    for kind in kinds:
        reads[kind], flagged[kind] = stepper.instrumented(count_reads, kind)
        kernels[kind], launches[kind] = stepper.instrumented(count_kernels, kind)
    row.host_reads, row.kernels = reads, kernels
    if stepper.device.type == "cuda":
        row.sync_warnings, row.launches = flagged, launches


def measure_row(row: Row, task: Task, device: torch.device, args: argparse.Namespace,
                counts: bool) -> None:  # fmt: skip
    """Set up, warm up, count (``counts``) and time one row, filling in ``row``."""
    release(device)
    interval = row.interval
    step = build_step(row.name, *task.make(task.batch, device), interval or 1)
    stepper = Stepper(step, interval, device, args.max_step_seconds)
    stepper.warm_up()
    if counts:
        try:
            probe(stepper, row)
        except RowError:
            raise
        except Exception as err:  # the counts are lost, the timing is not
            row.note = f"counts failed: {_short(err)}"
            traceback.print_exc(limit=-3)
            stepper.realign()
    steps = interval or max(10, min(args.intervals))
    for _ in range(args.windows):
        seconds, out = window(step, steps, device)
        for special, _ in out:
            stepper.advance(special)
        row.windows_ms.append(1e3 * seconds / steps)
        if seconds / steps > args.max_step_seconds:
            row.note = f"{len(row.windows_ms)} window(s): steps over --max-step-seconds"
            break
    row.ms = statistics.median(row.windows_ms)
    if device.type == "cuda":
        row.peak_mib = torch.cuda.max_memory_allocated(device) / 2**20


# -- the floor -------------------------------------------------------------------------


def time_floor(batch: int, names: Sequence[str], device: torch.device,
               rounds: int) -> dict[str, float]:  # fmt: skip
    """Median seconds of each floor component the ``names`` need, at ``batch``."""
    kinds = dict.fromkeys(REGISTRY[n].floor for n in names if n in REGISTRY)
    needed = ["base_step", *dict.fromkeys(c for k in kinds for p in FLOORS[k] for c in p)]
    comps = floor_components(batch, device)
    out = {}
    for name in needed:
        window(comps[name], 1, device)  # warm-up
        out[name] = statistics.median(
            window(comps[name], FLOOR_REPS, device)[0] / FLOOR_REPS for _ in range(max(rounds, 1))
        )
    return out


def floor_seconds(parts: dict[str, float], kind: str, interval: int) -> float:
    """``base_step + every-step parts + per-T parts / T`` (module docstring)."""
    every, per_t = FLOORS[kind]
    return (
        parts["base_step"] + sum(parts[c] for c in every) + sum(parts[c] for c in per_t) / interval
    )


# -- one problem -----------------------------------------------------------------------


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= 2000 else text[:1000] + " … " + text[-900:]


def _cell(text: str) -> str:
    """``text`` for a table cell: its start and end where it is long."""
    text = text.replace("|", "/")
    return text if len(text) <= 240 else text[:90] + " … " + text[-140:]


def measure_task(task: Task, args: argparse.Namespace, device: torch.device, start: float,
                 floors: dict[str, Any]) -> list[Row]:  # fmt: skip
    """The rows of one problem and batch; its floor components go into ``floors``."""
    key = f"{task.name}/{task.batch}"
    if task.floor:
        try:
            floors[key] = time_floor(task.batch, args.names, device, args.floor_rounds)
        except Exception as err:  # the rows say floor n/a; the JSON says why
            floors[key] = {"error": _short(err)}
        release(device)
    failed: dict[str, str] = {}
    rows = []
    for name in ["adam", *args.names]:
        spec = REGISTRY.get(name)
        label = spec.label if spec else BASELINES[name]
        for n, interval in enumerate(args.intervals if spec else [None]):
            row = Row(task.name, name, label, task.batch, interval)
            rows.append(row)
            if name in failed:
                row.error = failed[name]
                continue
            if args.budget is not None and time.monotonic() - start > args.budget:
                row.error = f"not run: the --budget of {args.budget:g} s was spent"
                continue
            print(f"  {task.name} batch {task.batch} {name} T={interval or '-'}", flush=True)
            try:
                measure_row(row, task, device, args, counts=n == 0)
            except Exception as err:  # the row says why
                row.error, row.windows_ms = _short(err), []
                if not isinstance(err, RowError):
                    traceback.print_exc(limit=-3)
                failed[name] = f"{row.error} (as at T={interval})" if interval else row.error
            release(device)
    ratios(rows, floors.get(key, {}))
    return rows


def ratios(rows: list[Row], parts: dict[str, float]) -> None:
    """Each row's ratio to Adam and SGD on its problem, and to its floor."""
    ref = {r.name: r.ms for r in rows if r.interval is None and r.ms}
    for r in rows:
        if r.ms is None:
            continue
        r.vs_adam = r.ms / ref["adam"] if ref.get("adam") else None
        r.vs_sgd = r.ms / ref["sgd"] if ref.get("sgd") else None
        spec = REGISTRY.get(r.name)
        if spec and r.interval and "base_step" in parts:
            r.floor_ms = 1e3 * floor_seconds(parts, spec.floor, r.interval)
            r.vs_floor = r.ms / r.floor_ms


def tasks(args: argparse.Namespace) -> list[Task]:
    """The autoencoder at every batch size, then ResNet-18 (unless ``--resnet-batch 0``)."""
    out = [Task("autoencoder", b, autoencoder_problem, floor=True) for b in args.batch_sizes]
    if args.resnet_batch:
        out.append(Task("resnet18", args.resnet_batch, resnet_problem, floor=False))
    return out


def torchvision_error() -> str | None:
    """Why ResNet-18 cannot be built here, or ``None``."""
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # ImportError, or a torchvision built for another torch
        return f"not run: torchvision not importable ({_short(err)})"
    return None


# -- report ----------------------------------------------------------------------------


def device_info(device: torch.device) -> dict[str, Any]:
    """The device's name and what runs it."""
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )  # fmt: skip
    else:
        info.update(name=machine_cpu(), threads=torch.get_num_threads())
    return info


def machine_cpu() -> str:
    """The CPU's model name."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _pair(counts: Counts | None) -> str:
    if counts is None:
        return "n/a"
    regular, stats = counts.get("regular"), counts.get("statistics")
    return f"{regular} / {'-' if stats is None else stats}"


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: Sequence[Row], cuda: bool) -> list[str]:
    """The Markdown table of ``rows``."""
    ops = "kernels (reg / stats)" if cuda else "aten ops, CPU proxy (reg / stats)"
    head = ["problem", "method", "batch", "T", "ms/step", "÷ Adam", "÷ SGD", "floor ms",
            "÷ floor", "host reads (reg / stats)", "sync warnings (reg / stats)", ops,
            "launches (reg / stats)", "peak MiB", "note"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 3) + "---|"]
    for r in rows:
        t = "-" if r.interval is None else str(r.interval)
        if r.error:
            cells = [r.problem, r.label, str(r.batch), t, *[""] * (len(head) - 5), _cell(r.error)]
        else:
            cells = [
                r.problem, r.label, str(r.batch), t, _num(r.ms, ".2f"), _num(r.vs_adam, ".2f"),
                _num(r.vs_sgd, ".2f"), _num(r.floor_ms, ".2f"), _num(r.vs_floor, ".2f"),
                _pair(r.host_reads), _pair(r.sync_warnings) if cuda else "n/a (CUDA only)",
                _pair(r.kernels), _pair(r.launches) if cuda else "n/a",
                _num(r.peak_mib, ".0f"), r.note,
            ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(payload: dict[str, Any], rows: Sequence[Row]) -> str:
    """The report: the facts of the run, the table, the floor components."""
    dev, mach, cuda = payload["device"], payload["machine"], payload["device"]["type"] == "cuda"
    where = (
        f"{dev['name']} ({dev['memory_gib']} GiB, CUDA {dev['cuda']}), host {mach['cpu']}"
        if cuda
        else f"CPU: {dev['name']}, {mach['cpu_count']} logical CPUs, {dev['threads']} thread(s)"
    )
    lines = [
        f"# Step time on {dev['name']}", "",
        f"- Device: {where}",
        f"- Date: {payload['date']}; commit `{payload['commit']}`; run took "
        f"{payload['seconds']:.0f} s",
        f"- Software: torch {dev['torch']}, Python {mach['python']}, BackPACK {mach['backpack']}",
        f"- Command: `{payload['command']}`",
        f"- Settings: {payload['settings']['windows']} window(s) per row; warm-up "
        f"{DEFAULTS.warmup} steps, then to the next statistics step; lr {LR}, damping "
        f"{DAMPING}, KL clip {KL_CLIP}, momentum {MOMENTUM}, t_cov = t_inv = T",
        "- ms/step: the median window of T steps (one statistics+inverse step each) over T; "
        "÷ Adam, ÷ SGD: over those rows of the same problem in this run; floor: base step + "
        "apply + (MC backward + GEMMs + factorisations) / T on this device "
        "(`benchmarks/device_step.py`)",
        "- host reads: `curvlib.optim.syncs.host_reads` on one regular and one statistics "
        "step; " + ("sync warnings: `torch.cuda.set_sync_debug_mode('warn')` on the same "
                    "steps; kernels: CUDA kernels run, launches: `cudaLaunchKernel*`/"
                    "`cuLaunchKernel*` calls, from `torch.profiler`; peak: "
                    "`torch.cuda.max_memory_allocated`" if cuda else
                    "aten ops: `aten::` operators dispatched, from `torch.profiler` (the "
                    "CPU's proxy for kernel launches); no sync warnings, launches or peak "
                    "memory on the CPU"), "",
        *table(rows, cuda), "",
    ]  # fmt: skip
    for key, parts in payload["floors"].items():
        text = ", ".join(
            f"{k} {1e3 * v:.2f} ms" if isinstance(v, float) else f"{k}: {v}"
            for k, v in parts.items()
        )
        lines.append(f"- floor components, {key}: {text}")
    return "\n".join(lines) + "\n"


def write(out: Path, payload: dict[str, Any], rows: Sequence[Row]) -> None:
    """``step_time_<device>.json`` and ``.md`` in ``out``."""
    payload = {**payload, "rows": [asdict(r) for r in rows]}
    name = f"step_time_{payload['device']['type']}"
    write_json(out / f"{name}.json", payload)
    (out / f"{name}.md").write_text(markdown(payload, rows))


def run(args: argparse.Namespace) -> None:
    """Measure every problem's rows on ``args.device`` and write the report."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    start = time.monotonic()
    info = machine()
    sha = commit()
    payload: dict[str, Any] = {
        "device": device_info(device), "machine": info, "date": info["date"],
        "commit": os.environ.get("CURVLIB_COMMIT", sha) if sha == "unknown" else sha,
        "command": shlex.join(["python", "benchmarks/step_time.py", *args.argv]), "seconds": 0.0,
        "settings": {
            "batch_sizes": args.batch_sizes, "intervals": args.intervals,
            "resnet_batch": args.resnet_batch, "methods": ["adam", *args.names],
            "windows": args.windows, "floor_rounds": args.floor_rounds,
            "floor_reps": FLOOR_REPS, "warmup": DEFAULTS.warmup, "lr": LR,
            "damping": DAMPING, "kl_clip": KL_CLIP, "momentum": MOMENTUM,
            "widths": list(WIDTHS), "floors": FLOORS, "budget": args.budget,
        },
        "floors": {},
    }  # fmt: skip
    out: Path = args.out or (None if args.quick else DEFAULT_OUT)
    print(f"{payload['device']['name']}, torch {torch.__version__}, commit {payload['commit']}")
    rows: list[Row] = []
    missing = torchvision_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the layers without a curvature block
        for task in tasks(args):
            if task.name == "resnet18" and missing:
                for name in ["adam", *args.names]:
                    spec = REGISTRY.get(name)
                    rows += [
                        Row(task.name, name, spec.label if spec else BASELINES[name],
                            task.batch, t, error=missing)
                        for t in (args.intervals if spec else [None])
                    ]  # fmt: skip
            else:
                rows += measure_task(task, args, device, start, payload["floors"])
            payload["seconds"] = time.monotonic() - start
            if out is not None:
                write(out, payload, rows)
    print("\n".join(table(rows, device.type == "cuda")))
    if out is not None:
        print(f"wrote {out / f'step_time_{device.type}.json'} and .md")
