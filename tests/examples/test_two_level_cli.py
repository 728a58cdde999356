"""``--coarse-space`` and ``--krylov``: a two-level correction over any curvature ``--optim``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import autoencoder  # noqa: E402
import common  # noqa: E402
import optimizers  # noqa: E402

from curvlib.approx.coarse import Nicolaides, ResidualSpace, Spectral, Tselepidis  # noqa: E402
from curvlib.approx.two_level import CorrectionForm, TwoLevel  # noqa: E402

TINY = [
    "--data", "curves", "--num-train", "200", "--num-test", "100",
    "--batch-size", "50", "--num-epochs", "1", "--no-progress",
]  # fmt: skip
SPACES = {
    "nicolaides": Nicolaides,
    "residual": ResidualSpace,
    "spectral": Spectral,
    "tselepidis": Tselepidis,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_coarse_space_has_a_flag() -> None:
    assert set(optimizers.COARSE_SPACES) == set(SPACES)


@pytest.mark.parametrize("fine", ["kfac", "kpsvd", "ekfac", "deflation", "diag"])
@pytest.mark.parametrize("space", sorted(SPACES))
def test_the_flag_builds_a_two_level_optimizer_that_trains(fine: str, space: str) -> None:
    krylov = ["--krylov"] if space in ("nicolaides", "residual") else []
    args = autoencoder.build_argparser().parse_args(
        ["--optim", fine, "--coarse-space", space, *krylov, "--t-cov", "1", "--t-inv", "1"]
    )
    config = common.optim_config(args, args.optim)
    torch.manual_seed(0)
    model = autoencoder.autoencoder((12, 6, 3))
    loss_fn = nn.BCEWithLogitsLoss()
    opt = common.build_optimizer(fine, model, loss_fn, config)
    approx = opt.engine.approx  # type: ignore[attr-defined]
    assert isinstance(approx, TwoLevel) and isinstance(approx.coarse, SPACES[space])
    assert approx.coarse.krylov == bool(krylov)
    assert approx.form is CorrectionForm.RESIDUAL
    assert type(approx.fine) is type(optimizers.APPROXIMATIONS[fine]())
    x = torch.rand(16, 12)
    losses = []
    for _ in range(2):
        opt.zero_grad()
        with opt.record():  # type: ignore[attr-defined]
            loss = loss_fn(model(x), x)
            loss.backward()
        opt.step()
        losses.append(loss.item())
    assert torch.isfinite(loss_fn(model(x), x))
    coarse = opt.last_stats["diagnostics"]["default"]  # type: ignore[attr-defined]
    assert coarse["coarse_error_change"] <= 0.0
    assert coarse["coarse_size"] == 4 * (2 if krylov else 1)  # layers 12-6-3-6-12


def test_the_autoencoder_example_trains_with_a_coarse_space(tmp_path: Path) -> None:
    result = autoencoder.main(
        [*TINY, "--optim", "kpsvd", "--coarse-space", "spectral", "--coarse-form", "additive",
         "--out", str(tmp_path)]
    )[0]  # fmt: skip
    assert result.final["train_loss"] < result.metrics[0]["train_loss"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optim", "kfac", "--krylov"], "add --coarse-space NAME"),
        (["--optim", "kfac", "--coarse-space", "tselepidis", "--krylov"], "no Krylov"),
        (["--optim", "adam", "--coarse-space", "nicolaides"], "curvature optimizer"),
    ],
)
def test_misuse_of_the_flags_is_a_usage_error(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        autoencoder.main([*TINY, *argv, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "expected"), [([], "auto"), (["--coarse-samples", "all"], None),
                           (["--coarse-samples", "64"], 64), (["--coarse-samples", "AUTO"], "auto")]
)  # fmt: skip
def test_coarse_samples_reaches_the_two_level_approximation(
    flag: list[str], expected: object
) -> None:
    args = autoencoder.build_argparser().parse_args(
        ["--optim", "kfac", "--coarse-space", "nicolaides", *flag]
    )
    config = common.optim_config(args, args.optim)
    opt = common.build_optimizer("kfac", autoencoder.autoencoder((12, 6, 3)), nn.MSELoss(), config)
    approx = opt.engine.approx  # type: ignore[attr-defined]
    assert isinstance(approx, TwoLevel) and approx.max_samples == expected


@pytest.mark.parametrize("value", ["0", "-4", "many", "2.5"])
def test_bad_coarse_samples_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        autoencoder.build_argparser().parse_args(["--coarse-samples", value])
    assert exc.value.code == 2
    assert "expected auto, all or a positive int" in capsys.readouterr().err


def test_compare_adds_the_coarse_space_to_the_curvature_runs_only() -> None:
    args = autoencoder.build_argparser().parse_args(
        ["--compare", "kfac,adam", "--coarse-space", "nicolaides"]
    )
    configs = [common.optim_config(args, spec) for spec in common.runs_of(args)]
    assert [c.coarse_space for c in configs] == ["nicolaides", None]
