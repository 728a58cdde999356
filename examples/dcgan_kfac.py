r"""DCGAN and WGAN-GP with KFAC (or any curvlib optimizer) on the generator, critic or both.

The generator maps ``z ~ N(0, I)`` through ``ConvTranspose2d`` + ``BatchNorm2d``
(train mode) + ReLU stages to ``tanh`` images; the critic is strided convs +
LeakyReLU and a linear score. ``--arch resnet`` takes instead the WGAN-GP ResNet
generator and critic of Gulrajani et al. (2017) for 32x32 images
(``examples/gan_resnet.py``: 3 up-sampling residual blocks in the generator, 4
in the critic, 128 channels), with ``--gan wgan-gp``, ``--nz 128`` and
``--data synthetic`` (3x32x32, offline) as its defaults. ``--optim`` trains the networks named by
``--kfac-on`` (``generator``, ``critic`` or ``both``); the other one takes
``Adam(--adam-lr, betas=(0.5, 0.999))``.

* ``--gan bce`` (default, DCGAN): the critic is a classifier trained with
  ``BCEWithLogitsLoss`` on real (1) and generated (0) images; the generator
  minimises the non-saturating loss ``BCE(critic(generator(z)), 1)``. Its Fisher
  is that of the composite model ``critic(generator(z))`` with the Bernoulli
  likelihood of the critic's logits: the optimizer is built on a module holding
  both networks with ``include=["generator.*"]`` and
  ``params=generator.parameters()``, so only the generator's layers are
  preconditioned and stepped. ``--fisher mc`` (default), ``exact`` or
  ``empirical``.
* ``--gan wgan-gp``: a Wasserstein critic with gradient penalty (weight
  ``--gp-weight``), ``--critic-steps`` (5) critic steps per generator step. The
  critic's score has no likelihood, so only the empirical Fisher applies
  (``--fisher empirical``, the default here; ``mc``/``exact`` are refused). The
  Wasserstein losses are handed to curvlib as ``MSELoss`` against a shifted
  detached target, which has exactly the Wasserstein gradient; the statistics
  come from that term, and the gradient penalty's gradient is added outside the
  ``record()`` block (it steps the critic but is not in its curvature).

``--optim sim-sgd`` is the baseline of simultaneous SGD ascent-descent: both
networks take plain SGD steps (``--lr``, default 0.02; ``--momentum``, default 0)
from gradients taken at the same parameters, $\theta_G \leftarrow \theta_G - \eta
\nabla_G L_G(\theta_G, \theta_D)$ and $\theta_D \leftarrow \theta_D - \eta \nabla_D
L_D(\theta_G, \theta_D)$, one critic step per generator step (``--kfac-on``,
``--adam-lr`` and ``--critic-steps`` do not apply). With ``--gan wgan-gp``,
$L_G = -L_D$ up to the penalty: gradient descent on the generator and ascent on
the critic of one value $\mathbb{E}[D(x)] - \mathbb{E}[D(G(z))]$. With ``bce``
the generator's loss is the non-saturating one. Every other ``--optim`` is
trained alternately: the critic's step(s) first, then the generator's against
the updated critic.

Every epoch writes a sample grid ``samples/epoch_NNN.png`` (fixed noise) and the
sample-quality score ``fd``: the Fréchet distance between generated and real
test images in the top-32 PCA space of the real training images
(``examples/gan_quality.py`` says what it measures and what it misses), next
to ``fd_real``, the score of real training images against the same test images
(the floor). ``--fid-weights PATH`` adds the Fréchet Inception Distance ``fid``
(and its floor ``fid_real``) from torch-fidelity's InceptionV3 weights in a
local file (``examples/gan_fid.py``; the optional extra ``curvlib[fid]``).

``--data curves`` (default) is generated offline (1x28x28); ``synthetic``,
``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100`` and ``svhn`` are the image sets of
``examples/data.py``.

Examples (from the repository root)::

    python examples/dcgan_kfac.py                              # KFAC on the generator
    python examples/dcgan_kfac.py --compare kfac,adam          # same data, seed, critic
    python examples/dcgan_kfac.py --kfac-on both
    python examples/dcgan_kfac.py --gan wgan-gp --kfac-on critic
    python examples/dcgan_kfac.py --compare kfac,sim-sgd       # against simultaneous SGD
    python examples/dcgan_kfac.py --arch resnet --data cifar10 --kfac-on both --device cuda

Outputs in ``--out``: ``metrics.csv``, ``metrics.json``, ``loss.png`` (generator
and critic loss), ``quality.png`` (``fd``), ``telemetry.png`` /
``telemetry_critic.png`` (curvlib optimizers), ``samples/``, ``checkpoint.pt``
and ``summary.json``; with ``--compare`` one subdirectory per optimizer and
``compare.png`` (``fd`` of every run).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    OPTIMIZERS,
    OptimConfig,
    OptimizerSpec,
    RunResult,
    RunSpec,
    UsageError,
    build_optimizer,
    build_parser,
    optim_config,
    plot_runs,
    positive_float,
    positive_int,
    resolve_device,
    runs_of,
    write_metrics,
)
from data import IMAGE_DATASETS, DataNotFoundError, load_images
from gan_fid import FidUnavailable, FrechetInception
from gan_quality import FrechetPCA
from gan_resnet import resnet_critic, resnet_generator
from report import Row, finite, fmt
from torchrun import refuse_ranks
from training import (
    CHECKPOINT,
    TELEMETRY_FIELDS,
    Telemetry,
    batches,
    load_checkpoint,
    mean,
    nothing,
    progress_bar,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_telemetry,
)

NETWORKS = ("generator", "critic", "both")
GANS = ("bce", "wgan-gp")
ARCHS = ("dcgan", "resnet")
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "dcgan": {"gan": "bce", "nz": 32, "width": 16, "data": "curves"},
    "resnet": {"gan": "wgan-gp", "nz": 128, "width": 128, "data": "synthetic"},
}
"""``--arch``: the defaults it gives ``--gan``, ``--nz``, ``--width`` and ``--data``."""
SIMULTANEOUS = "sim-sgd"
"""The ``--optim`` name of simultaneous SGD ascent-descent, the GAN example's own."""
METRIC_FIELDS: tuple[str, ...] = (
    "epoch",
    "steps",
    "g_loss",
    "d_loss",
    "fd",
    "fd_real",
    "fid",
    "fid_real",
    "wall_time",
    "epoch_time",
    *(f"g_{k}" for k in TELEMETRY_FIELDS),
    *(f"d_{k}" for k in TELEMETRY_FIELDS),
)
"""Columns of ``metrics.csv``: the epoch's mean generator and critic losses (the
Wasserstein critic loss includes the penalty), the quality score ``fd`` and its
real-vs-real floor ``fd_real``, the FID ``fid`` and its floor ``fid_real`` (empty
without ``--fid-weights``), cumulative training seconds, and the telemetry of
the generator's (``g_``) and critic's (``d_``) curvlib optimizer."""


