"""Smoke tests of ``examples/autoencoder.py`` through its command line, at tiny sizes.

The scripts in ``examples/`` are not a package: the directory is put on
``sys.path`` and the modules imported as the script imports them.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from curvlib.optim.defaults import DEFAULTS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import autoencoder  # noqa: E402
import common  # noqa: E402
import data  # noqa: E402
import initialisation  # noqa: E402

from tests.examples.test_conv_autoencoder import excess_bce  # noqa: E402

TINY = [
    "--data", "curves", "--num-train", "200", "--num-test", "100",
    "--batch-size", "50", "--num-epochs", "2", "--no-progress",
]  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def run(args: Sequence[str], out: Path) -> list[common.RunResult]:
    return autoencoder.main([*TINY, *args, "--out", str(out)])


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``--compare kfac,adam`` at the tiny size: two uninterrupted 2-epoch runs."""
    out = tmp_path_factory.mktemp("compare")
    run(["--compare", "kfac,adam"], out)
    return out


def test_run_writes_metrics_plot_and_checkpoint_and_the_loss_falls(compared: Path) -> None:
    out = compared / "kfac"
    rows = read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert list(rows[0]) == list(common.METRIC_FIELDS)
    history = json.loads((out / "metrics.json").read_text())
    assert [m["epoch"] for m in history] == [0, 1, 2]
    assert history[0]["kl_clip_factor"] is None  # nothing measured before training
    train = [m["train_loss"] for m in history]
    assert train[-1] < 0.6 * train[0], train
    assert 0.0 < history[-1]["kl_clip_factor"] <= 1.0
    # The damping is still warming up: 25 samples at each statistics step so far.
    state = torch.load(out / common.CHECKPOINT, weights_only=True)
    engine = next(iter(state["optimizer"]["curvature"]["groups"].values()))
    assert engine["samples_seen"] % 25 == 0 and 75 <= engine["samples_seen"] < 400
    assert history[-1]["damping"] == pytest.approx(DEFAULTS.damping.at(engine["samples_seen"]))
    assert history[1]["wall_time"] < history[2]["wall_time"]
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / common.CHECKPOINT).is_file()
    adam = json.loads((compared / "adam" / "metrics.json").read_text())
    assert adam[-1]["train_loss"] < adam[0]["train_loss"]
    assert adam[-1]["kl_clip_factor"] is None  # no curvature telemetry for Adam


def test_the_iteration_log_has_every_step_of_every_optimizer(compared: Path) -> None:
    for name in ("kfac", "adam"):
        rows = read_csv(compared / name / "iterations.csv")
        steps_per_epoch = 200 // 50
        assert [int(r["step"]) for r in rows] == list(range(1, 2 * steps_per_epoch + 1)), name
        times = [float(r["wall_time"]) for r in rows]
        assert all(a < b for a, b in itertools.pairwise(times)), name
        metrics = json.loads((compared / name / "metrics.json").read_text())
        # the same clock as the epochs' wall time, which ends after the last step
        assert times[-1] <= metrics[-1]["wall_time"], name
        assert times[steps_per_epoch - 1] <= metrics[1]["wall_time"] < times[steps_per_epoch]
        losses = [float(r["loss"]) for r in rows]
        epoch_mean = sum(losses[:steps_per_epoch]) / steps_per_epoch
        assert epoch_mean == pytest.approx(metrics[1]["train_loss_running"], rel=1e-6), name
        assert json.loads((compared / name / "iterations.json").read_text())[0]["step"] == 1


