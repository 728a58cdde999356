r"""Weight initialisations of the deep-autoencoder papers, for ``--init`` and ``--bias-init``.

========================  =================================================================
``--init``                weights of each ``nn.Linear`` / convolution
========================  =================================================================
``glorot`` (default)      Glorot-uniform with the activation's gain (the code and output
                          layers with gain 1): the examples' own choice
``xavier-uniform``        Glorot-uniform, gain 1 everywhere (``nn.init.xavier_uniform_``)
``xavier-normal``         Glorot-normal, gain 1 everywhere (``nn.init.xavier_normal_``)
``normal``                :math:`\mathcal N(0, \sigma^2)` with ``--init-std`` (0.01 by default)
``sparse``                Martens (2010): each unit gets exactly ``min(15, fan_in)`` nonzero
                          incoming weights drawn from :math:`\mathcal N(0, 1)`, the others zero
========================  =================================================================

Biases are set to ``--bias-init`` (0 by default; 0.01 in some published setups).
``examples/cnn.py`` offers the same schemes but ``glorot``, and by default keeps
the weights and biases torch or torchvision gives its networks.
"""

from __future__ import annotations

import torch
from torch import nn

WEIGHT_INITS = ("xavier-uniform", "xavier-normal", "normal", "sparse")
"""The schemes that draw new weights."""

INITS = ("glorot", *WEIGHT_INITS)
"""The names the autoencoder's ``--init`` accepts."""

SPARSE_CONNECTIONS = 15
"""Nonzero incoming weights per unit of Martens' (2010) sparse initialisation."""


def sparse_(weight: torch.Tensor, connections: int = SPARSE_CONNECTIONS) -> torch.Tensor:
    """Martens' sparse initialisation in place: ``min(connections, fan_in)`` N(0, 1) weights a unit.

    Args:
        weight: ``[out, in, ...]`` (a convolution's kernel counts ``in * kernel`` inputs).
        connections: Nonzero incoming weights per output unit.
    """
    with torch.no_grad():
        rows = weight.view(weight.shape[0], -1)
        keep = min(connections, rows.shape[1])
        order = torch.rand(rows.shape).argsort(dim=1)[:, :keep]
        rows.zero_()
        rows.scatter_(1, order, torch.randn(rows.shape[0], keep, dtype=rows.dtype))
    return weight


def initialise(
    model: nn.Module, scheme: str | None, *, bias: float | None = 0.0, std: float = 0.01
) -> None:
    """Re-initialise every ``nn.Linear`` and convolution of ``model`` in place.

    ``glorot`` and ``None`` keep the weights the model was built with (the
    autoencoder builds them Glorot-uniform) and only set the biases.

    Args:
        model: The network (call under the run's ``torch.manual_seed``).
        scheme: One of ``INITS``, or ``None`` to keep the weights.
        bias: Value of every bias, or ``None`` to keep the biases.
        std: Standard deviation of ``normal``.

    Raises:
        ValueError: For an unknown scheme or a negative ``std``.
    """
    if scheme is not None and scheme not in INITS:
        raise ValueError(f"Unknown initialisation {scheme!r}; choose from {INITS}.")
    if not std >= 0.0:
        raise ValueError(f"The standard deviation of --init normal must be >= 0, got {std}.")
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)
    for module in model.modules():
        if not isinstance(module, layers):
            continue
        if scheme == "xavier-uniform":
            nn.init.xavier_uniform_(module.weight)
        elif scheme == "xavier-normal":
            nn.init.xavier_normal_(module.weight)
        elif scheme == "normal":
            nn.init.normal_(module.weight, std=std)
        elif scheme == "sparse":
            sparse_(module.weight)
        if module.bias is not None and bias is not None:
            nn.init.constant_(module.bias, bias)