# -- networks -----------------------------------------------------------------------


def generator(nz: int, channels: int, side: int, width: int = 16) -> nn.Sequential:
    """DCGAN generator: ``[N, nz]`` noise to ``[N, channels, side, side]`` images in (-1, 1).

    ``ConvTranspose2d(nz, 4w, side/4)`` + BN + ReLU, ``ConvTranspose2d(4w, 2w, 4, 2)``
    + BN + ReLU, ``ConvTranspose2d(2w, channels, 4, 2)`` + tanh.
    """
    if side % 4:
        raise ValueError(f"The image side must be a multiple of 4, got {side}.")
    return nn.Sequential(
        nn.Unflatten(1, (nz, 1, 1)),
        nn.ConvTranspose2d(nz, 4 * width, side // 4, bias=False),
        nn.BatchNorm2d(4 * width),
        nn.ReLU(),
        nn.ConvTranspose2d(4 * width, 2 * width, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.ConvTranspose2d(2 * width, channels, 4, stride=2, padding=1),
        nn.Tanh(),
    )


def critic(channels: int, side: int, width: int = 16) -> nn.Sequential:
    """Critic: two strided 4x4 convs with LeakyReLU(0.2), then a linear score ``[N, 1]``.

    No BatchNorm: the WGAN-GP penalty needs per-sample scores, and the BCE critic
    then sees real and generated images in one batch without coupling them.
    """
    return nn.Sequential(
        nn.Conv2d(channels, 2 * width, 4, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(2 * width, 4 * width, 4, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(4 * width * (side // 4) ** 2, 1),
    )


def networks(args: argparse.Namespace, channels: int, side: int) -> tuple[nn.Module, nn.Module]:
    """The generator and the critic of ``--arch`` for ``[channels, side, side]`` images.

    Raises:
        ValueError: If ``side`` does not suit the architecture.
    """
    if args.arch == "resnet":
        return (
            resnet_generator(args.nz, channels, side, args.width),
            resnet_critic(channels, side, args.width),
        )
    return generator(args.nz, channels, side, args.width), critic(channels, side, args.width)


class GAN(nn.Module):
    """Both networks; ``forward(z) = critic(generator(z))``, the generator's composite model.

    Args:
        generator: Noise to images.
        critic: Images to ``[N, 1]`` scores (logits for ``bce``).
    """

    def __init__(self, generator: nn.Module, critic: nn.Module) -> None:
        super().__init__()
        self.generator = generator
        self.critic = critic

    def forward(self, z: Tensor) -> Tensor:
        """The critic's score of generated images, ``[N, 1]``."""
        return self.critic(self.generator(z))


def wasserstein_target(scores: Tensor, weights: Tensor) -> Tensor:
    r"""The target that makes ``MSELoss()(scores, target)`` have the gradient of ``Σ w_i D_i``.

    ``MSELoss`` (mean over ``N`` scores) has $\partial/\partial D_i = 2(D_i - t_i)/N$,
    which equals $w_i$ for $t = D - N w / 2$ (``D`` detached).
    """
    return scores.detach() - len(scores) * weights.view_as(scores) / 2


def gradient_penalty(net: nn.Module, real: Tensor, fake: Tensor, gen: torch.Generator) -> Tensor:
    r"""$\mathbb{E}[(\lVert \nabla_x D(\hat x) \rVert - 1)^2]$ at random interpolates $\hat x$."""
    eps = torch.rand(len(real), 1, 1, 1, generator=gen).to(real.device)
    mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(net(mixed).sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


# -- one run ------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """Data and settings shared by every run of a comparison.

    Attributes:
        train: ``[N, C, H, W]`` real images in [-1, 1].
        test: Real images for the quality score.
        quality: The fitted ``FrechetPCA``.
        fd_real: Real training images against ``test``: the score's floor.
        name: Data set name.
        fid: The FID against ``test`` (``--fid-weights``), or ``None``.
        fid_real: The FID of real training images: its floor.
    """

    train: Tensor
    test: Tensor
    quality: FrechetPCA
    fd_real: float
    name: str
    fid: FrechetInception | None = None
    fid_real: float | None = None


def _adam(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999))


def _sim_sgd(
    model: nn.Module, loss_fn: nn.Module, cfg: OptimConfig, **_: Any
) -> torch.optim.Optimizer:
    """Plain SGD of one network, the half of simultaneous SGD ascent-descent."""
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


GAN_OPTIMIZERS: dict[str, OptimizerSpec] = {
    **OPTIMIZERS,
    SIMULTANEOUS: OptimizerSpec(
        _sim_sgd, 0.02, False, "simultaneous SGD ascent-descent on both networks (GAN baseline)",
        default_momentum=0.0,
    ),
}  # fmt: skip
"""``OPTIMIZERS`` and the GAN's own baseline ``sim-sgd``: the names of ``--optim``."""


def _build(
    args: argparse.Namespace, spec: RunSpec, gan: GAN, loss: nn.Module
) -> dict[str, torch.optim.Optimizer]:
    """The generator's and the critic's optimizers (``loss``: the module the steps call)."""
    config = optim_config(args, spec)
    if spec.name == SIMULTANEOUS:
        return {"g": _sim_sgd(gan.generator, loss, config), "d": _sim_sgd(gan.critic, loss, config)}
    opts: dict[str, torch.optim.Optimizer] = {}
    if args.kfac_on in ("generator", "both"):
        opts["g"] = build_optimizer(
            spec.name, gan, loss, config, include=["generator.*"],
            params=gan.generator.parameters(),
        )  # fmt: skip
    else:
        opts["g"] = _adam(gan.generator.parameters(), args.adam_lr)
    if args.kfac_on in ("critic", "both"):
        opts["d"] = build_optimizer(spec.name, gan.critic, loss, config)
    else:
        opts["d"] = _adam(gan.critic.parameters(), args.adam_lr)
    return opts


@torch.no_grad()
def _samples(gan: GAN, z: Tensor) -> Tensor:
    """Images from ``z`` by a copy of the generator in train mode (batch statistics).

    The copy keeps the sampling from moving the running BatchNorm statistics.
    """
    return copy.deepcopy(gan.generator).train()(z)


def train_gan(
    setup: Setup, spec: RunSpec, args: argparse.Namespace, out: Path, device: torch.device
) -> RunResult:
    """Train one run, writing metrics, plots, samples and checkpoint every epoch.

    Raises:
        UsageError: If ``--resume`` finds a checkpoint of another optimizer.
    """
    from torchvision.utils import save_image

    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    torch.manual_seed(args.seed)
    channels, side = setup.train.shape[1], setup.train.shape[2]
    gan = GAN(*networks(args, channels, side)).to(device)
    bce, mse = nn.BCEWithLogitsLoss(), nn.MSELoss()
    opts = _build(args, spec, gan, bce if args.gan == "bce" else mse)
    data_gen = torch.Generator().manual_seed(args.seed)
    noise_gen = torch.Generator().manual_seed(args.seed + 1)
    fixed = torch.randn(64, args.nz, generator=torch.Generator().manual_seed(10_000)).to(device)
    score_z = torch.randn(
        len(setup.test), args.nz, generator=torch.Generator().manual_seed(10_001)
    ).to(device)
    result = RunResult(spec.label, optim_config(args, spec).lr, out)
    d_steps: list[Row] = []
    ckpt_path = out / CHECKPOINT
    if args.resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path, spec.name)
        gan.load_state_dict(ckpt["model"])
        for key, opt in opts.items():
            opt.load_state_dict(ckpt["optimizers"][key])
        set_rng_state(ckpt["rng"], data_gen, device)
        noise_gen.set_state(ckpt["noise"])
        result.metrics, result.steps = list(ckpt["metrics"]), list(ckpt["steps"])
        d_steps = list(ckpt["critic_steps"])
        tqdm.write(f"[{spec.label}] resuming after epoch {ckpt['epoch']} from {ckpt_path}")
    elif args.resume:
        tqdm.write(f"[{spec.label}] --resume: no checkpoint in {out}, starting from scratch")

    def quality() -> Row:
        fake = _samples(gan, score_z)
        row: Row = {"fd": finite(setup.quality.score(setup.test, fake.cpu()))}
        row["fd_real"] = setup.fd_real
        if setup.fid is not None:
            row["fid"], row["fid_real"] = finite(setup.fid.score(fake)), setup.fid_real
        return row

    if not result.metrics:
        result.metrics.append(
            {**dict.fromkeys(METRIC_FIELDS), "epoch": 0, "steps": 0, "wall_time": 0.0} | quality()
        )
    steps = int(result.final["steps"] or 0)
    wall = float(result.final["wall_time"] or 0.0)
    simultaneous = spec.name == SIMULTANEOUS
    n_critic = args.critic_steps if args.gan == "wgan-gp" and not simultaneous else 1
    per_epoch = len(batches(len(setup.train), args.batch_size, torch.Generator())) // n_critic
    tel = {"g": Telemetry(result.steps), "d": Telemetry(d_steps)}
    bar = progress_bar(args, spec.label, per_epoch * args.num_epochs, steps)
    gan.train()
    for epoch in range(int(result.final["epoch"] or 0) + 1, args.num_epochs + 1):
        start = time.perf_counter()
        g_losses: list[float] = []
        d_losses: list[float] = []
        order = batches(len(setup.train), args.batch_size, data_gen)
        for i in range(per_epoch):
            if simultaneous:
                real = setup.train[order[i]]
                z = torch.randn(len(real), args.nz, generator=noise_gen).to(device)
                g_loss, d_loss = _simultaneous_step(args, gan, opts, real, z, noise_gen, bce)
                g_losses.append(g_loss)
                d_losses.append(d_loss)
                steps += 1
                bar.update()
                continue
            for idx in order[i * n_critic : (i + 1) * n_critic]:
                real = setup.train[idx]
                z = torch.randn(len(real), args.nz, generator=noise_gen).to(device)
                with torch.no_grad():
                    fake = gan.generator(z)
                d_losses.append(_critic_step(args, gan, opts["d"], real, fake, noise_gen, bce, mse))
                tel["d"].observe(opts["d"], len(tel["d"].steps) + 1)
            z = torch.randn(args.batch_size, args.nz, generator=noise_gen).to(device)
            g_losses.append(_generator_step(args, gan, opts["g"], z, bce, mse))
            steps += 1
            tel["g"].observe(opts["g"], steps)
            bar.update()
            bar.set_postfix(epoch=epoch, g=f"{g_losses[-1]:.3f}", d=f"{d_losses[-1]:.3f}")
        elapsed = time.perf_counter() - start
        wall += elapsed
        row: Row = {
            "epoch": epoch,
            "steps": steps,
            "g_loss": mean(g_losses),
            "d_loss": mean(d_losses),
            **quality(),
            "wall_time": wall,
            "epoch_time": elapsed,
        }
        for key in ("g", "d"):
            row |= {f"{key}_{k}": v for k, v in tel[key].epoch_summary(opts[key]).items()}
        result.metrics.append({k: finite(v) for k, v in row.items()})
        save_image(_samples(gan, fixed) * 0.5 + 0.5, out / "samples" / f"epoch_{epoch:03d}.png")
        tqdm.write(
            f"[{spec.label}] epoch {epoch:3d}  g {fmt(row['g_loss'], '.4f')}  "
            f"d {fmt(row['d_loss'], '.4f')}  fd {fmt(row['fd'], '.2f')} "
            f"(real {setup.fd_real:.2f})"
            + (f"  fid {fmt(row['fid'], '.2f')}" if setup.fid is not None else "")
            + f"  time {wall:6.1f}s"
        )
        save_checkpoint(
            ckpt_path,
            {
                "epoch": epoch,
                "optimizer_name": spec.name,
                "model": gan.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in opts.items()},
                "metrics": result.metrics,
                "steps": result.steps,
                "critic_steps": d_steps,
                "rng": rng_state(data_gen, device),
                "noise": noise_gen.get_state(),
                "config": asdict(optim_config(args, spec)),
            },
        )
        _write_run(result, d_steps, setup.name)
    bar.close()
    _write_run(result, d_steps, setup.name)
    return result


def _critic_step(
    args: argparse.Namespace,
    gan: GAN,
    opt: torch.optim.Optimizer,
    real: Tensor,
    fake: Tensor,
    gen: torch.Generator,
    bce: nn.Module,
    mse: nn.Module,
) -> float:
    """One critic step on a real and a generated batch; returns the critic loss."""
    x = torch.cat([real, fake])
    n = len(real)
    opt.zero_grad()
    if args.gan == "bce":
        target = torch.cat([torch.ones(n, 1), torch.zeros(len(fake), 1)]).to(x.device)
        with getattr(opt, "record", nothing)():
            loss = bce(gan.critic(x), target)
            loss.backward()
        opt.step()
        return float(loss.detach())
    # Wasserstein: mean D(fake) - mean D(real), as an MSE with the same gradient.
    weights = torch.cat([-torch.ones(n) / n, torch.ones(len(fake)) / len(fake)]).to(x.device)
    with getattr(opt, "record", nothing)():
        scores = gan.critic(x)
        mse(scores, wasserstein_target(scores, weights)).backward()
    penalty = args.gp_weight * gradient_penalty(gan.critic, real, fake, gen)
    penalty.backward()
    opt.step()
    return float((weights * scores.detach().view(-1)).sum() + penalty.detach())


def _generator_step(
    args: argparse.Namespace,
    gan: GAN,
    opt: torch.optim.Optimizer,
    z: Tensor,
    bce: nn.Module,
    mse: nn.Module,
) -> float:
    """One generator step through the critic; returns the generator loss."""
    opt.zero_grad()
    with getattr(opt, "record", nothing)():
        scores = gan(z)
        if args.gan == "bce":
            loss = bce(scores, torch.ones_like(scores))
        else:
            weights = -torch.ones(len(z), device=z.device) / len(z)
            mse(scores, wasserstein_target(scores, weights)).backward()
            loss = -scores.detach().mean()
        if args.gan == "bce":
            loss.backward()
    opt.step()
    return float(loss.detach())


def _simultaneous_step(
    args: argparse.Namespace,
    gan: GAN,
    opts: dict[str, torch.optim.Optimizer],
    real: Tensor,
    z: Tensor,
    gen: torch.Generator,
    bce: nn.Module,
) -> tuple[float, float]:
    """One step of simultaneous SGD ascent-descent; returns (generator, critic) losses.

    Both gradients are taken at the current parameters of both networks (the
    generator's through the critic before the critic moves, the critic's on the
    same generated batch), then both networks step.
    """
    for opt in opts.values():
        opt.zero_grad()
    fake = gan.generator(z)
    n = len(real)
    scores = gan.critic(torch.cat([real, fake.detach()]))
    fake_scores = gan.critic(fake)
    if args.gan == "bce":
        target = torch.cat([torch.ones(n, 1), torch.zeros(len(fake), 1)]).to(real.device)
        d_loss = bce(scores, target)
        g_loss = bce(fake_scores, torch.ones_like(fake_scores))
    else:
        d_loss = scores[n:].mean() - scores[:n].mean()
        d_loss = d_loss + args.gp_weight * gradient_penalty(gan.critic, real, fake.detach(), gen)
        g_loss = -fake_scores.mean()
    d_params = list(gan.critic.parameters())
    g_params = list(gan.generator.parameters())
    d_grads = torch.autograd.grad(d_loss, d_params)
    g_grads = torch.autograd.grad(g_loss, g_params)
    for params, grads in ((d_params, d_grads), (g_params, g_grads)):
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
    opts["d"].step()
    opts["g"].step()
    return float(g_loss.detach()), float(d_loss.detach())


def _write_run(result: RunResult, critic_steps: Sequence[Row], name: str) -> None:
    out, title = result.out, f"{name} GAN: {result.label}"
    write_metrics(out, result.metrics, METRIC_FIELDS)
    plot_runs(
        [result], out / "loss.png", title, (("g_loss", "-"), ("d_loss", "--")),
        "loss (solid: generator, dashed: critic)", log=False,
    )  # fmt: skip
    plot_runs([result], out / "quality.png", title, (("fd", "-"),), "Fréchet distance (PCA)")
    if result.final.get("fid") is not None:
        plot_runs([result], out / "fid.png", title, (("fid", "-"),), "Fréchet Inception Distance")
    write_telemetry(out, result.steps, f"{title} (generator)")
    if critic_steps:
        (out / "telemetry_critic.json").write_text(json.dumps(list(critic_steps)) + "\n")
        from report import plot_telemetry

        plot_telemetry(critic_steps, out / "telemetry_critic.png", f"{title} (critic)")


# -- command line -------------------------------------------------------------------


def build_argparser() -> argparse.ArgumentParser:
    """The common flags of ``examples/cli.py`` plus the GAN, data and model flags."""
    parser = build_parser(
        (__doc__ or "").splitlines()[0],
        epilog="Defaults: DCGAN (bce) with KFAC on the generator and Adam on the critic, "
        "4,000 generated CURVES images, 5 epochs of batch 64, damping 1e-2 and KL clip 1e-3 "
        "(the autoencoder's looser clip destabilises the game). --fisher defaults to mc for "
        "bce and empirical for wgan-gp.",
        registry=GAN_OPTIMIZERS,
        out=Path("runs/dcgan"),
        batch_size=64,
        num_epochs=5,
        fisher=None,
        damping=1e-2,
        clipping=1e-3,
    )
    group = parser.add_argument_group("GAN, data and model")
    group.add_argument(
        "--arch",
        choices=ARCHS,
        default="dcgan",
        help="the networks: the small DCGAN, or the WGAN-GP ResNet for 32x32 images "
        "(Gulrajani et al. 2017)",
    )
    group.add_argument(
        "--gan",
        choices=GANS,
        default=None,
        help="DCGAN (bce) or WGAN-GP (default: bce for --arch dcgan, wgan-gp for resnet)",
    )
    group.add_argument(
        "--kfac-on",
        choices=NETWORKS,
        default="generator",
        help="the network(s) --optim trains (sim-sgd trains both)",
    )
    group.add_argument(
        "--adam-lr", type=positive_float, default=2e-4, help="Adam learning rate of the other"
    )
    group.add_argument(
        "--critic-steps",
        type=positive_int,
        default=5,
        help="WGAN-GP critic steps per generator step (sim-sgd takes one)",
    )
    group.add_argument("--gp-weight", type=positive_float, default=10.0, help="WGAN-GP penalty")
    group.add_argument(
        "--data",
        choices=IMAGE_DATASETS,
        default=None,
        help="images (default: curves for --arch dcgan, synthetic for resnet)",
    )
    group.add_argument(
        "--nz",
        type=positive_int,
        default=None,
        help="noise dimension (default: 32 for --arch dcgan, 128 for resnet)",
    )
    group.add_argument(
        "--width",
        type=positive_int,
        default=None,
        help="dcgan: channel width unit (default 16); resnet: channels of every block "
        "(default 128)",
    )
    group.add_argument(
        "--fd-dims", type=positive_int, default=32, help="PCA directions of the quality score"
    )
    group.add_argument(
        "--fid-weights",
        type=Path,
        default=None,
        metavar="PATH",
        help="also score fid, the Fréchet Inception Distance, with torch-fidelity's "
        "InceptionV3 weights from this file (weights-inception-2015-12-05-6726825d.pth; "
        "nothing is downloaded; needs the extra curvlib[fid])",
    )
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Resolve ``--fisher`` and the ``--arch`` defaults; refuse combinations without a meaning."""
    for key, value in ARCH_DEFAULTS[args.arch].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    curvature = any(GAN_OPTIMIZERS[s.name].curvature for s in runs_of(args))
    if args.fisher is None:
        args.fisher = "mc" if args.gan == "bce" else "empirical"
    if args.gan == "wgan-gp" and args.fisher != "empirical" and curvature:
        parser.error(
            f"--fisher {args.fisher} with --gan wgan-gp: a Wasserstein critic's score has no "
            "likelihood to sample from or differentiate, so only --fisher empirical applies."
        )
    if args.adaptive_damping:
        parser.error("--adaptive-damping is not supported by the GAN example (its loss moves).")
    if args.grid is not None:
        parser.error(
            "--grid ranks runs by their final training loss, which a GAN does not have; "
            "compare settings with --compare (e.g. kfac:0.1,kfac:0.3) and read their fd."
        )


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
    """Parse ``argv`` (default ``sys.argv``), train and return the runs' results."""
    parser = build_argparser()
    args = parser.parse_args(argv)
    refuse_ranks(parser)
    check_args(parser, args)
    if args.patience is not None:  # --preset paper sets it
        print("note: the GAN trains every epoch; --patience applies to the other examples")
    generated = args.data in ("curves", "synthetic")
    try:
        device = resolve_device(args.device)
        split = load_images(
            args.data,
            num_train=4_000 if generated and args.num_train is None else args.num_train,
            num_test=1_000 if generated and args.num_test is None else args.num_test,
            seed=args.seed,
            data_root=args.data_root,
            offline="--data curves (generated offline, the default)",
        )
        channels, side, _ = split.image_shape
        networks(args, channels, side)  # refuses an image size the networks cannot take
    except (DataNotFoundError, UsageError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    train = (split.train_x * 2 - 1).to(device)
    test = split.test_x * 2 - 1
    quality = FrechetPCA(train[:2_000].cpu(), args.fd_dims)
    fd_real = quality.score(test, train[-len(test) :].cpu())
    fid, fid_real = None, None
    if args.fid_weights is not None:
        try:
            fid = FrechetInception(args.fid_weights, test, device)
        except FidUnavailable as err:
            parser.exit(2, f"{parser.prog}: error: {err}\n")
        fid_real = finite(fid.score(train[-len(test) :]))
        print(f"real-vs-real fid {fmt(fid_real, '.2f')}")
    setup = Setup(train, test, quality, fd_real, split.name, fid, fid_real)
    print(
        f"{split.name}: {len(train)} train / {len(test)} test images, {args.arch} {args.gan} GAN, "
        f"--optim on {args.kfac_on}, fisher {args.fisher}; real-vs-real fd {fd_real:.2f}"
    )
    out: Path = args.out
    compare = args.compare is not None
    try:
        results = [
            train_gan(setup, spec, args, out / spec.label if compare else out, device)
            for spec in runs_of(args)
        ]
    except UsageError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if compare:
        plot_runs(results, out / "compare.png", f"{split.name} GAN", (("fd", "-"),), "fd")
    summary = [{"label": r.label, "lr": r.lr, **r.final} for r in results]
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\n{split.name} {args.gan} GAN on {device.type}: {args.num_epochs} epochs")
    head = f"{'optimizer':<18} {'lr':>8} {'g loss':>8} {'d loss':>8} {'fd':>8}"
    print(head + (f" {'fid':>8}" if fid is not None else "") + f" {'time (s)':>9}")
    for r in results:
        f = r.final
        print(
            f"{r.label:<18} {r.lr:>8.2g} {fmt(f['g_loss'], '.4f'):>8} "
            f"{fmt(f['d_loss'], '.4f'):>8} {fmt(f['fd'], '.2f'):>8} "
            + (f"{fmt(f.get('fid'), '.2f'):>8} " if fid is not None else "")
            + f"{fmt(f['wall_time'], '.1f'):>9}"
        )
    floor = f"fd of real training images: {fd_real:.2f}"
    if fid is not None:
        floor += f", fid {fmt(fid_real, '.2f')}"
    print(f"({floor}; lower is better)\noutputs in {out}/")
    return results


if __name__ == "__main__":
    main()
