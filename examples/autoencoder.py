"""Deep autoencoders of Hinton & Salakhutdinov (2006) trained with curvlib's optimizers.

The benchmark of the K-FAC and KPSVD papers: reconstruct the input through a
narrow linear code layer.

========================  ========================================  =====================
``--data``                encoder (the decoder mirrors it)          loss
========================  ========================================  =====================
``curves`` (default)      784-400-200-100-50-25-6                   ``BCEWithLogitsLoss``
``mnist``                 784-1000-500-250-30                       ``BCEWithLogitsLoss``
``faces``                 625-2000-1000-500-30                      ``MSELoss``
``faces-synthetic``       625-2000-1000-500-30 (stand-in data)      ``MSELoss``
========================  ========================================  =====================

Hidden units are ``tanh`` by default (``--activation sigmoid`` gives the logistic
units of the original paper, ``relu`` is also available); the code layer and the
output layer are linear (the output layer gives Bernoulli logits for the
binary-cross-entropy data sets), weights are Glorot-uniform with the
activation's gain and biases zero (``--init`` and ``--bias-init`` choose the
papers' initialisations: sparse, normal, Xavier uniform or normal; see
``examples/initialisation.py``). The KPSVD papers' code builds the same widths
with ReLU units, a ReLU after the code layer and a sigmoid output trained with
``nn.BCELoss`` on probabilities: ``--activation relu --code-activation relu
--output probabilities`` (its initialisation: ``--init xavier-uniform
--bias-init 0.01``). CURVES is generated offline from ``--seed``
(no files needed), or read from the published ``digs3pts_1.mat`` with
``--curves-path``; MNIST is read from ``--data-root`` (``--mnist-split 50k-10k``:
the papers' split, the first 50,000 training images for training and the last
10,000 for evaluation) and FACES from ``--faces-path``, never downloaded.

Examples (from the repository root)::

    python examples/autoencoder.py                                # KFAC on CURVES
    python examples/autoencoder.py --compare kfac,adam            # KFAC against Adam
    python examples/autoencoder.py --compare kfac,adam:3e-4,adam:1e-3,adam:3e-3
    python examples/autoencoder.py --grid lr=0.03,0.1,0.3 damping=1e-4,1e-3  # 6 KFAC runs
    python examples/autoencoder.py --optim kpsvd --out runs/kpsvd
    python examples/autoencoder.py --num-epochs 20 --resume       # 10 more epochs
    python examples/autoencoder.py --data mnist --data-root ~/data --batch-size 1000
    python examples/autoencoder.py --data mnist --data-root ~/data --mnist-split 50k-10k
    python examples/autoencoder.py --curves-path ~/data/digs3pts_1.mat  # published CURVES
    python examples/autoencoder.py --activation relu --code-activation relu --output probabilities
    torchrun --nproc_per_node=2 examples/autoencoder.py --device cpu   # 2 ranks, gloo

Outputs in ``--out``: ``metrics.csv``, ``metrics.json``, ``iterations.csv`` (loss
and cumulative time at every step), ``loss.png``,
``checkpoint.pt`` and ``summary.json``; with ``--compare`` one subdirectory per
optimizer and ``compare.png``; with ``--grid`` one subdirectory per run, ``grid.csv``
and ``grid.png`` (the best run, of the lowest final training loss, marked).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    RunResult,
    Task,
    UsageError,
    build_parser,
    log,
    resolve_device,
    run_experiment,
)
from data import DATASETS, MNIST_SPLITS, DataNotFoundError, check_finite, load_data
from initialisation import INITS, initialise

ARCHITECTURES: dict[str, tuple[int, ...]] = {
    "curves": (784, 400, 200, 100, 50, 25, 6),
    "mnist": (784, 1000, 500, 250, 30),
    "faces": (625, 2000, 1000, 500, 30),
    "faces-synthetic": (625, 2000, 1000, 500, 30),
}
"""Encoder widths per data set, input first, code layer last."""

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU}

CODE_ACTIVATIONS = ("linear", *ACTIVATIONS)
"""``--code-activation``: the code layer's nonlinearity (none by default)."""


def autoencoder(
    widths: Sequence[int],
    activation: str = "tanh",
    *,
    code_activation: str = "linear",
    sigmoid_output: bool = False,
) -> nn.Sequential:
    """The encoder ``widths`` followed by its mirror image as the decoder.

    Every hidden layer is followed by ``activation``, the code layer (the last
    encoder layer) by ``code_activation``; the output layer is linear (logits), or
    followed by a sigmoid (probabilities, for ``nn.BCELoss``). Weights are
    Glorot-uniform with the gain of the nonlinearity that follows (1 for none and
    for the sigmoid output), biases zero.

    Args:
        widths: Layer widths from the input to the code, e.g. ``(784, 1000, 500, 250, 30)``.
        activation: A key of ``ACTIVATIONS``.
        code_activation: ``linear`` or a key of ``ACTIVATIONS``.
        sigmoid_output: End with ``nn.Sigmoid``.
    """
    if len(widths) < 2:
        raise ValueError(f"An autoencoder needs an input and a code width, got {widths!r}.")
    if code_activation not in CODE_ACTIVATIONS:
        raise ValueError(
            f"Unknown code activation {code_activation!r}; choose from {CODE_ACTIVATIONS}."
        )
    dims = [*widths, *reversed(widths[:-1])]
    code = len(widths) - 2
    last = len(dims) - 2
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(dims)):
        after = None if i == last else code_activation if i == code else activation
        if after == "linear":
            after = None
        gain = 1.0 if after is None else nn.init.calculate_gain(after)  # type: ignore[arg-type]
        linear = nn.Linear(fan_in, fan_out)
        nn.init.xavier_uniform_(linear.weight, gain=gain)
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if after is not None:
            layers.append(ACTIVATIONS[after]())
    if sigmoid_output:
        layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


