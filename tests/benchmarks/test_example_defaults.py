"""The sweep of the examples at the library defaults: its cases, verdicts and table."""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.benchmarks.loader import benchmark_script

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))


@pytest.fixture(scope="module")
def sweep() -> Iterator[ModuleType]:
    with benchmark_script("example_defaults") as module:
        yield module


def test_every_case_is_an_example_with_a_data_set_it_accepts(sweep: ModuleType) -> None:
    for case in sweep.CASES:
        command = case.command("kfac", 3, Path("/tmp/out"), Path("/tmp/digits"))
        assert command[1] == f"examples/{case.script}.py"
        parser = importlib.import_module(case.script).build_argparser()
        args = parser.parse_args(command[2:])
        assert args.data == case.data and args.seed == 3 and args.threads == 1
        assert ("/tmp/digits" in command) == (case.data == "mnist")
    assert {c.script for c in sweep.CASES} == {
        "autoencoder", "cnn", "conv_autoencoder", "dcgan_kfac"}  # fmt: skip


def test_verdicts(sweep: ModuleType) -> None:
    loss = sweep.Case("autoencoder", "curves", ())
    classifier = sweep.Case("cnn", "synthetic", (), "test_accuracy")
    gan = sweep.Case("dcgan_kfac", "curves", (), "fd")
    assert sweep.verdict(loss, {"train_loss": 0.7}, {"train_loss": 0.1}) == "trained"
    assert sweep.verdict(loss, {"train_loss": 0.7}, {"train_loss": 0.8}) == "diverged"
    assert sweep.verdict(loss, {"train_loss": 0.7}, {"train_loss": None}) == "diverged"
    assert sweep.verdict(loss, {"train_loss": 0.7}, {"train_loss": math.nan}) == "diverged"
    first = {"train_loss": 2.3, "test_accuracy": 0.1}
    chance = {"train_loss": 2.29, "test_accuracy": 0.11}
    assert sweep.verdict(classifier, first, chance) == "stalled"
    good = {"train_loss": 0.4, "test_accuracy": 0.85}
    assert sweep.verdict(classifier, first, good) == "trained"
    worse = {"train_loss": 2.4, "test_accuracy": 0.3}
    assert sweep.verdict(classifier, first, worse) == "diverged"
    # A GAN's Fréchet distance may end above its start; only NaN/Inf is divergence.
    assert sweep.verdict(gan, {"fd": 17.5}, {"fd": 27.4}) == "trained"
    assert sweep.verdict(gan, {"fd": 17.5}, {"fd": None}) == "diverged"


def test_the_table_and_report_name_each_run_that_did_not_train(sweep: ModuleType) -> None:
    cases = [sweep.Case("cnn", "synthetic", (), "test_accuracy")]
    runs = [
        {"case": "cnn --data synthetic", "optim": "kfac", "seed": s, "verdict": v,
         "command": f"python examples/cnn.py --seed {s}", "first": {"test_accuracy": 0.1},
         "last": {"test_accuracy": a}}
        for s, v, a in ((0, "trained", 0.88), (1, "stalled", 0.1), (2, "trained", 0.86))
    ]  # fmt: skip
    error = "cnn.py: error: --optim ekfac: EKFAC needs per-sample statistics"
    runs.append({"case": "cnn --data synthetic", "optim": "ekfac", "seed": 0,
                 "verdict": "refused", "error": error})  # fmt: skip
    text = sweep.table(runs, cases, ["kfac", "ekfac", "adam"])
    row = "| `cnn --data synthetic` | test accuracy | 0.86 (seed 1 stalled) | refused | — |"
    assert row in text
    info = {"date": "2026-12-07T23:00:00+00:00", "commit": "abc1234", "cpu": "CPU",
            "torch": "2.14.1"}  # fmt: skip
    report = sweep.report(runs, info, cases, ["kfac", "ekfac"], [0, 1, 2], "python x.py")
    assert "2 of 4 runs of curvlib's optimizers trained, 1 were refused" in report
    assert f"- `cnn --data synthetic --optim ekfac`: {error}" in report
    assert "- `python examples/cnn.py --seed 1`: stalled" in report
    assert "--seed 0`" not in report and "--seed 2`" not in report


def test_render_rewrites_the_markdown_from_the_json(sweep: ModuleType, tmp_path: Path) -> None:
    import json

    info = {"date": "2026-12-07T23:00:00+00:00", "commit": "abc1234", "cpu": "CPU",
            "torch": "2.14.1"}  # fmt: skip
    runs = [{"case": "autoencoder --data mnist --activation relu", "optim": "kfac", "seed": 0,
             "verdict": "trained", "last": {"train_loss": 0.25}}]  # fmt: skip
    payload = {"command": "python benchmarks/example_defaults.py", "machine": info,
               "seeds": [0], "runs": runs}  # fmt: skip
    (tmp_path / "example_defaults.json").write_text(json.dumps(payload))
    assert sweep.main(["--render", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "example_defaults.md").read_text()
    assert "Written by `python benchmarks/example_defaults.py` on 2026-12-07" in text
    assert "| `autoencoder --data mnist --activation relu` | train loss | 0.25 |" in text
    assert "1 of 1 runs of curvlib's optimizers trained" in text
