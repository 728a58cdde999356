"""``--grid``: the cartesian product of a few hyper-parameter values, through the CLI."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import autoencoder  # noqa: E402
import common  # noqa: E402

TINY = [
    "--data", "curves", "--num-train", "200", "--num-test", "100",
    "--batch-size", "50", "--num-epochs", "2", "--no-progress",
    "--damping-warmup-samples", "0",
]  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[common.RunResult]]:
    """A 2x1 grid of KFAC on the tiny autoencoder: two 2-epoch runs."""
    out = tmp_path_factory.mktemp("grid")
    argv = [*TINY, "--grid", "lr=0.1,0.3", "damping=1e-3", "--out", str(out)]
    return out, autoencoder.main(argv)


def test_every_point_of_the_grid_runs_in_its_own_folder(
    searched: tuple[Path, list[common.RunResult]],
) -> None:
    out, results = searched
    labels = ["kfac-lr0.1-damping0.001", "kfac-lr0.3-damping0.001"]
    assert [r.label for r in results] == labels
    assert [r.lr for r in results] == [0.1, 0.3]
    for label in labels:
        metrics = json.loads((out / label / "metrics.json").read_text())
        assert [m["epoch"] for m in metrics] == [0, 1, 2]
        assert all(m["damping"] == pytest.approx(1e-3) for m in metrics[1:])
        assert (out / label / "iterations.csv").is_file()
        assert (out / label / "loss.png").read_bytes()[:8] == PNG
    assert (out / "grid.png").read_bytes()[:8] == PNG
    assert not (out / "metrics.json").exists()


def test_the_table_lists_every_run_and_marks_the_lowest_final_train_loss(
    searched: tuple[Path, list[common.RunResult]],
) -> None:
    out, results = searched
    with (out / "grid.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["lr", "damping", *(f for f in common.GRID_FIELDS if f != "lr")]
    assert [float(r["lr"]) for r in rows] == [0.1, 0.3]
    assert [float(r["damping"]) for r in rows] == [1e-3, 1e-3]
    finals = [r.final["train_loss"] for r in results]
    assert [float(r["train_loss"]) for r in rows] == pytest.approx(finals)
    best = min(range(2), key=lambda i: finals[i])
    assert [int(r["best"]) for r in rows] == [int(i == best) for i in range(2)]
    assert json.loads((out / "grid.json").read_text())[best]["best"] == 1
    assert len(json.loads((out / "summary.json").read_text())) == 2


def test_the_printed_table_marks_the_best_run(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        {"label": "kfac-lr0.1", "best": 0, "lr": 0.1, "train_loss": 0.5, "test_loss": None,
         "wall_time": 1.0},
        {"label": "kfac-lr0.3", "best": 1, "lr": 0.3, "train_loss": 0.4, "test_loss": 0.41,
         "wall_time": 1.2},
    ]  # fmt: skip
    lines = common.grid_table(rows, ["lr"]).splitlines()
    assert lines[2].startswith("  kfac-lr0.1") and "n/a" in lines[2]
    assert lines[3].startswith("* kfac-lr0.3")
    assert "lowest final training loss" in lines[-1]


def test_a_diverged_run_is_never_the_best(tmp_path: Path) -> None:
    def run(label: str, loss: float | None) -> common.RunResult:
        return common.RunResult(label, 0.1, tmp_path, [{"train_loss": loss}])

    diverged, done = run("a", None), run("b", 3.0)
    assert common.best_run([diverged, done]) is done
    assert common.best_run([diverged]) is None


def test_the_grid_is_the_cartesian_product_with_the_flags_overridden() -> None:
    parser = autoencoder.build_argparser()
    args = parser.parse_args(
        ["--optim", "kpsvd", "--lr", "0.2", "--clipping", "0.01", "--grid",
         "damping=1e-4,1e-3", "weight-decay=0,1e-4", "momentum=0.5"]
    )  # fmt: skip
    specs = common.runs_of(args)
    assert [s.label for s in specs] == [
        "kpsvd-damping0.0001-weight_decay0-momentum0.5",
        "kpsvd-damping0.0001-weight_decay0.0001-momentum0.5",
        "kpsvd-damping0.001-weight_decay0-momentum0.5",
        "kpsvd-damping0.001-weight_decay0.0001-momentum0.5",
    ]
    config = common.optim_config(args, specs[3])
    assert (config.lr, config.damping, config.weight_decay, config.momentum) == (
        0.2, 1e-3, 1e-4, 0.5
    )  # fmt: skip
    assert config.clipping == 0.01
    assert common.several_runs(args)


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (["lr"], "expects NAME=V1,V2,..."),
        (["=0.1"], "expects NAME=V1,V2,..."),
        (["beta=0.9"], "unknown parameter 'beta' (choose from lr, damping, clipping"),
        (["lr="], "lr= lists no values"),
        (["lr=0.1,,0.3"], "lr= has an empty value"),
        (["lr=0.1,fast"], "lr= value must be a number, got 'fast'"),
        (["lr=-0.1"], "lr= value must be > 0"),
        (["momentum=1"], "momentum= value must lie in [0, 1)"),
        (["lr=0.1,0.1"], "lr= lists a value twice"),
        (["lr=0.1", "lr=0.3"], "names lr twice"),
        ([], "expected at least one argument"),
    ],
)
def test_malformed_grids_are_refused_with_the_reason(
    grid: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        autoencoder.build_argparser().parse_args(["--grid", *grid])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--grid" in err and message in err


def test_grid_and_compare_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        autoencoder.build_argparser().parse_args(["--compare", "kfac,adam", "--grid", "lr=0.1"])
    assert "not allowed with argument" in capsys.readouterr().err