OUTPUTS = ("logits", "probabilities")
"""``--output``: a linear output layer, or one followed by a sigmoid."""


def loss_for(data: str, output: str = "logits") -> nn.Module:
    """Bernoulli likelihood for pixel intensities in [0, 1], Gaussian for FACES.

    ``output="probabilities"`` (a sigmoid output layer, the papers' code) takes
    ``nn.BCELoss``, ``logits`` takes ``nn.BCEWithLogitsLoss``: the same loss of the
    same network, computed from the sigmoid's output or its input.
    """
    if data.startswith("faces"):
        if output != "logits":
            raise ValueError(
                "--output probabilities is for pixel intensities in [0, 1] (--data curves or "
                "mnist); FACES trains a linear output with MSELoss."
            )
        return nn.MSELoss()
    return nn.BCELoss() if output == "probabilities" else nn.BCEWithLogitsLoss()


def build_argparser() -> argparse.ArgumentParser:
    """The common flags of ``examples/cli.py`` plus the data and model flags."""
    parser = build_parser(
        (__doc__ or "").splitlines()[0],
        epilog="Defaults train KFAC on 20,000 generated CURVES images for 10 epochs "
        "(a few minutes on 2 CPU cores).",
        out=Path("runs/autoencoder"),
    )
    group = parser.add_argument_group("data and model")
    group.add_argument(
        "--data", choices=DATASETS, default="curves", help="data set and its architecture"
    )
    group.add_argument(
        "--faces-path",
        type=Path,
        default=None,
        help="FACES file for --data faces: .npy [N, 625] or .mat with one such array",
    )
    group.add_argument(
        "--curves-path",
        type=Path,
        default=None,
        help="read --data curves from the published digs3pts_1.mat instead of generating it",
    )
    group.add_argument(
        "--mnist-split", choices=MNIST_SPLITS, default="test",
        help="--data mnist: the official test set, or 50k-10k (train on the first 50,000 "
        "training images, evaluate on the last 10,000)",
    )  # fmt: skip
    group.add_argument(
        "--activation", choices=tuple(ACTIVATIONS), default="tanh", help="hidden units"
    )
    group.add_argument(
        "--code-activation",
        choices=CODE_ACTIVATIONS,
        default="linear",
        help="nonlinearity of the code layer (relu in the KPSVD papers' code)",
    )
    group.add_argument(
        "--output",
        choices=OUTPUTS,
        default="logits",
        help="logits: linear output and BCEWithLogitsLoss; probabilities: a sigmoid output "
        "and nn.BCELoss, as the KPSVD papers' code (curves and mnist)",
    )
    group.add_argument(
        "--init", choices=INITS, default="glorot",
        help="weight initialisation (see examples/initialisation.py; sparse: Martens 2010)",
    )  # fmt: skip
    group.add_argument(
        "--init-std", type=float, default=0.01, help="standard deviation of --init normal"
    )
    group.add_argument("--bias-init", type=float, default=0.0, help="value of every bias")
    return parser


def make_autoencoder(args: argparse.Namespace) -> nn.Sequential:
    """The data set's autoencoder, initialised as ``--init`` and ``--bias-init`` say."""
    model = autoencoder(
        ARCHITECTURES[args.data],
        args.activation,
        code_activation=args.code_activation,
        sigmoid_output=args.output == "probabilities",
    )
    initialise(model, args.init, bias=args.bias_init, std=args.init_std)
    return model


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
    """Parse ``argv`` (default ``sys.argv``), train and return the runs' results."""
    parser = build_argparser()
    args = parser.parse_args(argv)
    if args.curves_path is not None and args.data != "curves":
        parser.exit(2, f"{parser.prog}: error: --curves-path applies to --data curves only\n")
    if args.mnist_split != "test" and args.data != "mnist":
        parser.exit(2, f"{parser.prog}: error: --mnist-split applies to --data mnist only\n")
    try:
        device = resolve_device(args.device)
        split = load_data(
            args.data,
            num_train=args.num_train,
            num_test=args.num_test,
            seed=args.seed,
            data_root=args.data_root,
            faces_path=args.faces_path,
            curves_path=args.curves_path,
            mnist_split=args.mnist_split,
        )
        check_finite(split)
    except (DataNotFoundError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    widths = ARCHITECTURES[args.data]
    if not args.init_std >= 0.0:
        parser.exit(2, f"{parser.prog}: error: --init-std must be >= 0, got {args.init_std}\n")
    try:
        loss_fn = loss_for(args.data, args.output)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    train, test = split.train.to(device), split.test.to(device)
    task = Task(
        make_model=lambda: make_autoencoder(args),
        loss_fn=loss_fn,
        train_x=train,
        train_y=train,
        test_x=test,
        test_y=test,
    )
    arch = "-".join(map(str, [*widths, *reversed(widths[:-1])]))
    log(  # rank 0 only under torchrun
        f"{split.name}: {len(train)} train / {len(test)} test images, autoencoder {arch} "
        f"({args.activation}, {args.code_activation} code, {args.init} init), "
        f"{type(task.loss_fn).__name__}"
    )
    try:
        return run_experiment(task, args, f"{split.name} autoencoder")
    except UsageError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


if __name__ == "__main__":
    main()
