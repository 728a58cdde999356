"""Smoke tests of ``examples/dcgan_kfac.py`` at tiny sizes, its Wasserstein surrogate and score."""

from __future__ import annotations

import copy
import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import autoencoder  # noqa: E402
import common  # noqa: E402
import dcgan_kfac  # noqa: E402
import gan_models  # noqa: E402
import gan_steps  # noqa: E402
import gan_training  # noqa: E402
from gan_quality import FrechetPCA  # noqa: E402

# BatchNorm layers take plain SGD steps under KFAC; the scripts warn about it once.
pytestmark = [
    pytest.mark.filterwarnings("ignore:These trainable modules have no curvature block"),
    pytest.mark.usefixtures("one_thread"),
]

TINY = [
    "--num-train", "64", "--num-test", "32", "--batch-size", "16", "--num-epochs", "2",
    "--width", "4", "--nz", "8", "--fd-dims", "8", "--t-cov", "1", "--t-inv", "2",
    "--no-progress",
]  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dcgan")
    dcgan_kfac.main([*TINY, "--out", str(out)])
    return out


def test_dcgan_writes_metrics_samples_plots_and_telemetry(straight: Path) -> None:
    with (straight / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(gan_training.METRIC_FIELDS)
    history = json.loads((straight / "metrics.json").read_text())
    assert [m["epoch"] for m in history] == [0, 1, 2]
    assert all(m["fd"] is not None and m["fd"] >= 0 for m in history)
    assert history[0]["fd_real"] == history[-1]["fd_real"] < history[0]["fd"]
    last = history[-1]
    assert last["g_loss"] is not None and last["d_loss"] is not None
    assert 0.0 < last["g_kl_clip_factor_last"] <= 1.0  # KFAC on the generator
    assert last["d_kl_clip_factor"] is None  # Adam on the critic
    assert last["steps"] == 8  # 64 images / batch 16, one critic step per generator step
    for name in ("samples/epoch_001.png", "samples/epoch_002.png", "loss.png", "quality.png",
                 "telemetry.png"):  # fmt: skip
        assert (straight / name).read_bytes()[:8] == PNG, name
    assert not (straight / "telemetry_critic.png").exists()
    summary = json.loads((straight / "summary.json").read_text())
    assert summary[0]["label"] == "kfac" and summary[0]["fd"] == last["fd"]


def _iterations(out: Path) -> list[dict[str, float]]:
    with (out / "iterations.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(gan_training.ITERATION_FIELDS)
    assert json.loads((out / "iterations.json").read_text()) == [
        {k: float(v) if k != "step" else int(v) for k, v in row.items()} for row in rows
    ]
    return [{k: float(v) for k, v in row.items()} for row in rows]


def test_iterations_log_both_losses_and_the_clock_of_every_generator_step(straight: Path) -> None:
    rows = _iterations(straight)
    history = json.loads((straight / "metrics.json").read_text())
    assert [r["step"] for r in rows] == list(range(1, 9))  # 4 generator steps per epoch
    for epoch in (1, 2):
        part = rows[4 * (epoch - 1) : 4 * epoch]
        # One critic step per generator step: the epoch's means are the rows' means.
        for key in ("g_loss", "d_loss"):
            assert sum(r[key] for r in part) / 4 == pytest.approx(history[epoch][key], rel=1e-6)
        # The clock of metrics.csv: each step's time within its epoch's.
        assert history[epoch - 1]["wall_time"] < part[0]["wall_time"]
        assert part[-1]["wall_time"] <= history[epoch]["wall_time"]
    times = [r["wall_time"] for r in rows]
    assert times == sorted(times) and len(set(times)) == len(times)


def test_resume_continues_exactly(straight: Path, tmp_path: Path) -> None:
    dcgan_kfac.main([*TINY, "--num-epochs", "1", "--out", str(tmp_path)])
    dcgan_kfac.main([*TINY, "--resume", "--out", str(tmp_path)])
    resumed = json.loads((tmp_path / "metrics.json").read_text())
    whole = json.loads((straight / "metrics.json").read_text())
    assert [m["epoch"] for m in resumed] == [0, 1, 2]
    for key in ("g_loss", "d_loss", "fd", "g_kl_clip_factor"):
        assert resumed[2][key] == whole[2][key], key
    steps = json.loads((tmp_path / "telemetry.json").read_text())
    assert [s["step"] for s in steps] == list(range(1, 9))
    untimed = [{k: v for k, v in r.items() if k != "wall_time"} for r in _iterations(tmp_path)]
    assert untimed == [
        {k: v for k, v in r.items() if k != "wall_time"} for r in _iterations(straight)
    ]


def test_wgan_gp_with_curvature_on_both_networks(tmp_path: Path) -> None:
    results = dcgan_kfac.main(
        [*TINY, "--gan", "wgan-gp", "--kfac-on", "both", "--critic-steps", "2",
         "--num-epochs", "1", "--out", str(tmp_path)]
    )  # fmt: skip
    final = results[0].final
    assert final["steps"] == 2  # 4 batches, 2 critic steps per generator step
    assert 0.0 < final["d_kl_clip_factor"] <= 1.0 and 0.0 < final["g_kl_clip_factor"] <= 1.0
    assert (tmp_path / "telemetry_critic.png").read_bytes()[:8] == PNG
    critic_steps = json.loads((tmp_path / "telemetry_critic.json").read_text())
    assert len(critic_steps) == 4
    rows = _iterations(tmp_path)  # one row per generator step, its 2 critic losses averaged
    assert [r["step"] for r in rows] == [1, 2]
    assert (rows[0]["d_loss"] + rows[1]["d_loss"]) / 2 == pytest.approx(final["d_loss"], rel=1e-6)
    assert (rows[0]["g_loss"] + rows[1]["g_loss"]) / 2 == pytest.approx(final["g_loss"], rel=1e-6)


def test_compare_plots_the_quality_of_every_run(tmp_path: Path) -> None:
    dcgan_kfac.main([*TINY, "--num-epochs", "1", "--compare", "sgd,adam", "--out", str(tmp_path)])
    assert (tmp_path / "compare.png").read_bytes()[:8] == PNG
    assert [s["label"] for s in json.loads((tmp_path / "summary.json").read_text())] == [
        "sgd", "adam",
    ]  # fmt: skip


def test_the_generator_optimizer_never_touches_the_critic() -> None:
    torch.manual_seed(0)
    args = dcgan_kfac.build_argparser().parse_args(["--t-cov", "1"])
    dcgan_kfac.check_args(dcgan_kfac.build_argparser(), args)
    gan = gan_models.GAN(gan_models.generator(4, 1, 8, 2), gan_models.critic(1, 8, 2))
    bce = nn.BCEWithLogitsLoss()
    opts = gan_training.build_optimizers(args, args.optim, gan, bce)
    layers = [layer.name for layer in opts["g"].layers]  # type: ignore[attr-defined]
    assert layers and all(name.startswith("generator.") for name in layers)
    critic_before = [p.detach().clone() for p in gan.critic.parameters()]
    gen_before = [p.detach().clone() for p in gan.generator.parameters()]
    gan_steps.generator_step(args, gan, opts["g"], torch.randn(6, 4), bce, nn.MSELoss())
    for p, q in zip(gan.critic.parameters(), critic_before, strict=True):
        assert torch.equal(p, q)
    moved = zip(gan.generator.parameters(), gen_before, strict=True)
    assert all(not torch.equal(p, q) for p, q in moved)


def test_wasserstein_target_has_the_wasserstein_gradient() -> None:
    scores = torch.randn(6, 1, requires_grad=True)
    weights = torch.tensor([-1, -1, -1, 1, 1, 1.0]) / 3
    nn.MSELoss()(scores, gan_steps.wasserstein_target(scores, weights)).backward()
    assert scores.grad is not None
    torch.testing.assert_close(scores.grad.view(-1), weights)


def test_gradient_penalty_of_a_linear_critic() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[3.0, 0.0, 4.0, 0.0]]))  # gradient norm 5
    real, fake = torch.rand(5, 1, 2, 2), torch.rand(5, 1, 2, 2)
    penalty = gan_steps.gradient_penalty(net, real, fake, torch.Generator().manual_seed(0))
    assert float(penalty.detach()) == pytest.approx(16.0)


