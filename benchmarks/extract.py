r"""Cost of curvlib's statistics next to a plain forward and backward pass.

Run from the repository root::

    python benchmarks/extract.py                 # batch 512, 10 repetitions
    python benchmarks/extract.py --quick         # tiny smoke-test config, writes nothing
    python benchmarks/extract.py --only mc-kron-io --repeats 20

The network is the MNIST autoencoder 784-1000-500-250-30-250-500-1000-784:
``Linear`` layers with ``nn.ReLU()`` between them, the 30-unit code layer
linear, logits out, ``BCEWithLogitsLoss`` against targets in ``[0, 1]``.
Random data stands in for MNIST (``x`` uniform in ``[0, 1]``, target ``x``),
float32. Every row is one configuration:

* ``plain``: ``zero_grad``, forward, loss, ``backward`` -- the reference.
* curvlib rows: the same step inside ``with extractor.collect():``, followed
  by ``extractor.statistics()``, for each statistics kind, flavour and backend
  (named in the label; ``Backend.AUTO`` picks autograd for the MC and
  empirical rows and BackPACK for ``EXACT``). The row marked ``[TARGET]`` is
  the one the issue bounds: at most 3x plain.
  ``EXACT`` backpropagates 784 columns per sample, so it runs on a smaller
  batch (``--exact-batch-size``) with fewer repetitions (``--exact-repeats``)
  and is compared with a plain row of that batch size.
* ``mse-*``: BackPACK's own ``KFAC(mc_samples=1)`` extension as an outside
  baseline, on an ``extend``-ed deep copy of the network with ``MSELoss``
  (BackPACK's KFAC cannot handle ``BCEWithLogitsLoss`` with 784 outputs), next
  to the plain step and curvlib's MC Kronecker step of that MSE network.

Every configuration lives in its own worker subprocess of this script
(``--worker NAME``), which builds the seeded model and data, runs 2 warm-up
steps and then waits for commands, so configurations share no allocator
state, caches or hooks. The parent then times them in interleaved rounds, one
step at a time, so slow phases of a shared machine hit all rows alike:

*Time* is the median over at least ``--repeats`` steps, each timed inside its
worker with ``time.perf_counter`` (CUDA: synchronised before and after) and
with Python's garbage collector paused. *Ratio* is the median, over those
steps, of the step's time divided by the time of a step of the plain row of
the same network and batch size timed right before it (plain rows are hence
timed next to every row that divides by them and collect more steps). Before
each step the parent waits, up to ``--idle-wait`` seconds, until the machine
shows no CPU use for 50 ms (``/proc/stat``); steps that ran on a machine busy
with other processes, and rows whose slowest step took over 1.5 times their
fastest, are listed after the table.

*Peak memory* is the extra memory one step needs on top of what is alive
before it (model and data; gradients are reset with
``zero_grad(set_to_none=True)``): activations, gradients, temporaries and the
statistics the step returns. Each memory step gets a fresh extractor (or a
fresh extended copy for BackPACK), so the previous step's statistics are not
counted as already alive. The memory steps run after all timing, 2 unmeasured
and 3 measured, and the median is reported.

* CUDA: ``torch.cuda.max_memory_allocated()`` after
  ``reset_peak_memory_stats()``, minus ``memory_allocated()`` before the step.
* CPU (Linux with glibc): the kernel's resident-set high-water mark. Before
  the step the worker writes ``5`` to ``/proc/self/clear_refs`` (resets
  ``VmHWM`` to the current RSS) and reads the RSS; after the step it reads
  ``VmHWM`` from ``/proc/self/status``; the difference is the peak. The
  kernel tracks every page, so short spikes are not missed. For RSS to follow
  tensor lifetimes, the memory steps run with glibc told to serve every
  allocation of 64 KiB or more by ``mmap`` (``mallopt(M_MMAP_THRESHOLD)``, so
  freed tensors go back to the OS at once) and with ``malloc_trim(0)`` before
  each step (so no freed heap memory is silently reused); timing steps run
  with glibc's default behaviour. Not counted: allocations below 64 KiB and
  library caches kept from earlier steps (e.g. BLAS buffers). Repeated
  measurements of one configuration spread by a few MiB (up to about 15 %).
* CPU elsewhere: not measured (``n/a``).

The table is printed and written to ``benchmarks/results/extract.json`` (all
step times included) and ``benchmarks/results/extract.md`` (with the machine
description), or to ``--out DIR``; ``--quick`` writes nothing unless ``--out``
is given.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness

from curvlib.core.stats import FisherType, StatKind
from curvlib.extract import Backend, CurvatureExtractor

WIDTHS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
WARMUP = 2
MEMORY_WARMUP = 2
MEMORY_REPEATS = 3
TARGET_LIMIT = 3.0
MMAP_THRESHOLD = 64 * 1024
REPLY_PREFIX = "@extract-worker "
PAUSE = 0.05
IDLE_WINDOW = 0.05
IDLE_BUSY = 0.1
NOISY = 1.5
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
MIB = 2.0**20

Step = Callable[[], None]


@dataclass(frozen=True)
class Case:
    """One row of the table.

    Attributes:
        name: Identifier on the command line (``--only``).
        label: Description in the table.
        runner: ``plain``, ``curvlib`` or ``backpack-kfac``.
        loss: ``bce`` (the autoencoder's loss) or ``mse`` (for BackPACK's KFAC).
        baseline: Name of the plain row this row's ratio divides by.
        stats: Statistics kinds for curvlib rows.
        fisher: Fisher flavour for curvlib rows.
        backend: Backend for curvlib rows.
        exact_size: Whether the row runs on the reduced ``EXACT`` batch and repeats.
        target: Whether this is the row the issue bounds by ``TARGET_LIMIT``.
    """

    name: str
    label: str
    runner: str
    loss: str
    baseline: str
    stats: tuple[StatKind, ...] = ()
    fisher: FisherType = FisherType.MC
    backend: Backend = Backend.AUTO
    exact_size: bool = False
    target: bool = False


KRON = (StatKind.KRONECKER,)
KRON_IO = (StatKind.KRONECKER, StatKind.PER_SAMPLE_IO)
BP, AG = Backend.BACKPACK, Backend.AUTOGRAD
MC, EMP, EXACT = FisherType.MC, FisherType.EMPIRICAL, FisherType.EXACT

CASES: tuple[Case, ...] = (
    Case("plain", "plain fwd+bwd", "plain", "bce", "plain"),
    Case("mc-kron", "MC Kronecker (backpack)", "curvlib", "bce", "plain", KRON, MC, BP),
    Case("mc-kron-ag", "MC Kronecker (autograd)", "curvlib", "bce", "plain", KRON, MC, AG),
    Case(
        "mc-kron-io",
        "MC Kronecker + per-sample io (backpack) [TARGET]",
        "curvlib",
        "bce",
        "plain",
        KRON_IO,
        MC,
        BP,
        target=True,
    ),
    Case(
        "mc-kron-io-ag",
        "MC Kronecker + per-sample io (autograd)",
        "curvlib",
        "bce",
        "plain",
        KRON_IO,
        MC,
        AG,
    ),
    Case("emp-kron", "EMPIRICAL Kronecker (backpack)", "curvlib", "bce", "plain", KRON, EMP, BP),
    Case("emp-kron-ag", "EMPIRICAL Kronecker (autograd)", "curvlib", "bce", "plain", KRON, EMP, AG),
    Case(
        "emp-grad",
        "EMPIRICAL per-sample grads (backpack)",
        "curvlib",
        "bce",
        "plain",
        (StatKind.PER_SAMPLE_GRAD,),
        EMP,
        BP,
    ),
    Case("plain-small", "plain fwd+bwd", "plain", "bce", "plain-small", exact_size=True),
    Case(
        "exact-kron",
        "EXACT Kronecker (backpack)",
        "curvlib",
        "bce",
        "plain-small",
        KRON,
        EXACT,
        BP,
        exact_size=True,
    ),
    Case("mse-plain", "MSE net: plain fwd+bwd", "plain", "mse", "mse-plain"),
    Case(
        "mse-mc-kron",
        "MSE net: curvlib MC Kronecker (backpack)",
        "curvlib",
        "mse",
        "mse-plain",
        KRON,
        MC,
        BP,
    ),
    Case(
        "mse-backpack-kfac",
        "MSE net: BackPACK KFAC(mc_samples=1)",
        "backpack-kfac",
        "mse",
        "mse-plain",
    ),
)
CASE_BY_NAME = {case.name: case for case in CASES}


@dataclass
class Result:
    """What one configuration measured (times in seconds, memory in bytes).

    Attributes:
        name: The case name.
        batch_size: Samples per step.
        repeats: Timed steps.
        times: Every timed step.
        median: Median of ``times``.
        peaks: Extra peak memory of each measured memory step.
        peak_bytes: Median of ``peaks``, ``None`` when not measured.
        memory_method: How ``peak_bytes`` was measured.
        threads: ``torch.get_num_threads()`` in the subprocess.
        busy_steps: Steps timed while other processes kept the machine busy.
        error: Why the configuration failed, if it did.
        paired_ratios: Each timed step over the baseline step timed right before it.
        ratio: Median of ``paired_ratios`` (1 for a baseline).
        memory_ratio: ``peak_bytes`` over the baseline's, filled in by the parent.
    """

    name: str
    batch_size: int
    repeats: int
    times: list[float] = field(default_factory=list)
    paired_ratios: list[float] = field(default_factory=list)
    median: float | None = None
    peaks: list[int] = field(default_factory=list)
    peak_bytes: int | None = None
    memory_method: str = ""
    threads: int = 0
    busy_steps: int = 0
    error: str | None = None
    ratio: float | None = None
    memory_ratio: float | None = None


# -- network and steps ------------------------------------------------------------------


def autoencoder() -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(WIDTHS)):
        layers.append(nn.Linear(d_in, d_out))
        code_layer = d_out == min(WIDTHS)
        if i < len(WIDTHS) - 2 and not code_layer:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_loss(kind: str) -> nn.Module:
    return nn.BCEWithLogitsLoss() if kind == "bce" else nn.MSELoss()


def step_factory(
    case: Case, model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor
) -> Callable[[], Step]:
    """Returns a function that builds fresh per-step state and returns the step."""
    if case.runner == "plain":

        def plain() -> Step:
            def step() -> None:
                model.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()

            return step

        return plain

    if case.runner == "curvlib":

        def curvlib() -> Step:
            ex = CurvatureExtractor(
                model,
                loss_fn,
                stats=set(case.stats),
                fisher_type=case.fisher,
                mc_samples=1,
                backend=case.backend,
            )

            def step() -> None:
                model.zero_grad(set_to_none=True)
                with ex.collect():
                    loss = loss_fn(model(x), y)
                    loss.backward()
                ex.statistics()

            return step

        return curvlib

    from backpack import backpack, extend
    from backpack.extensions import KFAC

    # Like curvlib, expected: the first layer's input needs no gradient.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    def backpack_kfac() -> Step:
        ext_model = extend(copy.deepcopy(model))
        ext_loss = extend(make_loss(case.loss))

        def step() -> None:
            ext_model.zero_grad(set_to_none=True)
            with backpack(KFAC(mc_samples=1)):
                loss = ext_loss(ext_model(x), y)
                loss.backward()

        return step

    return backpack_kfac


# -- measurement ------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Step, device: torch.device) -> float:
    """Seconds of one step, with the garbage collector paused inside it."""
    gc.collect()
    _sync(device)
    gc.disable()
    try:
        start = time.perf_counter()
        step()
        _sync(device)
        return time.perf_counter() - start
    finally:
        gc.enable()


class _RssProbe:
    """Peak resident-set increase of a step via ``/proc/self/clear_refs`` and ``VmHWM``."""

    def __init__(self) -> None:
        self._libc: Any = None
        try:
            libc = ctypes.CDLL(None)
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            self._libc = libc
        except (OSError, AttributeError):
            self._libc = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def available(self) -> bool:
        if self._libc is None:
            return False
        try:
            self._reset_peak()
            self._status_kib("VmHWM")
        except OSError:
            return False
        return True

    def prepare(self) -> None:
        """Serve allocations of ``MMAP_THRESHOLD`` bytes or more by ``mmap``."""
        m_mmap_threshold = -3
        if not self._libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD):
            raise OSError("mallopt(M_MMAP_THRESHOLD) failed")

    def measure(self, step: Step) -> int:
        gc.collect()
        self._libc.malloc_trim(0)
        self._reset_peak()
        before = self._rss_bytes()
        step()
        return self._status_kib("VmHWM") * 1024 - before

    @staticmethod
    def _reset_peak() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def _rss_bytes(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise OSError(f"{key} not in /proc/self/status")


def measure_memory(
    make_step: Callable[[], Step], reset: Step, device: torch.device
) -> tuple[list[int], str]:
    """Extra memory of ``MEMORY_REPEATS`` steps, each with fresh state.

    ``MEMORY_WARMUP`` steps run first, unmeasured, to settle the allocator in
    its measuring mode. ``reset`` runs before each step, outside the measurement
    (it drops the gradients, which would otherwise be freed inside the step and
    make room for its own allocations).
    """
    measure: Callable[[Step], int]
    if device.type == "cuda":

        def measure(step: Step) -> int:
            gc.collect()
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - before

        method = "torch.cuda.max_memory_allocated increase"
    else:
        probe = _RssProbe()
        if not probe.available():
            return [], "n/a (needs Linux /proc/self/clear_refs and glibc)"
        probe.prepare()
        measure = probe.measure
        method = "peak RSS increase (VmHWM after clear_refs; mmap threshold 64 KiB)"
    peaks: list[int] = []
    for i in range(MEMORY_WARMUP + MEMORY_REPEATS):
        step = make_step()
        reset()
        peak = measure(step)
        del step
        if i >= MEMORY_WARMUP:
            peaks.append(peak)
    return peaks, method


def _reply(tag: str, payload: Any) -> None:
    print(f"{REPLY_PREFIX}{tag} {json.dumps(payload)}", flush=True)


def worker(case: Case, batch_size: int, device: torch.device) -> None:
    """Serve one configuration to the parent: set up, warm up, then answer commands.

    Commands on stdin, one a line: ``step`` (time one step), ``memory`` (drop the
    timing state, measure peak memory), ``quit``.
    """
    torch.manual_seed(0)
    model = autoencoder().to(device)
    x = torch.rand(batch_size, WIDTHS[0], device=device)
    y = x.clone()
    make_step = step_factory(case, model, make_loss(case.loss), x, y)
    first = make_step()
    for _ in range(WARMUP):
        time_step(first, device)
    step: Step | None = first
    del first
    _reply("ready", {"threads": torch.get_num_threads()})
    for line in sys.stdin:
        command = line.strip()
        if command == "step" and step is not None:
            _reply("time", time_step(step, device))
        elif command == "memory":
            step = None  # frees the timing extractor and its last statistics
            peaks, method = measure_memory(
                make_step, lambda: model.zero_grad(set_to_none=True), device
            )
            _reply("memory", {"peaks": peaks, "method": method})
        elif command == "quit":
            return
        else:
            raise ValueError(f"unknown worker command {command!r}")


# -- orchestration ----------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Sizes of one benchmark run.

    Attributes:
        batch_size: Batch of all rows but the ``EXACT`` ones.
        repeats: Timed steps of those rows.
        exact_batch_size: Batch of the ``EXACT`` rows.
        exact_repeats: Timed steps of the ``EXACT`` Kronecker row.
        device: ``cpu`` or ``cuda``.
        idle_wait: Most seconds to wait for an idle machine before each step.
    """

    batch_size: int
    repeats: int
    exact_batch_size: int
    exact_repeats: int
    device: str
    idle_wait: float

    def sizes(self, case: Case) -> tuple[int, int]:
        """Batch size and timed steps of ``case``."""
        if not case.exact_size:
            return self.batch_size, self.repeats
        repeats = self.exact_repeats if case.runner != "plain" else self.repeats
        return self.exact_batch_size, repeats


