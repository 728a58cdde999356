"""What every curvlib benchmark shares: the machine, the commit, a progress bar, JSON output.

Each benchmark keeps to what it measures and records where it ran with
``machine()`` and ``commit()``, so that every figure in the docs carries its
machine, date, commit and command.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty where there is none)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    return fields


def machine() -> dict[str, Any]:
    """CPU, core count, load, Python, torch and BackPACK versions, and the UTC date.

    Besides the CPU's name (which a virtual machine may shorten to its vendor's
    line, "AMD EPYC" for two generations alike) it records what sets curvlib's
    speed on it: the family and model numbers where ``/proc/cpuinfo`` has them,
    the vector instructions torch's kernels use (``cpu_capability``: ``AVX2``,
    ``AVX512``, ...), and whether curvlib's ``apply_dtype="auto"`` multiplies in
    bfloat16 there (``bfloat16_products``,
    ``curvlib.linalg.precision.cpu_multiplies_bfloat16``).
    """
    from curvlib.linalg.precision import cpu_multiplies_bfloat16

    info = _cpuinfo()
    cpu = info.get("model name") or platform.processor() or platform.machine()
    family, model = info.get("cpu family"), info.get("model")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_model": None if family is None or model is None else f"family {family}, model {model}",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bfloat16_products": cpu_multiplies_bfloat16(),
        "cpu_count": os.cpu_count(),
        "load_average": None if load is None else [round(v, 2) for v in load],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "backpack": importlib.metadata.version("backpack-for-pytorch"),
    }


def cpu_line(m: dict[str, Any]) -> str:
    """The CPU as a report names it: its name, then what ``machine()`` recorded of it.

    Its model, vector instructions and whether curvlib multiplied in bfloat16
    there; runs recorded before these were kept give the name alone.
    """
    parts = [m[key] for key in ("cpu_model", "cpu_capability") if m.get(key)]
    if "bfloat16_products" in m:
        parts.append(f"bfloat16 products {'on' if m['bfloat16_products'] else 'off'}")
    return str(m["cpu"]) + (f" [{'; '.join(parts)}]" if parts else "")


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


def commit() -> str:
    """The checked-out commit (``+dirty`` with uncommitted changes), or ``unknown``."""
    try:
        sha = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def command(argv: Iterable[str] | None = None) -> str:
    """The command line that reproduces this run, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(REPO)
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", str(script), *args])


def progress(items: Iterable[T], total: int, desc: str, enabled: bool = True) -> Iterator[T]:
    """``tqdm`` over ``items`` when it is installed and ``enabled``, else the items as they are."""
    if enabled:
        with contextlib.suppress(ImportError):
            from tqdm import tqdm

            yield from tqdm(items, total=total, desc=desc, leave=False, file=sys.stderr)
            return
    yield from items


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