def test_the_papers_initialisations(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = autoencoder.autoencoder((40, 30, 8))
    initialisation.initialise(model, "sparse", bias=0.01)
    for layer in (m for m in model if isinstance(m, nn.Linear)):
        nonzero = (layer.weight != 0).sum(dim=1)
        assert nonzero.tolist() == [min(15, layer.in_features)] * layer.out_features
        assert torch.equal(layer.bias, torch.full_like(layer.bias, 0.01))
    big = nn.Linear(2000, 400)
    initialisation.sparse_(big.weight)
    weight = big.weight.detach()
    values = weight[weight != 0]
    assert values.numel() == 400 * 15
    assert abs(float(values.std()) - 1.0) < 0.05  # N(0, 1): 6000 draws
    initialisation.initialise(big, "normal", std=0.01)
    assert abs(float(big.weight.detach().std()) - 0.01) < 5e-4
    initialisation.initialise(big, "xavier-normal")
    assert abs(float(big.weight.detach().std()) - (2.0 / 2400) ** 0.5) < 1e-3
    with pytest.raises(ValueError, match="Unknown initialisation 'he'"):
        initialisation.initialise(big, "he")
    result = run(["--optim", "kfac", "--num-epochs", "1", "--init", "sparse"], tmp_path)[0]
    assert result.final["train_loss"] < result.metrics[0]["train_loss"]


def test_compare_writes_the_combined_plot_and_summary(compared: Path) -> None:
    assert (compared / "compare.png").read_bytes()[:8] == PNG_MAGIC
    summary = json.loads((compared / "summary.json").read_text())
    assert [s["label"] for s in summary] == ["kfac", "adam"]
    adam = summary[1]
    assert adam["time_to_adam_final"] == pytest.approx(adam["wall_time"])


def test_summary_table_names_the_adam_reference(capsys: pytest.CaptureFixture[str]) -> None:
    def result(label: str, losses: list[float]) -> common.RunResult:
        rows = [
            {"epoch": i, "train_loss": v, "test_loss": v, "wall_time": 10.0 * i}
            for i, v in enumerate(losses)
        ]
        return common.RunResult(label, 0.1, Path("."), rows)  # type: ignore[arg-type]

    runs = [
        result("kfac", [0.7, 0.3, 0.1]),
        result("adam-lr0.001", [0.7, 0.5, 0.2]),
        result("adam-lr0.0001", [0.7, 0.6, 0.5]),
    ]
    assert common.time_to_reach(runs[0], 0.2) == pytest.approx(15.0)
    assert common.time_to_reach(runs[2], 0.2) is None
    table = common.summarize(runs)
    assert "time to Adam final" in table and "adam-lr0.001" in table.splitlines()[-1]
    assert "never" in table


def test_resume_continues_the_metrics_history_exactly(compared: Path, tmp_path: Path) -> None:
    first = run(["--optim", "kfac", "--num-epochs", "1"], tmp_path)[0]
    assert [m["epoch"] for m in first.metrics] == [0, 1]
    resumed = run(["--optim", "kfac", "--resume"], tmp_path)[0]
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert [m["epoch"] for m in history] == [0, 1, 2]
    assert history[:2] == json.loads(json.dumps(first.metrics))
    assert resumed.metrics[-1]["wall_time"] > first.metrics[-1]["wall_time"]
    # The checkpoint holds everything the next steps use: the resumed run ends
    # where the uninterrupted one of the comparison ended.
    straight = json.loads((compared / "kfac" / "metrics.json").read_text())
    for key in ("train_loss", "test_loss", "kl_clip_factor"):
        assert history[2][key] == straight[2][key], key
    assert len(read_csv(tmp_path / "metrics.csv")) == 3


def test_optional_paths_train(tmp_path: Path) -> None:
    """Adaptive damping (step closures), empirical Fisher, sub-batch statistics, decay."""
    result = run(
        ["--optim", "kfac", "--adaptive-damping", "--t-inv", "2", "--t-cov", "2",
         "--fisher", "empirical", "--stats-fraction", "0.5", "--weight-decay", "1e-4",
         "--num-epochs", "1"],
        tmp_path,
    )[0]  # fmt: skip
    final = result.final
    assert final["train_loss"] is not None and final["train_loss"] < result.metrics[0]["train_loss"]
    assert final["damping"] is not None
    assert final["damping"] != pytest.approx(DEFAULTS.damping.damping)  # LM adapted its start
    args = autoencoder.build_argparser().parse_args(["--clipping", "0"])
    opt = common.build_optimizer(
        "kfac",
        autoencoder.autoencoder((8, 4)),
        nn.BCEWithLogitsLoss(),
        common.optim_config(args, args.optim),
    )
    assert opt.kl_clip is None  # type: ignore[attr-defined]


def test_resume_refuses_a_checkpoint_of_another_optimizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(["--optim", "adam", "--num-epochs", "1"], tmp_path)
    with pytest.raises(SystemExit) as exc:
        run(["--optim", "sgd", "--resume"], tmp_path)
    assert exc.value.code == 2
    assert "holds a run of 'adam'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--optim", "newton"],
        ["--compare", "kfac,newton"],
        ["--optim", "adam:fast"],
    ],
)
def test_bad_optimizer_names_are_rejected_with_the_choices(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        autoencoder.build_argparser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    if "newton" in argv[-1]:
        assert "invalid optimizer 'newton'" in err
        for name in common.OPTIMIZERS:
            assert name in err
    else:
        assert "learning rate of 'adam:fast' must be a number" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fisher", "diagonal"], "choose from 'mc', 'empirical', 'exact'"),
        (["--data", "cifar"], "choose from 'curves', 'mnist', 'faces', 'faces-synthetic'"),
        (["--lr", "-1"], "must be > 0"),
        (["--momentum", "1.5"], "must lie in [0, 1)"),
        (["--stats-fraction", "0"], "must lie in (0, 1]"),
        (["--t-inv", "0"], "must be >= 1"),
        (["--clipping", "nan"], "must be finite"),
    ],
)
def test_bad_values_are_rejected_by_the_parser(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        autoencoder.build_argparser().parse_args(argv)
    assert message in capsys.readouterr().err


def test_every_approximation_has_an_optimizer() -> None:
    assert set(common.OPTIMIZERS) == {
        "kfac", "kfac-eigen", "ekfac", "kpsvd", "deflation", "kfac-corrected", "lanczos",
        "block-ng", "exact-ng", "diag", "adam", "sgd",
    }  # fmt: skip
    args = autoencoder.build_argparser().parse_args(["--lr", "0.5", "--compare", "kfac,adam:3e-4"])
    configs = [common.optim_config(args, spec) for spec in common.runs_of(args)]
    assert [c.lr for c in configs] == [0.5, 3e-4]
    defaults = autoencoder.build_argparser().parse_args([])
    assert common.optim_config(defaults, common.RunSpec("adam")).lr == 1e-3


@pytest.mark.parametrize("name", [n for n, s in common.OPTIMIZERS.items() if s.curvature])
def test_every_curvature_optimizer_trains_a_small_autoencoder(name: str) -> None:
    torch.manual_seed(0)
    model = autoencoder.autoencoder((12, 6, 3))
    loss_fn = nn.BCEWithLogitsLoss()
    # Six steps on one batch of 16: statistics of 24 samples in all, a fixed damping.
    config = common.OptimConfig(
        lr=0.1, t_cov=1, t_inv=1, damping=1e-3, damping_warmup_samples=0, stats_fraction=0.25
    )
    opt = common.build_optimizer(name, model, loss_fn, config)
    x = torch.rand(16, 12)
    with torch.no_grad():
        before = excess_bce(model(x), x)
    for _ in range(6):
        opt.zero_grad()
        with opt.record():  # type: ignore[attr-defined]
            loss = loss_fn(model(x), x)
            loss.backward()
        opt.step()
    with torch.no_grad():
        after = excess_bce(model(x), x)
    # Six steps on one batch: the loss above its floor falls by at least 15%.
    assert after < 0.85 * before, (before, after)
    assert 0.0 < opt.last_stats["kl_clip_factor"] <= 1.0  # type: ignore[attr-defined]


def test_autoencoder_architecture() -> None:
    model = autoencoder.autoencoder(autoencoder.ARCHITECTURES["curves"])
    linears = [m for m in model if isinstance(m, nn.Linear)]
    widths = [linears[0].in_features] + [m.out_features for m in linears]
    assert widths == [784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784]
    kinds = [type(m).__name__ for m in model]
    code = kinds.index("Linear", 2 * 5)  # the sixth Linear maps 25 -> 6: no activation after it
    assert kinds[code + 1] == "Linear" and kinds[-1] == "Linear"
    assert kinds.count("Tanh") == 10


@pytest.mark.parametrize(
    ("data", "parameters"), [("curves", 842_340), ("mnist", 2_837_314), ("faces", 7_537_655)]
)
def test_autoencoder_parameter_counts(data: str, parameters: int) -> None:
    model = autoencoder.autoencoder(autoencoder.ARCHITECTURES[data])
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_the_papers_autoencoder_relu_code_sigmoid_output_and_bce_loss(tmp_path: Path) -> None:
    """The KPSVD papers' network: ReLU everywhere (code layer too), a sigmoid output, BCELoss."""
    flags = ["--activation", "relu", "--code-activation", "relu", "--output", "probabilities",
             "--init", "xavier-uniform", "--bias-init", "0.01"]  # fmt: skip
    args = autoencoder.build_argparser().parse_args(["--data", "mnist", *flags])
    torch.manual_seed(0)
    model = autoencoder.make_autoencoder(args)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Linear", "ReLU"] * 7 + ["Linear", "Sigmoid"]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [1000, 500, 250, 30, 250, 500, 1000, 784]
    assert all(torch.equal(m.bias, torch.full_like(m.bias, 0.01)) for m in linears)
    assert isinstance(autoencoder.loss_for("mnist", "probabilities"), nn.BCELoss)
    x = torch.rand(5, 784)
    with torch.no_grad():
        p = model(x)
        logits = model[:-1](x)
    assert float(p.min()) > 0.0 and float(p.max()) < 1.0
    torch.testing.assert_close(  # the same loss as the logits network's
        nn.BCELoss()(p, x), nn.BCEWithLogitsLoss()(logits, x), rtol=1e-5, atol=1e-6
    )
    result = run(["--optim", "kfac", "--num-epochs", "1", "--t-cov", "1", *flags], tmp_path)[0]
    assert result.final["inverse_failures"] == 0
    assert result.final["train_loss"] < result.metrics[0]["train_loss"]


def test_default_autoencoder_is_unchanged_by_the_new_flags() -> None:
    args = autoencoder.build_argparser().parse_args([])
    torch.manual_seed(0)
    model = autoencoder.make_autoencoder(args)
    torch.manual_seed(0)
    plain = autoencoder.autoencoder(autoencoder.ARCHITECTURES["curves"])
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)
    assert isinstance(autoencoder.loss_for("curves"), nn.BCEWithLogitsLoss)
    relu_code = autoencoder.autoencoder((8, 4, 2), "tanh", code_activation="relu")
    kinds = [type(m).__name__ for m in relu_code]
    assert kinds == ["Linear", "Tanh", "Linear", "ReLU", "Linear", "Tanh", "Linear"]
    with pytest.raises(ValueError, match="Unknown code activation 'gelu'"):
        autoencoder.autoencoder((8, 4), code_activation="gelu")


