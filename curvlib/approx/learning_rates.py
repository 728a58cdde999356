r"""The learning rates at which the undamped function-space forms reach the targets.

[`optimal_learning_rate`][curvlib.approx.learning_rates.optimal_learning_rate]
gives, for each [`FunctionSpaceForm`][curvlib.approx.wide.FunctionSpaceForm],
the learning rate $\eta = 1/\alpha$ at which the undamped step of
[`function_space_direction`][curvlib.approx.wide.function_space_direction]
moves the outputs of the linearised network by exactly the residual, when the
change of the outputs is $\alpha r$. The wide-network page of the
documentation derives each value, states its conditions, and compares it with
Karakida & Osawa (NeurIPS 2020).
"""

from __future__ import annotations

import torch

from curvlib.approx.wide import FunctionSpaceForm
from curvlib.linalg.tridiagonal import pattern_is_singular, pattern_matrix


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}.")
    return value


def optimal_learning_rate(
    form: FunctionSpaceForm | str,
    num_layers: int = 1,
    num_samples: int | None = None,
    *,
    width: int | None = None,
    active_fraction: float = 1.0,
    num_outputs: int = 1,
) -> float:
    r"""The learning rate at which a form's undamped step reaches the targets of the linearised net.

    With kernels that are non-singular, the change of the outputs
    $U\Delta\theta$ is $r$ times a constant $\alpha$ (an isotropic step in
    function space), so $\eta = 1/\alpha$ removes the residual of the
    linearised network in one step:

    * ``EXACT``: $U U^\top\Theta^{-1} r = r$, $\eta = 1$;
    * ``BLOCK_DIAGONAL``: $\sum_l \Theta_l\Theta_l^{-1} r = L\,r$, $\eta = 1/L$;
    * ``BLOCK_TRIDIAGONAL``: with $d_l = \Theta_l y_l$ the system reads
      $(T\otimes I)d = \mathbf 1\otimes r$, so $d = (T^{-1}\mathbf 1)\otimes r$ and
      $\sum_l d_l = (\mathbf 1^\top T^{-1}\mathbf 1)\,r$: $\eta =
      1/(\mathbf 1^\top T^{-1}\mathbf 1)$ (1 for $L = 1, 3$; 1/2 for $L = 4$);
    * ``KFAC`` (undamped, pseudo-inverses): layer $l$ moves the outputs by
      $N\,[P_{\Gamma_l} R\, P_{\bar A_l}]_{kn,n}$ with the projectors $P$ onto the
      ranges of the two kernels and $R_{kn,n'} = r_{kn}\delta_{nn'}$: $N r$ for a
      layer with regular kernels, and $r$ for a last linear layer under a loss
      whose Hessian is the same for every sample (``MSELoss``: its output
      gradients do not depend on $n$, so $P_\Gamma$ averages over the
      samples). $\eta = 1/(N(L - 1) + 1)$. The authors' code uses
      $1/(NL)$, which counts the last layer like a hidden one (see the
      wide-network page);
    * ``UNIT_WISE`` (undamped, pseudo-inverses): unit $o$ moves the outputs of
      sample $n$ by the projection of $r_n$ onto its output gradient
      $g_{\cdot no}\in\mathbb R^K$; the $K$ units of the last linear layer
      together move them by $r$, and a hidden unit with a zero derivative on
      sample $n$ (an inactive ReLU) does not move it. With one output
      ($K = 1$) $\alpha_n = 1 + (\text{hidden units active on sample } n)$,
      about $\gamma(L - 1)M + 1$ for $L - 1$ hidden layers of width $M$ of
      which a fraction $\gamma$ is active (``active_fraction``: 1 for
      ``tanh``, exactly; about 1/2 for ReLU at a symmetric initialisation):
      $\eta = 1/(\gamma(L - 1)M + 1)$, the paper's $1/(\gamma(L-1)M)$ with the
      last layer counted. With $K$ outputs the projections of a hidden layer
      add up to about $(\text{active units}/K)\,I$ on a wide network of
      Gaussian weights, and $\eta = 1/(\gamma(L - 1)M/K + 1)$.

    These hold at any width for the linearised model; for a wide network the
    linearisation is accurate over one step (Karakida & Osawa 2020, where the
    same values come out of the infinite-width limit). The unit-wise value is
    exact for ``tanh`` units and one output; with ReLU units or several
    outputs it is the width-$M$ average of a per-sample factor.

    The ``KFAC`` and ``UNIT_WISE`` values assume every input kernel
    $\bar A_l\bar A_l^\top$ regular (inputs of dimension at least $N - 1$,
    with the bias; hidden widths of at least $N$), for ``KFAC`` hidden widths
    of at least $KN$ and a constant loss Hessian (``MSELoss``); they are
    checked on wide networks by the tests, not theorems for other losses.

    Args:
        form: The function-space form.
        num_layers: $L$, the number of curvature layers.
        num_samples: $N$, the batch size (needed for ``KFAC`` only).
        width: $M$, the width of the hidden layers (needed for ``UNIT_WISE``
            only).
        active_fraction: $\gamma \in (0, 1]$, the fraction of hidden units
            whose activation derivative is non-zero on a sample (``UNIT_WISE``).
        num_outputs: $K$, the network's outputs per sample (``UNIT_WISE``).

    Raises:
        ValueError: If ``num_layers`` (or what the form needs: ``num_samples``
            for ``KFAC``; ``width``, ``active_fraction`` and ``num_outputs`` for
            ``UNIT_WISE``) is not valid, or for ``BLOCK_TRIDIAGONAL`` with
            $L + 1$ a multiple of 3 ($T$ singular: the undamped step does not
            exist).

    Example:
        >>> optimal_learning_rate("block_diagonal", num_layers=4)
        0.25
        >>> round(1 / optimal_learning_rate("unit_wise", 3, width=1024, active_fraction=0.5))
        1025
    """
    form = FunctionSpaceForm(form)
    num_layers = _positive_int(num_layers, "num_layers")
    if form is FunctionSpaceForm.EXACT:
        return 1.0
    if form is FunctionSpaceForm.BLOCK_DIAGONAL:
        return 1.0 / num_layers
    if form is FunctionSpaceForm.KFAC:
        if num_samples is None:
            raise ValueError("The KFAC learning rate needs num_samples, the batch size N.")
        n = _positive_int(num_samples, "num_samples")
        return 1.0 / (n * (num_layers - 1) + 1)
    if form is FunctionSpaceForm.UNIT_WISE:
        if width is None:
            raise ValueError("The UNIT_WISE learning rate needs width, the hidden layers' M.")
        m = _positive_int(width, "width")
        k = _positive_int(num_outputs, "num_outputs")
        if not 0.0 < active_fraction <= 1.0:
            raise ValueError(f"active_fraction must be in (0, 1], got {active_fraction!r}.")
        return 1.0 / (active_fraction * (num_layers - 1) * m / k + 1)
    if pattern_is_singular(num_layers):
        raise ValueError(
            f"With L = {num_layers} layers the tridiagonal pattern T is singular (L + 1 is a "
            "multiple of 3): the undamped block-tridiagonal step does not exist. Use damping > 0 "
            "(and a learning rate found by search) or another form."
        )
    pattern = pattern_matrix(num_layers)
    ones = torch.ones(num_layers, dtype=torch.float64)
    return 1.0 / float(ones @ torch.linalg.solve(pattern, ones))