class WorkerError(RuntimeError):
    """A worker process died or answered out of protocol."""


class Worker:
    """A subprocess that holds one configuration (see ``worker``).

    Args:
        case: The configuration.
        batch_size: Its batch size.
        device: ``cpu`` or ``cuda``.
    """

    def __init__(self, case: Case, batch_size: int, device: str) -> None:
        self.case = case
        # Lives as long as the worker; close() closes it.
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case.name]
        cmd += ["--batch-size", str(batch_size), "--device", device]
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True
        )

    def receive(self, tag: str) -> Any:
        """The payload of the next reply, which must carry ``tag``."""
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(REPLY_PREFIX):
                got, _, payload = line[len(REPLY_PREFIX) :].partition(" ")
                if got != tag:
                    raise WorkerError(f"expected {tag!r}, got {got!r}")
                return json.loads(payload)
        self._proc.wait()
        self._stderr.seek(0)
        tail = " | ".join(self._stderr.read().strip().splitlines()[-3:])
        raise WorkerError(f"worker exited with code {self._proc.returncode}: {tail}")

    def request(self, command: str, tag: str) -> Any:
        """Send ``command`` and return the payload of the reply."""
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(command + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass  # receive() reports why the worker is gone
        return self.receive(tag)

    def close(self) -> None:
        """Stop the worker."""
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.write("quit\n")
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._stderr.close()


def _cpu_ticks() -> tuple[int, int] | None:
    """Busy and total CPU ticks of the whole machine since boot (Linux), else ``None``."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def wait_for_idle(max_wait: float) -> bool:
    """Wait until the machine is idle for one window, at most ``max_wait`` seconds.

    Returns:
        Whether it was idle (always ``True`` where ``/proc/stat`` is missing).
    """
    deadline = time.monotonic() + max_wait
    while True:
        start = _cpu_ticks()
        time.sleep(IDLE_WINDOW)
        end = _cpu_ticks()
        if start is None or end is None:
            return True
        busy, total = end[0] - start[0], end[1] - start[1]
        if total > 0 and busy <= IDLE_BUSY * total:
            return True
        if time.monotonic() >= deadline:
            return False


def _step(
    name: str, workers: dict[str, Worker], results: dict[str, Result], max_wait: float
) -> float | None:
    """Time one step of ``name``; a dead worker is recorded and dropped."""
    if name not in workers:
        return None
    if max_wait <= 0:
        time.sleep(PAUSE)  # let the previous worker's OpenMP threads go idle
    elif not wait_for_idle(max_wait):
        results[name].busy_steps += 1
    try:
        seconds = float(workers[name].request("step", "time"))
    except WorkerError as err:
        results[name].error = str(err)
        workers.pop(name).close()
        return None
    results[name].times.append(seconds)
    return seconds


def _time_rounds(workers: dict[str, Worker], results: dict[str, Result], max_wait: float) -> None:
    """Interleaved rounds; every non-baseline step is paired with a baseline step."""
    names = list(workers)
    for r in range(max((results[n].repeats for n in names), default=0)):
        # Rotate the order so no configuration always follows the same one.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            result, base = results[name], CASE_BY_NAME[name].baseline
            if name not in workers or len(result.times) >= result.repeats:
                continue
            if base == name:
                partnered = any(
                    CASE_BY_NAME[n].baseline == name
                    and n != name
                    and len(results[n].times) < results[n].repeats
                    for n in workers
                )
                if not partnered:  # else it is timed next to its dependents
                    _step(name, workers, results, max_wait)
                continue
            base_time = _step(base, workers, results, max_wait)
            case_time = _step(name, workers, results, max_wait)
            if base_time and case_time:
                result.paired_ratios.append(case_time / base_time)


def memory_guard(case: Case, batch_size: int, device: str) -> str | None:
    """Why ``case`` is skipped, if its per-sample gradients would not fit in memory.

    A timing step holds the previous step's ``N x params`` float32 gradients
    while it builds the next ones, so it needs about twice that.
    """
    if StatKind.PER_SAMPLE_GRAD not in case.stats or device != "cpu":
        return None
    params = sum((d_in + 1) * d_out for d_in, d_out in itertools.pairwise(WIDTHS))
    needed = 2 * batch_size * params * 4
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    if needed <= 0.8 * available:
        return None
    return (
        f"skipped: per-sample gradients need about {needed / 2**30:.1f} GiB, "
        f"only {available / 2**30:.1f} GiB available"
    )


def run_cases(cases: Sequence[Case], config: Config) -> dict[str, Result]:
    """Start one worker per case, time them in interleaved rounds, then measure memory."""
    results: dict[str, Result] = {}
    workers: dict[str, Worker] = {}
    try:
        for case in cases:
            batch_size, repeats = config.sizes(case)
            results[case.name] = Result(case.name, batch_size, repeats)
            too_big = memory_guard(case, batch_size, config.device)
            if too_big is not None:
                results[case.name].error = too_big
                continue
            workers[case.name] = Worker(case, batch_size, config.device)
        for name, w in list(workers.items()):
            try:
                results[name].threads = w.receive("ready")["threads"]
            except WorkerError as err:
                results[name].error = str(err)
                workers.pop(name).close()
        print(f"  {len(workers)} workers set up and warmed up; timing", flush=True)
        _time_rounds(workers, results, config.idle_wait)
        print("  measuring memory", flush=True)
        for name, w in list(workers.items()):
            try:
                reply = w.request("memory", "memory")
                results[name].peaks = reply["peaks"]
                results[name].memory_method = reply["method"]
            except WorkerError as err:
                results[name].error = str(err)
            workers.pop(name).close()
    finally:
        for w in workers.values():
            w.close()
    _summarise(results)
    return results


def _summarise(results: dict[str, Result]) -> None:
    """Medians and ratios; a baseline's ratio is 1 by definition."""
    for result in results.values():
        if result.error is None and result.times:
            result.median = statistics.median(result.times)
        if result.error is None and result.peaks:
            result.peak_bytes = int(statistics.median(result.peaks))
    for name, result in results.items():
        base = results.get(CASE_BY_NAME[name].baseline)
        if result.error is not None or base is None or base.error is not None:
            continue
        if base is result:
            result.ratio = 1.0
        elif result.paired_ratios:
            result.ratio = statistics.median(result.paired_ratios)
        if result.peak_bytes is not None and base.peak_bytes:
            result.memory_ratio = result.peak_bytes / base.peak_bytes


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {**_harness.machine(), "device": device, "dtype": "float32"}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table_rows(results: dict[str, Result]) -> list[list[str]]:
    rows: list[list[str]] = []
    for name, r in results.items():
        label = CASE_BY_NAME[name].label
        if r.error is not None:
            status = "skipped" if r.error.startswith("skipped") else "failed"
            rows.append([label, str(r.batch_size), status, "", "", "", ""])
            continue
        median_ms = None if r.median is None else r.median * 1e3
        peak_mib = None if r.peak_bytes is None else r.peak_bytes / MIB
        rows.append(
            [
                label,
                str(r.batch_size),
                str(len(r.times)),
                _fmt(median_ms, ".1f"),
                _fmt(r.ratio, ".2f"),
                _fmt(peak_mib, ".1f"),
                _fmt(r.memory_ratio, ".2f"),
            ]
        )
    return rows


HEADER = ["configuration", "batch", "steps", "time [ms]", "ratio", "peak mem [MiB]", "mem ratio"]


def text_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER))]

    def line(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells)

    return "\n".join([line(HEADER), "  ".join("-" * w for w in widths), *map(line, rows)])


