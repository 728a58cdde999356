"""The examples page's figures are the example scripts' own outputs, run as written."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.benchmarks.loader import benchmark_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def figures() -> Iterator[ModuleType]:
    with benchmark_script("example_figures") as module:
        yield module


def test_every_run_names_an_example_and_its_figure(figures: ModuleType) -> None:
    for spec in (*figures.RUNS, *figures.TELEMETRY):
        command = spec.command()
        assert (ROOT / command[1]).is_file(), command
        assert "--seed" in command and "--no-progress" in command
    assert all("--compare" in spec.args for spec in figures.RUNS)
    args = figures.TELEMETRY[1].args
    clipped = dict(zip(args[::2], args[1::2], strict=True))
    assert float(clipped["--clipping"]) < 3e-3  # tighter than the library default


def test_the_table_names_its_provenance_and_each_runs_metrics(figures: ModuleType) -> None:
    info = {"date": "2026-12-04T22:00:00+00:00", "commit": "abc1234", "cpu": "CPU",
            "cpu_count": 2, "load_average": [0.1, 0.1, 0.1], "torch": "2.14.1",
            "python": "3.11.7"}  # fmt: skip
    records = [
        {"figure": "cnn.png", "command": ["python", "examples/cnn.py"], "seconds": 12.3,
         "metrics": [{"label": "kfac", "train_loss": 0.5, "test_accuracy": 0.81},
                     {"label": "adam", "train_loss": 0.9, "test_accuracy": None}]},
    ]  # fmt: skip
    text = figures.table(records, info)
    assert "2026-12-04" in text and "`abc1234`" in text and "torch 2.14.1" in text
    assert "kfac: train loss 0.5, test accuracy 0.810; adam: train loss 0.9" in text
    assert "| `cnn.png` | `python examples/cnn.py` | 12 s |" in text