def test_probabilities_are_refused_for_faces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        autoencoder.main(["--data", "faces-synthetic", "--output", "probabilities",
                          "--out", str(tmp_path)])  # fmt: skip
    assert exc.value.code == 2
    assert "FACES trains a linear output with MSELoss" in capsys.readouterr().err


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """An IDX file (unsigned bytes) as in the MNIST distribution."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def write_tiny_mnist(root: Path, num_train: int = 30, num_test: int = 10) -> np.ndarray:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8)
    write_idx(raw / "train-images-idx3-ubyte", train, compress=True)
    write_idx(raw / "train-labels-idx1-ubyte", train[:, 0, 0] % 10, compress=True)
    write_idx(raw / "t10k-images-idx3-ubyte", test, compress=False)
    write_idx(raw / "t10k-labels-idx1-ubyte", test[:, 0, 0] % 10, compress=False)
    return train


def test_mnist_loads_idx_files_through_torchvision(tmp_path: Path) -> None:
    train = write_tiny_mnist(tmp_path)
    split = data.load_mnist(tmp_path, num_train=20, num_test=None)
    assert split.train.shape == (20, 784) and split.test.shape == (10, 784)
    expected = torch.from_numpy(train[:20].reshape(20, 784)).float() / 255
    assert torch.equal(split.train, expected)
    results = autoencoder.main(
        ["--data", "mnist", "--data-root", str(tmp_path), "--optim", "adam", "--num-epochs", "1",
         "--batch-size", "10", "--no-progress", "--out", str(tmp_path / "run")]
    )  # fmt: skip
    assert len(results[0].metrics) == 2


def test_mnist_without_files_says_which_files_to_put_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        autoencoder.main(["--data", "mnist", "--data-root", str(tmp_path), "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    raw = tmp_path / "MNIST" / "raw"
    for name in data.MNIST_FILES:
        assert str(raw / name) in err and f"{name}.gz" in err
    assert "--data curves" in err


def test_faces_from_npy_and_mat(tmp_path: Path) -> None:
    from scipy.io import savemat

    faces = data.synthetic_faces(40, seed=1).reshape(40, 25, 25).numpy()
    np.save(tmp_path / "faces.npy", faces)
    split = data.load_faces(tmp_path / "faces.npy", num_train=None, num_test=10)
    assert split.train.shape == (30, 625) and split.test.shape == (10, 625)
    assert torch.equal(split.test, torch.from_numpy(faces[30:].reshape(10, 625)))
    savemat(tmp_path / "faces.mat", {"images": faces.reshape(40, 625).T})  # one per column
    from_mat = data.load_faces(tmp_path / "faces.mat", num_train=None, num_test=10)
    assert torch.equal(from_mat.train, split.train)
    results = autoencoder.main(
        ["--data", "faces", "--faces-path", str(tmp_path / "faces.npy"), "--optim", "adam",
         "--num-epochs", "1", "--batch-size", "10", "--no-progress", "--out", str(tmp_path / "r")]
    )  # fmt: skip
    history = results[0].metrics
    assert len(history) == 2 and all(np.isfinite(m["train_loss"]) for m in history)
    assert (tmp_path / "r" / "loss.png").is_file()


def test_faces_errors_and_stand_in(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        autoencoder.main(["--data", "faces", "--out", str(tmp_path)])
    assert "--faces-path" in capsys.readouterr().err
    np.save(tmp_path / "bad.npy", np.zeros((10, 784), dtype=np.float32))
    with pytest.raises(SystemExit):
        autoencoder.main(["--data", "faces", "--faces-path", str(tmp_path / "bad.npy")])
    assert "FACES needs [N, 625]" in capsys.readouterr().err
    stand_in = data.load_data("faces-synthetic", num_train=50, num_test=20, seed=3)
    assert stand_in.train.shape == (50, 625) and stand_in.test.shape == (20, 625)
    again = data.load_data("faces-synthetic", num_train=50, num_test=20, seed=3)
    assert torch.equal(stand_in.train, again.train)


def test_device_cuda_without_cuda_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.is_available():
        assert common.resolve_device("auto").type == "cuda"
        return
    assert common.resolve_device("auto").type == "cpu"
    with pytest.raises(SystemExit):
        autoencoder.main([*TINY, "--device", "cuda", "--out", str(tmp_path)])
    assert "CUDA is not available" in capsys.readouterr().err
