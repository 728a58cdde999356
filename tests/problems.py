"""Small typed test problems: a model factory, a loss module and one batch of data.

Every problem is float64 and deterministic: ``problem.model()`` builds a fresh
network with the same initial parameters each time, in the problem's mode
(``train=False`` puts the whole network in eval mode). ``backpack`` says
whether the BackPACK backend can handle the network as built (every module
has BackPACK derivatives and no ``BatchNorm`` runs in train mode).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

DTYPE = torch.float64


@dataclass(frozen=True)
class Problem:
    """One model, loss and batch.

    Attributes:
        name: Identifier used in test ids.
        make_model: Builds the un-seeded network (``Problem.model`` seeds it).
        loss_fn: The loss module.
        x: Input batch.
        y: Targets.
        train: Whether the model runs in train mode (else ``model.eval()``).
        backpack: Whether ``Backend.BACKPACK`` applies to this network.
        seed: Seed of the parameter initialisation.
    """

    name: str
    make_model: Callable[[], nn.Module] = field(repr=False)
    loss_fn: nn.Module
    x: Tensor = field(repr=False)
    y: Tensor = field(repr=False)
    train: bool = False
    backpack: bool = True
    seed: int = 0

    @property
    def n(self) -> int:
        """Batch size."""
        return int(self.x.shape[0])

    @property
    def entries(self) -> int:
        """``D``: the entries a ``mean`` averages within one sample (positions for CE)."""
        return math.prod(self.y.shape[1:])

    def model(self) -> nn.Module:
        """A fresh float64 network with the problem's fixed initial parameters."""
        torch.manual_seed(self.seed)
        model = self.make_model().to(DTYPE)
        _randomise_normalisation(model)
        model.train(self.train)
        return model

    def with_loss(self, loss_fn: nn.Module, y: Tensor | None = None) -> Problem:
        """The same problem with another loss module (e.g. another reduction)."""
        return Problem(
            name=f"{self.name}[{type(loss_fn).__name__}:{loss_fn.reduction}]",
            make_model=self.make_model,
            loss_fn=loss_fn,
            x=self.x,
            y=self.y if y is None else y,
            train=self.train,
            backpack=self.backpack,
            seed=self.seed,
        )

    def subset(self, rows: list[int] | Tensor) -> Problem:
        """The same problem restricted to some rows of the batch."""
        return Problem(
            name=f"{self.name}[subset]",
            make_model=self.make_model,
            loss_fn=self.loss_fn,
            x=self.x[rows],
            y=self.y[rows],
            train=self.train,
            backpack=self.backpack,
            seed=self.seed,
        )


