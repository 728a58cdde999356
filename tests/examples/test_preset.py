"""``--preset paper``: the settings of the docs' table reach the optimizer, flags override them.

Also the flags the preset introduced (``--kl-clip-lr-squared``, ``--decoupled-weight-decay``,
``--damping-mode``, ``--conv-damping``, ``--decay``) and early stopping (``--patience``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import autoencoder  # noqa: E402
import cli  # noqa: E402
import cnn  # noqa: E402
import conv_autoencoder  # noqa: E402
import training  # noqa: E402
from optimizers import build_optimizer  # noqa: E402

from curvlib.approx.diagonal import Diagonal  # noqa: E402
from curvlib.approx.kfac import KFAC, ConvDamping, KFACDamping  # noqa: E402
from curvlib.approx.kpsvd import KPSVD  # noqa: E402
from curvlib.approx.two_level import TwoLevel  # noqa: E402
from curvlib.optim import DampingWarmup, LevenbergMarquardt  # noqa: E402
from curvlib.optim.defaults import DEFAULTS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "examples.md"


def _table_flags() -> list[str]:
    """The flags of the column "flags the preset sets" of the table in ``docs/examples.md``."""
    text = DOCS.read_text()
    section = text[text.index("## The papers' configuration") :]
    section = section[: section.index("\n## ")]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    flags: list[str] = []
    for row in rows[1:]:  # the header first
        flags += [word for code in row.split("|")[2].split("`")[1::2] for word in code.split()]
    return flags


def _optimizer(argv: Sequence[str], model: nn.Module | None = None) -> Any:
    args = autoencoder.build_argparser().parse_args(list(argv))
    spec = cli.runs_of(args)[0]
    model = model or nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 4))
    return build_optimizer(spec.name, model, nn.MSELoss(), cli.optim_config(args, spec))


def test_the_docs_table_is_the_preset() -> None:
    """Every flag of the table, given by hand, parses to what ``--preset paper`` gives."""
    flags = _table_flags()
    assert "--conv-damping" in flags and "--patience" in flags
    parser = autoencoder.build_argparser()
    by_hand = vars(parser.parse_args(flags))
    preset = vars(parser.parse_args(["--preset", "paper"]))
    assert preset.pop("preset") == "paper" and by_hand.pop("preset") is None
    assert by_hand == preset
    assert {key: by_hand[key] for key in cli.PRESETS["paper"]} == cli.PRESETS["paper"]


@pytest.mark.parametrize("module", [autoencoder, cnn, conv_autoencoder])
def test_every_example_parses_the_preset(module: Any) -> None:
    paper = cli.PRESETS["paper"]
    args = module.build_argparser().parse_args(["--preset", "paper"])
    assert {key: getattr(args, key) for key in paper} == paper


def test_the_preset_reaches_the_optimizer_and_the_approximation() -> None:
    opt = _optimizer(["--preset", "paper"])
    group = opt.param_groups[0]
    assert (group["t_cov"], group["t_inv"]) == (100, 100)
    assert group["momentum"] == 0.9
    assert group["weight_decay"] == 1e-3 and group["decoupled_weight_decay"] is True
    assert opt.kl_clip_lr_squared is False
    assert opt.engine.warmup == 0
    assert opt.extractor._fraction == 0.25
    approx = opt.approx
    assert isinstance(approx, KFAC)
    assert approx.damping_mode is KFACDamping.SQRT
    assert approx.conv_damping is ConvDamping.PER_POSITION
    assert approx.decay == 0.95


@pytest.mark.parametrize(("flags", "expected"), [([], 0.0), (["--refresh-on-move", "0.3"], 0.3)])
def test_refresh_on_move_reaches_the_engine(flags: list[str], expected: float) -> None:
    assert _optimizer(flags).engine.refresh_on_move == expected
    assert _optimizer(["--preset", "paper", *flags]).engine.refresh_on_move == expected


@pytest.mark.parametrize(("flags", "expected"), [([], 0), (["--overlap-inverse", "3"], 3)])
def test_overlap_inverse_reaches_the_engine(flags: list[str], expected: int) -> None:
    assert _optimizer(flags).engine.overlap_inverse == expected


@pytest.mark.parametrize("value", ["-1", "1.5", "many"])
def test_a_bad_overlap_inverse_is_a_usage_error(value: str) -> None:
    with pytest.raises(SystemExit):
        autoencoder.build_argparser().parse_args(["--overlap-inverse", value])


def test_options_the_optimizer_refuses_are_a_usage_error_that_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--data", "curves", "--num-train", "100", "--num-test", "50", "--batch-size", "50"]
    args += ["--num-epochs", "1", "--no-progress", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as stop:
        autoencoder.main([*args, "--optim", "ekfac", "--overlap-inverse", "3"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--optim ekfac: overlap_inverse is for approximations rebuilt every t_inv" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("value", ["-0.1", "nan", "many"])
def test_a_bad_refresh_on_move_is_a_usage_error(value: str) -> None:
    with pytest.raises(SystemExit):
        autoencoder.build_argparser().parse_args(["--refresh-on-move", value])


def test_without_the_preset_the_library_defaults_stay() -> None:
    opt = _optimizer([])
    approx = opt.approx
    assert isinstance(approx, KFAC) and approx.damping_mode is KFACDamping.PI
    assert approx.conv_damping is ConvDamping.UNIFORM
    assert opt.kl_clip_lr_squared is True
    assert opt.param_groups[0]["decoupled_weight_decay"] is False


def test_without_damping_each_approximation_gets_its_own_default() -> None:
    kfac = DampingWarmup(DEFAULTS.damping.damping, samples=DEFAULTS.damping.samples)
    diag = DampingWarmup(Diagonal.default_damping, samples=DEFAULTS.damping.samples)
    assert _optimizer([]).param_groups[0]["damping"] == kfac == DEFAULTS.damping
    assert _optimizer(["--optim", "diag"]).param_groups[0]["damping"] == diag
    given = _optimizer(["--optim", "diag", "--damping", "1e-3"]).param_groups[0]["damping"]
    assert given == DampingWarmup(1e-3, samples=DEFAULTS.damping.samples)
    adaptive = _optimizer(["--optim", "diag", "--adaptive-damping"]).param_groups[0]["damping"]
    assert isinstance(adaptive, LevenbergMarquardt)
    assert adaptive.initial == Diagonal.default_damping


def test_a_coarse_space_gets_the_two_level_warm_up_unless_one_is_given() -> None:
    argv = ["--coarse-space", "nicolaides"]
    two_level = DampingWarmup(DEFAULTS.damping.damping, samples=TwoLevel.default_damping_samples)
    assert _optimizer(argv).param_groups[0]["damping"] == two_level
    given = _optimizer([*argv, "--damping-warmup-samples", "100"]).param_groups[0]["damping"]
    assert given == DampingWarmup(DEFAULTS.damping.damping, samples=100)
    assert _optimizer([*argv, "--damping-warmup-samples", "0"]).param_groups[0]["damping"] == (
        DEFAULTS.damping.damping
    )


@pytest.mark.parametrize("before", [True, False], ids=["flags-first", "preset-first"])
def test_explicit_flags_override_the_preset(before: bool) -> None:
    flags = [
        "--t-cov", "5", "--momentum", "0.5", "--weight-decay", "0", "--no-decoupled-weight-decay",
        "--kl-clip-lr-squared", "--damping-mode", "pi", "--conv-damping", "uniform",
        "--decay", "0.5", "--stats-fraction", "1", "--warmup", "3", "--patience", "2",
    ]  # fmt: skip
    argv = [*flags, "--preset", "paper"] if before else ["--preset", "paper", *flags]
    opt = _optimizer(argv)
    group = opt.param_groups[0]
    assert (group["t_cov"], group["t_inv"]) == (5, 100)  # --t-inv still from the preset
    assert group["momentum"] == 0.5
    assert group["weight_decay"] == 0 and group["decoupled_weight_decay"] is False
    assert opt.kl_clip_lr_squared is True
    assert opt.engine.warmup == 3 and opt.extractor._fraction == 1.0
    assert opt.approx.damping_mode is KFACDamping.PI
    assert opt.approx.conv_damping is ConvDamping.UNIFORM and opt.approx.decay == 0.5
    args = autoencoder.build_argparser().parse_args(argv)
    assert args.patience == 2 and args.patience_metric == "train_loss"


def test_approximation_flags_reach_only_approximations_that_have_them() -> None:
    opt = _optimizer(["--preset", "paper", "--optim", "kpsvd"])
    assert isinstance(opt.approx, KPSVD)  # no conv_damping: left out
    assert opt.approx.damping_mode is KFACDamping.SQRT and opt.approx.decay == 0.95
    eigen = _optimizer(["--preset", "paper", "--optim", "kfac-eigen"]).approx
    assert eigen.damping_mode is KFACDamping.EIGEN  # the name fixes the mode
    assert isinstance(_optimizer(["--preset", "paper", "--optim", "adam"]), torch.optim.Adam)


def test_bad_values_are_rejected() -> None:
    parser = autoencoder.build_argparser()
    for argv in (["--preset", "nope"], ["--preset"], ["--decay", "1.5"], ["--damping-mode", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


# -- early stopping ------------------------------------------------------------------


def test_early_stopping_stops_after_patience_epochs_without_improvement() -> None:
    stopper = training.EarlyStopping(3, "test_loss")
    losses = [5.0, 4.0, 4.0, 4.5, math.nan, 3.9, 4.0, 4.0, 3.95]
    stops = []
    for loss in losses:
        stopper.observe({"test_loss": loss})
        stops.append(stopper.stop)
    # 4.0 (epoch 2) is not below 4.0: no improvement; 3.9 resets the count.
    assert stops == [False, False, False, False, True, False, False, False, True]
    assert stopper.best == 3.9
    replayed = training.EarlyStopping.replay(
        3, "test_loss", [{"epoch": 0, "test_loss": 0.0}] + [
            {"epoch": i + 1, "test_loss": v} for i, v in enumerate(losses)
        ]
    )  # fmt: skip
    assert (replayed.best, replayed.waited) == (stopper.best, stopper.waited)


def test_patience_ends_the_run_and_a_resume_stays_stopped(tmp_path: Path) -> None:
    """A run stops after ``patience`` epochs without a new best, and a resume stays stopped.

    A learning rate of 1e-30 leaves the weights unchanged, so the test loss never
    improves after epoch 1: with patience 2 the run stops after epoch 3 of 8.
    """
    argv = [
        "--data", "curves", "--num-train", "40", "--num-test", "20",
        "--batch-size", "20", "--no-progress", "--optim", "sgd", "--lr", "1e-30",
        "--momentum", "0", "--patience", "2", "--patience-metric", "test_loss",
        "--out", str(tmp_path),
    ]  # fmt: skip
    (result,) = autoencoder.main([*argv, "--num-epochs", "8"])
    epochs = [row["epoch"] for row in result.metrics]
    # lr 1e-30 leaves the weights unchanged: epoch 1 sets the best, 2 and 3 do not improve.
    assert epochs == [0, 1, 2, 3]
    (again,) = autoencoder.main([*argv, "--num-epochs", "10", "--resume"])
    assert [row["epoch"] for row in again.metrics] == epochs


def test_a_short_paper_run_of_the_autoencoder_trains(tmp_path: Path) -> None:
    argv = [
        "--preset", "paper", "--data", "curves", "--num-train", "200", "--num-test", "100",
        "--batch-size", "50", "--num-epochs", "2", "--no-progress", "--lr", "0.05",
        "--damping", "1e-2", "--t-cov", "2", "--t-inv", "2", "--out", str(tmp_path),
    ]  # fmt: skip
    (result,) = autoencoder.main(argv)
    losses = [row["train_loss"] for row in result.metrics]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
