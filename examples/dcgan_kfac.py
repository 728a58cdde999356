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

Outputs in ``--out``: ``metrics.csv``, ``metrics.json``, ``iterations.csv`` and
``iterations.json`` (generator and critic loss and cumulative training seconds at
every generator step), ``loss.png`` (generator and critic loss), ``quality.png``
(``fd``), ``telemetry.png`` / ``telemetry_critic.png`` (curvlib optimizers),
``samples/``, ``checkpoint.pt`` and ``summary.json``; with ``--compare`` one
subdirectory per optimizer and ``compare.png`` (``fd`` of every run).

This file is the command line; the networks are in ``examples/gan_models.py``,
the steps of each network in ``examples/gan_steps.py``, the training loop and
its outputs in ``examples/gan_training.py`` and the scores in
``examples/gan_evaluation.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    RunResult,
    UsageError,
    build_parser,
    plot_runs,
    positive_float,
    positive_int,
    resolve_device,
    runs_of,
)
from data import IMAGE_DATASETS, DataNotFoundError, load_images
from gan_evaluation import prepare
from gan_fid import FidUnavailable
from gan_models import ARCHS, networks
from gan_training import GAN_OPTIMIZERS, train_gan
from report import fmt
from torchrun import refuse_ranks

NETWORKS = ("generator", "critic", "both")
GANS = ("bce", "wgan-gp")
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "dcgan": {"gan": "bce", "nz": 32, "width": 16, "data": "curves"},
    "resnet": {"gan": "wgan-gp", "nz": 128, "width": 128, "data": "synthetic"},
}
"""``--arch``: the defaults it gives ``--gan``, ``--nz``, ``--width`` and ``--data``."""


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
    try:
        setup = prepare(split, args.fd_dims, args.fid_weights, device)
    except FidUnavailable as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if setup.fid is not None:
        print(f"real-vs-real fid {fmt(setup.fid_real, '.2f')}")
    fd_real, fid, fid_real = setup.fd_real, setup.fid, setup.fid_real
    print(
        f"{split.name}: {len(setup.train)} train / {len(setup.test)} test images, "
        f"{args.arch} {args.gan} GAN, "
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