def _randomise_normalisation(model: nn.Module) -> None:
    """Give BatchNorm layers non-trivial affine parameters and running statistics."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.3)
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 1.5)


def _data(seed: int, *shape: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=DTYPE)


def _classes(seed: int, num_classes: int, *shape: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(num_classes, shape, generator=gen)


def _soft(seed: int, *shape: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=gen, dtype=DTYPE)


def _mlp(out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, out))


def mlp_ce(n: int = 6) -> Problem:
    """Linear-Tanh-Linear-ReLU-Linear with cross-entropy over 3 classes."""
    return Problem("mlp_ce", _mlp, nn.CrossEntropyLoss(), _data(1, n, 6), _classes(2, 3, n))


def mlp_mse(reduction: str = "mean", n: int = 6) -> Problem:
    """The MLP with a squared error on 3 outputs."""
    return Problem(
        f"mlp_mse_{reduction}",
        _mlp,
        nn.MSELoss(reduction=reduction),
        _data(1, n, 6),
        _data(3, n, 3),
    )


def _autoencoder() -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 12))


def autoencoder_bce(n: int = 5) -> Problem:
    """A small MLP autoencoder, BCE-with-logits on 12 outputs and soft targets."""
    return Problem(
        "autoencoder_bce", _autoencoder, nn.BCEWithLogitsLoss(), _data(4, n, 12), _soft(5, n, 12)
    )


def autoencoder_sigmoid_bce(n: int = 5) -> Problem:
    """The same autoencoder ending in a sigmoid: ``BCELoss`` on 12 probabilities."""

    def make() -> nn.Module:
        return nn.Sequential(*_autoencoder(), nn.Sigmoid())

    return Problem("autoencoder_sigmoid_bce", make, nn.BCELoss(), _data(4, n, 12), _soft(5, n, 12))


def cnn_ce(n: int = 4, pool: type[nn.Module] = nn.MaxPool2d) -> Problem:
    """Conv2d(stride 2, padding 1)-ReLU-pool-Flatten-Linear with cross-entropy."""

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1),  # 7x7 -> 4x4
            nn.ReLU(),
            pool(2),  # -> 2x2
            nn.Flatten(),
            nn.Linear(12, 4),
        )

    return Problem(
        f"cnn_ce_{pool.__name__}",
        make,
        nn.CrossEntropyLoss(),
        _data(6, n, 2, 7, 7),
        _classes(7, 4, n),
    )


def segmentation_ce(n: int = 3) -> Problem:
    """A fully convolutional net, cross-entropy per pixel (``D`` = 9 positions)."""

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(3, 4, 2, dilation=2, bias=False),  # 5x5 -> 3x3
        )

    return Problem(
        "segmentation_ce",
        make,
        nn.CrossEntropyLoss(),
        _data(8, n, 2, 5, 5),
        _classes(9, 4, n, 3, 3),
    )


def tconv_bce(n: int = 3) -> Problem:
    """Purely convolutional decoder: ConvTranspose2d(stride 2) twice, BCE on images."""

    def make() -> nn.Module:
        return nn.Sequential(
            nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1),  # 3x3 -> 6x6
            nn.Tanh(),
            nn.ConvTranspose2d(3, 2, 2, stride=1, padding=1, bias=False),  # 6x6 -> 5x5
        )

    return Problem(
        "tconv_bce",
        make,
        nn.BCEWithLogitsLoss(),
        _data(10, n, 2, 3, 3),
        _soft(11, n, 2, 5, 5),
    )


def tconv_unflatten_bce(n: int = 3) -> Problem:
    """Linear-Unflatten-ConvTranspose2d-Sigmoid-ConvTranspose2d; BackPACK lacks Unflatten."""

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Linear(4, 8),
            nn.Unflatten(1, (2, 2, 2)),
            nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1),  # -> 4x4
            nn.Sigmoid(),
            nn.ConvTranspose2d(3, 1, 3, stride=2, padding=1, output_padding=1),  # -> 8x8
        )

    return Problem(
        "tconv_unflatten_bce",
        make,
        nn.BCEWithLogitsLoss(),
        _data(12, n, 4),
        _soft(13, n, 1, 8, 8),
        backpack=False,
    )


def _bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ELU(),
        nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.BatchNorm1d(5),
        nn.LeakyReLU(0.1),
        nn.Linear(5, 3),
    )


def bn_net(train: bool, n: int = 5) -> Problem:
    """Conv-BatchNorm2d-ELU-Dropout-Flatten-Linear-BatchNorm1d-LeakyReLU-Linear, CE.

    In train mode the samples are coupled by the batch statistics (and Dropout
    draws a mask), so only the autograd backend applies.
    """
    return Problem(
        f"bn_net_{'train' if train else 'eval'}",
        _bn_net,
        nn.CrossEntropyLoss(),
        _data(14, n, 2, 4, 4),
        _classes(15, 3, n),
        train=train,
        backpack=not train,
    )


def deep_linear_mse() -> Problem:
    """A deep linear network (no activations), MSE on 3 outputs, one datum."""

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 4), nn.Linear(4, 3))

    return Problem("deep_linear_mse", make, nn.MSELoss(), _data(16, 1, 4), _data(17, 1, 3))


def conv_single_position(n: int = 1) -> Problem:
    """Conv2d whose kernel covers the whole input: one output position."""

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(2, 4, 3),  # 3x3 -> 1x1
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(4, 3),
        )

    return Problem(
        "conv_single_position",
        make,
        nn.CrossEntropyLoss(),
        _data(18, n, 2, 3, 3),
        _classes(19, 3, n),
    )
