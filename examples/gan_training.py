"""The GAN example's training loop: optimizers of both networks, epochs, logs, checkpoints.

``train_gan`` trains one run of ``--optim`` (one entry of ``--compare``): the
critic's step(s) and then the generator's for every ``--optim`` but
``sim-sgd``, which steps both networks at once (``examples/gan_steps.py``). It
writes, in the run's directory, after every epoch:

* ``metrics.csv`` / ``metrics.json`` (``METRIC_FIELDS``): one row per epoch;
* ``iterations.csv`` / ``iterations.json`` (``ITERATION_FIELDS``): one row per
  generator step, with both losses and the cumulative training seconds;
* ``loss.png``, ``quality.png`` (``fd``), ``fid.png`` (with ``--fid-weights``),
  ``telemetry.png`` / ``telemetry_critic.png`` (curvlib optimizers), a sample
  grid ``samples/epoch_NNN.png`` and ``checkpoint.pt`` (``--resume`` continues
  from it exactly).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from common import (
    OPTIMIZERS,
    OptimConfig,
    OptimizerSpec,
    RunResult,
    RunSpec,
    UsageError,
    build_optimizer,
    optim_config,
    plot_runs,
    write_metrics,
)
from gan_evaluation import Setup, samples
from gan_models import GAN, networks
from gan_steps import critic_step, generator_step, simultaneous_step
from report import Row, finite, fmt
from torch import Tensor, nn
from tqdm import tqdm
from training import (
    CHECKPOINT,
    TELEMETRY_FIELDS,
    Telemetry,
    batches,
    load_checkpoint,
    mean,
    progress_bar,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_telemetry,
)

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
ITERATION_FIELDS: tuple[str, ...] = ("step", "g_loss", "d_loss", "wall_time")
"""Columns of ``iterations.csv``, one row per generator step: the step's number,
the generator's loss and the mean loss of the critic step(s) before it (one with
``bce`` and ``sim-sgd``, ``--critic-steps`` with ``wgan-gp``), each taken before
its network stepped, and the cumulative training seconds after the step (sampling
and scoring excluded, the clock of ``metrics.csv``'s ``wall_time``)."""


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


def build_optimizers(
    args: argparse.Namespace, spec: RunSpec, gan: GAN, loss: nn.Module
) -> dict[str, torch.optim.Optimizer]:
    """The generator's (``"g"``) and the critic's (``"d"``) optimizers.

    Args:
        args: The parsed command line (``--kfac-on``, ``--adam-lr`` and the optimizer flags).
        spec: The run's ``--optim`` entry.
        gan: Both networks.
        loss: The loss module the steps call (``BCEWithLogitsLoss`` or ``MSELoss``).
    """
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


@dataclass(frozen=True)
class _Loop:
    """What every step of one run uses: networks, optimizers, noise, telemetry, progress."""

    args: argparse.Namespace
    gan: GAN
    opts: dict[str, torch.optim.Optimizer]
    train: Tensor
    noise_gen: torch.Generator
    tel: dict[str, Telemetry]
    bar: Any
    per_epoch: int
    n_critic: int
    simultaneous: bool
    bce: nn.Module
    mse: nn.Module


def _train_epoch(
    loop: _Loop, epoch: int, order: list[Tensor], steps: int, clock: float, iterations: list[Row]
) -> tuple[list[float], list[float]]:
    """One epoch's steps from global step ``steps``; appends their rows to ``iterations``.

    Args:
        loop: The run's networks, optimizers and state.
        epoch: The epoch's number (for the progress bar).
        order: The epoch's batches of training indices.
        steps: Generator steps before this epoch.
        clock: Training seconds at ``time.perf_counter() == 0``: the cumulative
            ``wall_time`` of a step is ``clock + time.perf_counter()`` after it.
        iterations: The run's per-iteration log.

    Returns:
        The generator's and the critic's losses of every step of the epoch.
    """
    args, gan, opts, device = loop.args, loop.gan, loop.opts, loop.train.device
    g_losses: list[float] = []
    d_losses: list[float] = []
    for i in range(loop.per_epoch):
        critic_losses = len(d_losses)
        if loop.simultaneous:
            real = loop.train[order[i]]
            z = torch.randn(len(real), args.nz, generator=loop.noise_gen).to(device)
            g_loss, d_loss = simultaneous_step(args, gan, opts, real, z, loop.noise_gen, loop.bce)
            g_losses.append(g_loss)
            d_losses.append(d_loss)
        else:
            for idx in order[i * loop.n_critic : (i + 1) * loop.n_critic]:
                real = loop.train[idx]
                z = torch.randn(len(real), args.nz, generator=loop.noise_gen).to(device)
                with torch.no_grad():
                    fake = gan.generator(z)
                d_losses.append(
                    critic_step(
                        args, gan, opts["d"], real, fake, loop.noise_gen, loop.bce, loop.mse
                    )
                )
                loop.tel["d"].observe(opts["d"], len(loop.tel["d"].steps) + 1)
            z = torch.randn(args.batch_size, args.nz, generator=loop.noise_gen).to(device)
            g_losses.append(generator_step(args, gan, opts["g"], z, loop.bce, loop.mse))
            loop.tel["g"].observe(opts["g"], steps + len(g_losses))
        iterations.append(
            {
                "step": steps + len(g_losses),
                "g_loss": finite(g_losses[-1]),
                "d_loss": finite(mean(d_losses[critic_losses:])),
                "wall_time": clock + time.perf_counter(),
            }
        )
        loop.bar.update()
        if not loop.simultaneous:
            loop.bar.set_postfix(epoch=epoch, g=f"{g_losses[-1]:.3f}", d=f"{d_losses[-1]:.3f}")
    return g_losses, d_losses


def train_gan(
    setup: Setup, spec: RunSpec, args: argparse.Namespace, out: Path, device: torch.device
) -> RunResult:
    """Train one run, writing metrics, iterations, plots, samples and checkpoint every epoch.

    Raises:
        UsageError: If ``--resume`` finds a checkpoint of another optimizer, or
            the optimizer refuses the options (e.g. EKFAC on the generator, whose
            BatchNorm leaves no per-sample statistics).
    """
    from torchvision.utils import save_image

    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    torch.manual_seed(args.seed)
    channels, side = setup.train.shape[1], setup.train.shape[2]
    gan = GAN(*networks(args, channels, side)).to(device)
    bce, mse = nn.BCEWithLogitsLoss(), nn.MSELoss()
    try:
        opts = build_optimizers(args, spec, gan, bce if args.gan == "bce" else mse)
    except ValueError as err:  # curvlib refuses this combination of options, saying why
        raise UsageError(f"--optim {spec.name}: {err}") from err
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
        result.iterations = list(ckpt.get("iterations", []))
        d_steps = list(ckpt["critic_steps"])
        tqdm.write(f"[{spec.label}] resuming after epoch {ckpt['epoch']} from {ckpt_path}")
    elif args.resume:
        tqdm.write(f"[{spec.label}] --resume: no checkpoint in {out}, starting from scratch")

    if not result.metrics:
        result.metrics.append(
            {**dict.fromkeys(METRIC_FIELDS), "epoch": 0, "steps": 0, "wall_time": 0.0}
            | setup.score(gan.generator, score_z)
        )
    steps = int(result.final["steps"] or 0)
    wall = float(result.final["wall_time"] or 0.0)
    simultaneous = spec.name == SIMULTANEOUS
    n_critic = args.critic_steps if args.gan == "wgan-gp" and not simultaneous else 1
    per_epoch = len(batches(len(setup.train), args.batch_size, torch.Generator())) // n_critic
    loop = _Loop(
        args, gan, opts, setup.train, noise_gen,
        {"g": Telemetry(result.steps), "d": Telemetry(d_steps)},
        progress_bar(args, spec.label, per_epoch * args.num_epochs, steps),
        per_epoch, n_critic, simultaneous, bce, mse,
    )  # fmt: skip
    gan.train()
    for epoch in range(int(result.final["epoch"] or 0) + 1, args.num_epochs + 1):
        start = time.perf_counter()
        order = batches(len(setup.train), args.batch_size, data_gen)
        g_losses, d_losses = _train_epoch(
            loop, epoch, order, steps, wall - start, result.iterations
        )
        steps += len(g_losses)
        elapsed = time.perf_counter() - start
        wall += elapsed
        row: Row = {
            "epoch": epoch,
            "steps": steps,
            "g_loss": mean(g_losses),
            "d_loss": mean(d_losses),
            **setup.score(gan.generator, score_z),
            "wall_time": wall,
            "epoch_time": elapsed,
        }
        for key in ("g", "d"):
            row |= {f"{key}_{k}": v for k, v in loop.tel[key].epoch_summary(opts[key]).items()}
        result.metrics.append({k: finite(v) for k, v in row.items()})
        save_image(
            samples(gan.generator, fixed) * 0.5 + 0.5, out / "samples" / f"epoch_{epoch:03d}.png"
        )
        tqdm.write(_epoch_line(spec.label, epoch, row, setup, wall))
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
                "iterations": result.iterations,
                "rng": rng_state(data_gen, device),
                "noise": noise_gen.get_state(),
                "config": asdict(optim_config(args, spec)),
            },
        )
        _write_run(result, d_steps, setup.name)
    loop.bar.close()
    _write_run(result, d_steps, setup.name)
    return result


def _epoch_line(label: str, epoch: int, row: Row, setup: Setup, wall: float) -> str:
    return (
        f"[{label}] epoch {epoch:3d}  g {fmt(row['g_loss'], '.4f')}  "
        f"d {fmt(row['d_loss'], '.4f')}  fd {fmt(row['fd'], '.2f')} "
        f"(real {setup.fd_real:.2f})"
        + (f"  fid {fmt(row['fid'], '.2f')}" if setup.fid is not None else "")
        + f"  time {wall:6.1f}s"
    )


def _write_run(result: RunResult, critic_steps: Sequence[Row], name: str) -> None:
    out, title = result.out, f"{name} GAN: {result.label}"
    write_metrics(out, result.metrics, METRIC_FIELDS)
    write_metrics(out, result.iterations, ITERATION_FIELDS, name="iterations")
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