def markdown(info: dict[str, Any], config: Config, rows: Sequence[Sequence[str]]) -> str:
    device = info["device"] + (f" ({info['gpu']})" if "gpu" in info else "")
    lines = [
        "# Extractor benchmark",
        "",
        "Generated by `python benchmarks/extract.py`; see its docstring for what is measured.",
        "",
        f"- Date: {info['date']}",
        f"- Machine: {info['cpu']}, {info['cpu_count']} logical CPUs, {info['platform']}",
        f"- Software: Python {info['python']}, torch {info['torch']} "
        f"({info['torch_threads']} threads), BackPACK {info['backpack']}",
        f"- Device: {device}, {info['dtype']}",
        f"- Network: MNIST autoencoder {'-'.join(map(str, WIDTHS))}, ReLU, "
        "BCEWithLogitsLoss (MSELoss in the `MSE net` rows), random data in [0, 1]",
        f"- time: median over the timed steps, after {WARMUP} warm-up steps; the "
        "configurations take turns, one step each",
        "- ratio: median over the steps of (step time / time of a plain fwd+bwd step of the "
        "same network and batch, timed right before it); plain rows are timed next to every "
        "row that divides by them, hence their larger step counts",
        "- peak mem: extra memory of one step over what is alive before it (activations, "
        "gradients, returned statistics); mem ratio: over the plain row's",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def target_verdict(results: dict[str, Result]) -> dict[str, Any]:
    ratios = {n: r.ratio for n, r in results.items() if CASE_BY_NAME[n].target}
    verdict: dict[str, Any] = {"limit": TARGET_LIMIT, "rows": ratios}
    verdict["ok"] = bool(ratios) and all(
        r is not None and r <= TARGET_LIMIT for r in ratios.values()
    )
    return verdict


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per row")
    parser.add_argument("--exact-batch-size", type=int, default=32)
    parser.add_argument("--exact-repeats", type=int, default=3)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=None,
        help="most seconds to wait for an idle machine before each step "
        "(default 2, with --quick 0: never wait)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="batch 32, 2 repeats, EXACT batch 4; no files"
    )
    parser.add_argument(
        "--only", default="", help="comma-separated case names (plain baselines are added)"
    )
    parser.add_argument("--out", type=Path, default=None, help=f"default: {DEFAULT_OUT}")
    parser.add_argument("--worker", choices=sorted(CASE_BY_NAME), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.repeats = 32, 2
        args.exact_batch_size, args.exact_repeats = 4, 2
    if args.idle_wait is None:
        args.idle_wait = 0.0 if args.quick else 2.0
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def selected_cases(only: str) -> list[Case]:
    if not only:
        return list(CASES)
    names = {n.strip() for n in only.split(",") if n.strip()}
    unknown = names - set(CASE_BY_NAME)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; choose from {sorted(CASE_BY_NAME)}")
    names |= {CASE_BY_NAME[n].baseline for n in names}
    return [case for case in CASES if case.name in names]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(CASE_BY_NAME[args.worker], args.batch_size, torch.device(args.device))
        return

    config = Config(
        args.batch_size,
        args.repeats,
        args.exact_batch_size,
        args.exact_repeats,
        args.device,
        args.idle_wait,
    )
    info = machine(args.device)
    print(
        f"torch {info['torch']}, {info['torch_threads']} threads, {info['cpu_count']} CPUs, "
        f"device {args.device}; batch {config.batch_size}, {config.repeats} repeats "
        f"(EXACT: batch {config.exact_batch_size}, {config.exact_repeats} repeats)",
        flush=True,
    )
    results = run_cases(selected_cases(args.only), config)
    rows = table_rows(results)
    print()
    print(text_table(rows))
    memory_methods = {r.memory_method for r in results.values() if r.memory_method}
    print(f"\npeak memory: {'; '.join(sorted(memory_methods))}")
    for name, r in results.items():
        if r.error is not None:
            print(f"{name}: {r.error}")
        elif r.busy_steps or (r.times and max(r.times) > NOISY * min(r.times)):
            print(
                f"{name}: noisy timings (min {min(r.times) * 1e3:.1f} ms, max "
                f"{max(r.times) * 1e3:.1f} ms, {r.busy_steps} of {len(r.times)} steps on "
                "a machine busy with other processes)"
            )
    verdict = target_verdict(results)
    if verdict["rows"]:
        print(
            f"TARGET (<= {TARGET_LIMIT:g}x plain at batch {config.batch_size}): "
            f"{'ok' if verdict['ok'] else 'EXCEEDED'}"
        )

    out: Path | None = args.out or (None if args.quick else DEFAULT_OUT)
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": info,
        "config": config.__dict__
        | {"warmup": WARMUP, "memory_warmup": MEMORY_WARMUP, "memory_repeats": MEMORY_REPEATS},
        "network": {"widths": list(WIDTHS), "activation": "ReLU", "loss": "BCEWithLogitsLoss"},
        "target": verdict,
        "results": [
            r.__dict__ | {"label": CASE_BY_NAME[n].label, "baseline": CASE_BY_NAME[n].baseline}
            for n, r in results.items()
        ],
    }
    (out / "extract.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "extract.md").write_text(markdown(info, config, rows))
    print(f"wrote {out / 'extract.json'} and {out / 'extract.md'}")


if __name__ == "__main__":
    main()
