"""Image classification with curvlib's optimizers: the papers' networks and a few small ones.

========================  ==============================================================
``--model``               network (``examples/networks.py``; parameters at 10 classes)
========================  ==============================================================
``kpsvd-cnn`` (default)   three 5x5 conv + ReLU + 2x2 max-pool stages (32, 32, 64
                          channels), then linear 128 + ReLU and linear to the classes,
                          in the KFC layout of Grosse & Martens
``cuda-convnet``          the KPSVD papers' ``cuda_convnet``: 3x3 convs, max-pool 3,
                          BatchNorm (19,178 parameters on 3x32x32 images)
``toy-cnn``               the papers' ``ToyCNN``: 7x7 and 5x5 tanh convs with 4 and 2
                          channels, max-pool 3, linear (824 parameters)
``resnet-small``          a CIFAR-style ResNet built from torchvision's ``BasicBlock``
                          (3x3 stem of 16 channels, one block per stage at 16, 32, 64
                          channels, global average pool, linear)
``resnet18/34/50``        torchvision's ImageNet ResNets, fed 32x32 images unchanged as
                          the papers' code does (11.2 M, 21.3 M, 23.5 M parameters)
``resnet110``             He et al.'s CIFAR ResNet-110: 3 stages of 18 basic blocks at
                          16, 32, 64 channels, parameter-free shortcuts (1.73 M)
``vgg11``                 torchvision's VGG-11 with a 512-input classifier for 32x32
                          images (28.1 M)
``deep-linear``           64 linear layers of width 10 with BatchNorm (flattened images)
``mlp``                   784-1000-900-...-20-10 linear layers with BatchNorm (4.1 M)
``toy``                   784-10-30-20-15-10 with tanh units
========================  ==============================================================

``--model`` also reads the papers' names with underscores (``cuda_convnet``).
Loss ``CrossEntropyLoss``; the metrics add train and test accuracy. Several
networks have BatchNorm in train mode, and torchvision's blocks call one in-place ReLU
module twice: curvlib computes their MC and exact statistics by its autograd
backend (module hooks, no BackPACK), reads the empirical ones from the layers'
own output gradients, and the BatchNorm parameters take plain SGD steps.
``--init`` and ``--bias-init`` choose the papers' initialisations (the default
keeps the network's own).

``--data synthetic`` (default) is the seeded 10-class set of oriented gratings
of ``examples/data.py`` (3x32x32, no files needed); ``mnist``,
``fashion-mnist``, ``cifar10``, ``cifar100`` (100 classes) and ``svhn`` are read
from ``--data-root``, never downloaded.

Examples (from the repository root)::

    python examples/cnn.py                                   # KFAC, synthetic images
    python examples/cnn.py --compare kfac,kpsvd,adam
    python examples/cnn.py --model resnet-small --optim kfac
    python examples/cnn.py --model cuda-convnet --init xavier-uniform --bias-init 0.01
    python examples/cnn.py --data cifar10 --data-root ~/data --num-epochs 20
    torchrun --nproc_per_node=2 examples/cnn.py --device cpu   # 2 ranks, gloo

Outputs in ``--out``: ``metrics.csv``, ``metrics.json``, ``iterations.csv`` (loss
and cumulative time at every step), ``loss.png``,
``telemetry.png`` (curvlib optimizers), ``checkpoint.pt`` and ``summary.json``;
with ``--compare`` one subdirectory per optimizer, ``compare.png`` and
``compare_accuracy.png``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    RunResult,
    Task,
    UsageError,
    build_parser,
    log,
    nonnegative_float,
    resolve_device,
    run_experiment,
)
from data import IMAGE_DATASETS, DataNotFoundError, load_images
from initialisation import WEIGHT_INITS, initialise
from networks import NETWORKS, kpsvd_cnn, resnet18, resnet_small

__all__ = ["MODELS", "NETWORKS", "kpsvd_cnn", "main", "make_network", "resnet18", "resnet_small"]

CLASSIFICATION_DATA = tuple(d for d in IMAGE_DATASETS if d != "curves")
"""``--data`` choices: the labelled image sets."""


MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    name: net.make for name, net in NETWORKS.items()
}
"""``--model`` name to ``make(channels, side, num_classes)`` (see ``examples/networks.py``)."""

INIT_CHOICES = ("default", *WEIGHT_INITS)
"""``--init``: ``default`` keeps the weights torch or torchvision gives the network."""


def model_name(text: str) -> str:
    """``argparse`` type of ``--model``: underscores (``cuda_convnet``) read as dashes."""
    return text.strip().replace("_", "-")


def make_network(args: argparse.Namespace, channels: int, side: int, num_classes: int) -> nn.Module:
    """The ``--model`` network, initialised as ``--init`` and ``--bias-init`` say."""
    model = MODELS[args.model](channels, side, num_classes)
    if args.init != "default" or args.bias_init is not None:
        initialise(
            model,
            None if args.init == "default" else args.init,
            bias=args.bias_init,
            std=args.init_std,
        )
    return model


def build_argparser() -> argparse.ArgumentParser:
    """The common flags of ``examples/cli.py`` plus the data and model flags."""
    parser = build_parser(
        (__doc__ or "").splitlines()[0],
        epilog="Defaults train KFAC on 10,000 generated 32x32 images (10 classes) for 5 epochs.",
        out=Path("runs/cnn"),
        batch_size=128,
        num_epochs=5,
    )
    group = parser.add_argument_group("data and model")
    group.add_argument(
        "--data",
        choices=CLASSIFICATION_DATA,
        default="synthetic",
        help="data set (synthetic is generated offline; the others are read from --data-root)",
    )
    table = "; ".join(f"{name}: {net.help}" for name, net in NETWORKS.items())
    group.add_argument(
        "--model",
        type=model_name,
        choices=tuple(MODELS),
        default="kpsvd-cnn",
        help=f"network ({table})",
    )
    group.add_argument(
        "--init",
        choices=INIT_CHOICES,
        default="default",
        help="weight initialisation of every linear and convolution; default keeps the "
        "network's own (see examples/initialisation.py; sparse: Martens 2010)",
    )
    group.add_argument(
        "--init-std",
        type=nonnegative_float,
        default=0.01,
        help="standard deviation of --init normal",
    )
    group.add_argument(
        "--bias-init",
        type=float,
        default=None,
        help="value of every bias (default: the network's own; 0.01 in the papers' code)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
    """Parse ``argv`` (default ``sys.argv``), train and return the runs' results."""
    parser = build_argparser()
    args = parser.parse_args(argv)
    generated = args.data == "synthetic"
    try:
        device = resolve_device(args.device)
        split = load_images(
            args.data,
            num_train=10_000 if generated and args.num_train is None else args.num_train,
            num_test=2_000 if generated and args.num_test is None else args.num_test,
            seed=args.seed,
            data_root=args.data_root,
        )
    except (DataNotFoundError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    channels, side, _ = split.image_shape
    try:
        NETWORKS[args.model].check(args.model, side)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    task = Task(
        make_model=lambda: make_network(args, channels, side, split.num_classes),
        loss_fn=nn.CrossEntropyLoss(),
        train_x=split.train_x.to(device),
        train_y=split.train_y.to(device),
        test_x=split.test_x.to(device),
        test_y=split.test_y.to(device),
        eval_batch=1_000,
        accuracy=True,
        train_eval=5_000,
    )
    log(  # rank 0 only under torchrun
        f"{split.name}: {len(task.train_x)} train / {len(task.test_x)} test images "
        f"{channels}x{side}x{side}, {split.num_classes} classes, {args.model}"
    )
    try:
        return run_experiment(task, args, f"{split.name} {args.model}")
    except UsageError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


if __name__ == "__main__":
    main()
