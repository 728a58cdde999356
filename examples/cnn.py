"""Image classification with curvlib's optimizers: the KPSVD paper's small conv net or a ResNet.

========================  ==============================================================
``--model``               network
========================  ==============================================================
``kpsvd-cnn`` (default)   three 5x5 conv + ReLU + 2x2 max-pool stages (32, 32, 64
                          channels), then linear 128 + ReLU and linear to the classes:
                          the small conv net of the KPSVD paper's experiments
                          (Koroko et al., 2022), in the KFC layout of Grosse & Martens
``resnet-small``          a CIFAR-style ResNet built from torchvision's ``BasicBlock``
                          (3x3 stem of 16 channels, one block per stage at 16, 32, 64
                          channels, global average pool, linear)
``resnet18``              torchvision's ``resnet18`` unchanged (11 M parameters: slow on CPU)
========================  ==============================================================

Loss ``CrossEntropyLoss``; the metrics add train and test accuracy. The ResNets
have BatchNorm in train mode and torchvision's blocks call one in-place ReLU
module twice: curvlib computes their MC and exact statistics by its autograd
backend (module hooks, no BackPACK), reads the empirical ones from the layers'
own output gradients, and the BatchNorm parameters take plain SGD steps.

``--data synthetic`` (default) is the seeded 10-class set of oriented gratings
of ``examples/data.py`` (3x32x32, no files needed); ``mnist``,
``fashion-mnist``, ``cifar10``, ``cifar100`` (100 classes) and ``svhn`` are read
from ``--data-root``, never downloaded.

Examples (from the repository root)::

    python examples/cnn.py                                   # KFAC, synthetic images
    python examples/cnn.py --compare kfac,kpsvd,adam
    python examples/cnn.py --model resnet-small --optim kfac
    python examples/cnn.py --data cifar10 --data-root ~/data --num-epochs 20

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

from common import RunResult, Task, UsageError, build_parser, resolve_device, run_experiment
from data import IMAGE_DATASETS, DataNotFoundError, load_images

CLASSIFICATION_DATA = tuple(d for d in IMAGE_DATASETS if d != "curves")
"""``--data`` choices: the labelled image sets."""


def kpsvd_cnn(
    in_channels: int, side: int, num_classes: int, channels: Sequence[int] = (32, 32, 64)
) -> nn.Sequential:
    """The small conv net: ``len(channels)`` stages of conv5x5 + ReLU + max-pool, two linears.

    Args:
        in_channels: Image channels ``C``.
        side: Image height and width (28 or 32).
        num_classes: Outputs (logits).
        channels: Output channels of the conv stages.

    Returns:
        A network mapping ``[N, C, side, side]`` images to ``[N, num_classes]`` logits.
    """
    layers: list[nn.Module] = []
    width = in_channels
    for out in channels:
        layers += [nn.Conv2d(width, out, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)]
        width, side = out, side // 2
    layers += [
        nn.Flatten(),
        nn.Linear(width * side * side, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    ]
    return nn.Sequential(*layers)


def resnet_small(
    in_channels: int, num_classes: int, widths: Sequence[int] = (16, 32, 64)
) -> nn.Module:
    """A CIFAR-style ResNet from torchvision's ``BasicBlock`` (one block per stage).

    The blocks are torchvision's own, with their reused in-place ReLU and in-place
    residual add, so this is what a torchvision ResNet asks of curvlib at a size
    that trains on a CPU.
    """
    from torchvision.models.resnet import BasicBlock

    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
    ]
    width = widths[0]
    for i, out in enumerate(widths):
        stride = 1 if i == 0 else 2
        down = None
        if stride != 1 or width != out:
            down = nn.Sequential(
                nn.Conv2d(width, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )
        layers.append(BasicBlock(width, out, stride=stride, downsample=down))
        width = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


def resnet18(in_channels: int, num_classes: int) -> nn.Module:
    """Torchvision's ``resnet18`` (first conv adapted to ``in_channels``)."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "kpsvd-cnn": lambda c, side, k: kpsvd_cnn(c, side, k),
    "resnet-small": lambda c, side, k: resnet_small(c, k),
    "resnet18": lambda c, side, k: resnet18(c, k),
}
"""``--model`` name to ``make(channels, side, num_classes)``."""


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
    group.add_argument("--model", choices=tuple(MODELS), default="kpsvd-cnn", help="network")
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
    make = MODELS[args.model]
    task = Task(
        make_model=lambda: make(channels, side, split.num_classes),
        loss_fn=nn.CrossEntropyLoss(),
        train_x=split.train_x.to(device),
        train_y=split.train_y.to(device),
        test_x=split.test_x.to(device),
        test_y=split.test_y.to(device),
        eval_batch=1_000,
        accuracy=True,
        train_eval=5_000,
    )
    print(
        f"{split.name}: {len(task.train_x)} train / {len(task.test_x)} test images "
        f"{channels}x{side}x{side}, {split.num_classes} classes, {args.model}"
    )
    try:
        return run_experiment(task, args, f"{split.name} {args.model}")
    except UsageError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


if __name__ == "__main__":
    main()