def test_frechet_pca_score() -> None:
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(400, 1, 4, 4, generator=gen) * torch.linspace(0.5, 2, 16).view(1, 1, 4, 4)
    score = FrechetPCA(real, k=5)
    assert score.score(real, real) == pytest.approx(0.0, abs=1e-6)
    shift = torch.randn(1, 1, 4, 4, generator=gen)
    projected = (shift.flatten().double() @ score.basis).square().sum()
    assert score.score(real, real + shift) == pytest.approx(float(projected), rel=1e-6)
    collapsed = real.mean(0, keepdim=True).expand(400, 1, 4, 4)  # one image, no spread
    assert score.score(real, collapsed) > score.score(real, real[:200])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gan", "wgan-gp", "--fisher", "mc"], "only --fisher empirical applies"),
        (["--gan", "wgan-gp", "--fisher", "exact"], "no likelihood"),
        (["--kfac-on", "discriminator"], "choose from 'generator', 'critic', 'both'"),
        (["--gan", "lsgan"], "choose from 'bce', 'wgan-gp'"),
        (["--adaptive-damping"], "not supported by the GAN example"),
        (["--critic-steps", "0"], "must be >= 1"),
        (["--grid", "lr=0.1,0.3"], "a GAN does not have"),
    ],
)
def test_bad_values_are_rejected_by_the_parser(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        dcgan_kfac.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_wgan_gp_defaults_to_the_empirical_fisher_and_adam_needs_none() -> None:
    parser = dcgan_kfac.build_argparser()
    args = parser.parse_args(["--gan", "wgan-gp"])
    dcgan_kfac.check_args(parser, args)
    assert args.fisher == "empirical"
    args = parser.parse_args(["--gan", "wgan-gp", "--fisher", "mc", "--optim", "adam"])
    dcgan_kfac.check_args(parser, args)  # no curvature optimizer: the flavour is unused
    assert common.OPTIMIZERS["adam"].curvature is False


@pytest.mark.parametrize("gan_loss", ["bce", "wgan-gp"])
def test_simultaneous_sgd_steps_both_networks_from_the_same_point(gan_loss: str) -> None:
    """Each network moves by -lr times its gradient at the *old* parameters of both."""
    torch.manual_seed(0)
    lr = 0.05
    args = dcgan_kfac.build_argparser().parse_args(["--optim", "sim-sgd", "--lr", str(lr)])
    args.gan = gan_loss
    gan = gan_models.GAN(gan_models.generator(4, 1, 8, 2), gan_models.critic(1, 8, 2))
    old = copy.deepcopy(gan)
    bce = nn.BCEWithLogitsLoss()
    opts = gan_training.build_optimizers(args, args.optim, gan, bce)
    assert all(isinstance(opt, torch.optim.SGD) for opt in opts.values())
    real, z = torch.rand(6, 1, 8, 8) * 2 - 1, torch.randn(6, 4)
    gan_steps.simultaneous_step(
        args, gan, opts, real, z, torch.Generator().manual_seed(3), bce
    )  # fmt: skip

    # The reference: both losses at the old parameters, written out independently.
    fake = old.generator(z)
    if gan_loss == "bce":
        d_loss = bce(old.critic(real), torch.ones(6, 1)) + bce(
            old.critic(fake.detach()), torch.zeros(6, 1)
        )
        d_loss = d_loss / 2
        g_loss = bce(old.critic(fake), torch.ones(6, 1))
    else:
        penalty = gan_steps.gradient_penalty(
            old.critic, real, fake.detach(), torch.Generator().manual_seed(3)
        )
        d_loss = old.critic(fake.detach()).mean() - old.critic(real).mean() + 10 * penalty
        g_loss = -old.critic(fake).mean()
    d_grads = torch.autograd.grad(d_loss, list(old.critic.parameters()))
    g_grads = torch.autograd.grad(g_loss, list(old.generator.parameters()))
    for net, ref, grads in (
        (gan.critic, old.critic, d_grads),
        (gan.generator, old.generator, g_grads),
    ):
        for p, q, g in zip(net.parameters(), ref.parameters(), grads, strict=True):
            torch.testing.assert_close(p.detach(), q.detach() - lr * g)


def test_simultaneous_sgd_takes_one_critic_step_per_generator_step(tmp_path: Path) -> None:
    argv = [*TINY, "--num-epochs", "1", "--gan", "wgan-gp", "--optim", "sim-sgd"]
    (result,) = dcgan_kfac.main([*argv, "--out", str(tmp_path)])
    assert result.label == "sim-sgd"
    assert result.lr == gan_training.GAN_OPTIMIZERS["sim-sgd"].default_lr
    assert result.final["steps"] == 64 // 16  # not 64 // 16 // --critic-steps
    assert result.final["fd"] is not None and result.final["g_loss"] is not None
    assert not (tmp_path / "telemetry.png").exists()
    rows = _iterations(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert sum(r["d_loss"] for r in rows) / 4 == pytest.approx(result.final["d_loss"], rel=1e-6)


def test_simultaneous_sgd_is_the_gan_examples_own(capsys: pytest.CaptureFixture[str]) -> None:
    assert "sim-sgd" in dcgan_kfac.build_argparser().format_help()
    with pytest.raises(SystemExit):
        autoencoder.build_argparser().parse_args(["--optim", "sim-sgd"])
    assert "invalid optimizer 'sim-sgd'" in capsys.readouterr().err


def test_per_sample_approximations_on_the_batchnorm_generator_are_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        dcgan_kfac.main([*TINY, "--optim", "ekfac", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--optim ekfac: EKFAC needs per-sample statistics" in err
    assert "generator.2, generator.5" in err and "Use kfac or kfac-eigen" in err
    assert not (tmp_path / "metrics.json").exists()
    # The critic has no BatchNorm: there EKFAC trains.
    dcgan_kfac.main([*TINY, "--optim", "ekfac", "--kfac-on", "critic", "--out", str(tmp_path)])
    assert (tmp_path / "metrics.json").is_file()


def test_coupled_samples_refusal_follows_what_the_extractor_accepts() -> None:
    from optimizers import refuse_coupled_samples

    from curvlib import EKFAC, KFAC, PreconditionedOptimizer

    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    refuse_coupled_samples(net, KFAC())  # Kronecker factors exist for coupled samples
    with pytest.raises(ValueError, match=r"BatchNorm layers \(1\)"):
        refuse_coupled_samples(net, EKFAC())
    opt = PreconditionedOptimizer(net, EKFAC(), loss_fn=loss_fn)
    with pytest.raises(RuntimeError, match="couples the samples"), opt.record():
        loss_fn(net(x), y).backward()  # what the refusal spares the user: the first step fails
    net.eval()  # running statistics: the samples are independent again
    refuse_coupled_samples(net, EKFAC())
    net[1] = nn.BatchNorm1d(4, track_running_stats=False).eval()  # the batch's, even in eval
    with pytest.raises(ValueError, match="per-sample statistics"):
        refuse_coupled_samples(net, EKFAC())
