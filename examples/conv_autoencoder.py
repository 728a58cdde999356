"""A convolutional autoencoder (strided convs, transposed-conv decoder) with curvlib.

Encoder: ``Conv2d(C, 16, 4, stride 2)`` + ReLU, ``Conv2d(16, 32, 4, stride 2)`` +
ReLU, a linear code layer of ``--code`` units; decoder: linear + ReLU back to
``32 x side/4 x side/4``, ``ConvTranspose2d(32, 16, 4, stride 2)`` + ReLU and
``ConvTranspose2d(16, C, 4, stride 2)`` giving Bernoulli logits of every pixel
(``BCEWithLogitsLoss``). Every ``--optim`` works: all of curvlib's
approximations support ``ConvTranspose2d``, whose kernel is stored as
``(C_in, C_out, kh, kw)`` (curvlib transposes it to ``[W | b]``).

``--data curves`` (default) is generated offline (1x28x28); ``synthetic``,
``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100`` and ``svhn`` are the image sets of
``examples/data.py`` (labels unused).

Examples (from the repository root)::

    python examples/conv_autoencoder.py                       # KFAC on CURVES
    python examples/conv_autoencoder.py --compare kfac,kpsvd,adam
    python examples/conv_autoencoder.py --optim deflation --num-epochs 3

Outputs in ``--out``: ``metrics.csv``, ``metrics.json``, ``iterations.csv`` (loss
and cumulative time at every step), ``loss.png``,
``telemetry.png`` (curvlib optimizers), ``checkpoint.pt``, ``summary.json`` and
``reconstructions.png`` (test images above their reconstructions).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    RunResult,
    Task,
    UsageError,
    build_parser,
    log,
    main_process,
    positive_int,
    resolve_device,
    run_experiment,
)
from data import IMAGE_DATASETS, DataNotFoundError, load_images


def conv_autoencoder(channels: int, side: int, code: int = 16) -> nn.Sequential:
    """The convolutional autoencoder of ``[N, channels, side, side]`` images.

    Args:
        channels: Image channels ``C``.
        side: Image height and width, a multiple of 4.
        code: Width of the linear code layer.

    Returns:
        A network mapping images to logits of the same shape.

    Raises:
        ValueError: If ``side`` is not a multiple of 4.
    """
    if side % 4:
        raise ValueError(f"The image side must be a multiple of 4, got {side}.")
    inner = side // 4
    return nn.Sequential(
        nn.Conv2d(channels, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * inner * inner, code),
        nn.Linear(code, 32 * inner * inner),
        nn.ReLU(),
        nn.Unflatten(1, (32, inner, inner)),
        nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(16, channels, 4, stride=2, padding=1),
    )


def save_reconstructions(model: nn.Module, images: torch.Tensor, path: Path) -> None:
    """A grid of ``images`` (top row) above their reconstructions (bottom row)."""
    from torchvision.utils import save_image

    was_training = model.training
    model.eval()
    with torch.no_grad():
        recon = torch.sigmoid(model(images))
    model.train(was_training)
    save_image(torch.cat([images, recon]).cpu(), path, nrow=len(images))


def build_argparser() -> argparse.ArgumentParser:
    """The common flags of ``examples/cli.py`` plus the data and model flags."""
    parser = build_parser(
        (__doc__ or "").splitlines()[0],
        epilog="Defaults train KFAC on 10,000 generated CURVES images for 5 epochs.",
        out=Path("runs/conv_autoencoder"),
        batch_size=250,
        num_epochs=5,
    )
    group = parser.add_argument_group("data and model")
    group.add_argument(
        "--data",
        choices=IMAGE_DATASETS,
        default="curves",
        help="images (curves and synthetic are generated offline)",
    )
    group.add_argument("--code", type=positive_int, default=16, help="code layer width")
    return parser


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
    """Parse ``argv`` (default ``sys.argv``), train and return the runs' results."""
    parser = build_argparser()
    args = parser.parse_args(argv)
    generated = args.data in ("curves", "synthetic")
    try:
        device = resolve_device(args.device)
        split = load_images(
            args.data,
            num_train=10_000 if generated and args.num_train is None else args.num_train,
            num_test=2_000 if generated and args.num_test is None else args.num_test,
            seed=args.seed,
            data_root=args.data_root,
            offline="--data curves (generated offline, the default)",
        )
    except (DataNotFoundError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    channels, side, _ = split.image_shape
    train, test = split.train_x.to(device), split.test_x.to(device)
    task = Task(
        make_model=lambda: conv_autoencoder(channels, side, args.code),
        loss_fn=nn.BCEWithLogitsLoss(),
        train_x=train,
        train_y=train,
        test_x=test,
        test_y=test,
        eval_batch=1_000,
    )
    log(  # rank 0 only under torchrun
        f"{split.name}: {len(train)} train / {len(test)} test images {channels}x{side}x{side}, "
        f"conv autoencoder (code {args.code}), BCEWithLogitsLoss"
    )
    try:
        results = run_experiment(task, args, f"{split.name} conv autoencoder")
    except UsageError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if not main_process():  # under torchrun, rank 0 wrote the checkpoint and draws
        return results
    # Reconstructions by the last run's final weights (from its checkpoint).
    last = results[-1]
    model = task.make_model().to(device)
    ckpt = torch.load(last.out / "checkpoint.pt", map_location=device, weights_only=True)
    model.load_state_dict(ckpt["model"])
    save_reconstructions(model, test[:8], last.out / "reconstructions.png")
    return results


if __name__ == "__main__":
    main()
