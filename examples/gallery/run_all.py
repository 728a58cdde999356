"""Run every gallery script and store its output for the documentation.

```
python examples/gallery/run_all.py
```

Each script runs in a fresh Python process from the repository root, with one
thread unless ``OMP_NUM_THREADS`` says otherwise (the models are too small to
gain from more, and the wall times compare across machines). Its standard
output is written to ``docs/gallery/output/<name>.txt``, which the gallery
pages include. The outputs hold no dates or timings, so that
``tests/examples/test_gallery.py`` can compare a new run with them; when and
where they were produced is written once, to
``docs/gallery/output/generated.txt``, which every gallery page shows under its
output.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
GALLERY = ROOT / "examples" / "gallery"
OUTPUT = ROOT / "docs" / "gallery" / "output"
SCRIPTS: tuple[str, ...] = (
    "kfac_in_20_lines",
    "curvature_operator",
    "laplace",
    "ewc",
    "preconditioner_adam",
    "custom_approximation",
)
"""The gallery's scripts, in the order of its index page."""


def _git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers (``/proc/cpuinfo`` on Linux).

    Else what ``platform`` knows. Float32 reductions round differently on other
    CPUs, and the gallery's training runs carry that forward: the stored numbers
    are reproducible on this model only (``tests/examples/test_gallery.py``). The
    name alone can stand for several generations (a virtual machine's ``AMD
    EPYC`` was one without AVX-512 and a Zen 4 with it), so the numbers go with it.
    """
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    if "model name" in fields:
        numbers = [f"{key} {fields[key]}" for key in ("cpu family", "model") if key in fields]
        suffix = f" ({', '.join(numbers)})" if numbers else ""
        return fields["model name"] + suffix
    return platform.processor() or platform.machine() or "unknown"


def provenance(seconds: dict[str, float]) -> str:
    """One line: date, commit, versions, machine, and the time of each script."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--", "curvlib", "examples/gallery"):
        commit += " plus uncommitted changes"
    times = ", ".join(f"{name} {s:.1f} s" for name, s in seconds.items())
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    return (
        f"Outputs generated on {datetime.date.today().isoformat()} by "
        f"`python examples/gallery/run_all.py` at curvlib commit {commit}, with torch "
        f"{torch.__version__} and Python {platform.python_version()} on {platform.system()} "
        f"{platform.machine()} (CPU `{cpu_model()}`, {os.cpu_count()} CPUs, "
        f"OMP_NUM_THREADS={threads}). Wall time "
        f"per script: {times}.\n"
    )


def main() -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for name in SCRIPTS:
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, str(GALLERY / f"{name}.py")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
        seconds[name] = time.perf_counter() - start
        if result.returncode != 0:
            sys.exit(f"{name}.py failed:\n{result.stderr}")
        (OUTPUT / f"{name}.txt").write_text(result.stdout, encoding="utf-8")
        print(f"{name}: {seconds[name]:.1f} s")
    (OUTPUT / "generated.txt").write_text(provenance(seconds), encoding="utf-8")


if __name__ == "__main__":
    main()
