r"""Exact generalised Gauss–Newton products on the last recorded batch.

The optimizer's adaptive learning rate and momentum
([`curvlib.optim.adaptive`][curvlib.optim.adaptive]) need the quadratic form
of the exact GGN of the batch loss $L$ on a few directions $d_i$ (per-layer
$[W \mid b]$ matrices, [`curvlib.core.conventions`][curvlib.core.conventions]):

$$\mathcal G_{ij} = d_i^\top J^\top H_L J\, d_j = (J d_i)^\top H_L (J d_j),$$

with $J$ the Jacobian of the network output on the batch with respect to the
curvature layers' parameters and $H_L$ the Hessian of the batch loss with
respect to that output (``LossCurvature.batch_hessian_form`` in
``curvlib.extract.losses``).
It is the curvature of $L$ exactly as the training loop computes it (``mean``
or ``sum`` included), so $\nabla L^\top d + \frac12 d^\top \mathcal G d$
predicts the change of that loss. Each $J d_i$ is one forward-mode pass
(``torch.func.jvp`` through ``functional_call``) on the inputs of the model's
last forward call inside a
[`capture()`][curvlib.extract.CurvatureExtractor.capture] block; no
$P \times P$ matrix is ever formed.

The forward pass is re-run in the model's current mode: train-mode
``BatchNorm`` uses the batch statistics without updating its running
estimates, and train-mode ``Dropout`` draws a fresh mask (the random state of
the training loop is restored afterwards, so the run's own draws do not change).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from curvlib.core.layout import ModelLayout
from curvlib.extract.losses import LossCurvature


@dataclass
class CapturedBatch:
    """The inputs of the model's and the loss module's last calls with gradients enabled.

    Attributes:
        args: Positional arguments of the model's forward call (tensors detached).
        kwargs: Keyword arguments of that call.
        target: The target the loss module received (``None`` before its call).
        output_shape: The shape of the loss module's first input.
    """

    args: tuple[Any, ...] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    target: Tensor | None = None
    output_shape: torch.Size | None = None


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, Tensor) else value


class ForwardCapture:
    """Keeps what one forward pass needs to be re-run: the model's and the loss's inputs.

    Args:
        model: The network.
        loss_fn: The loss module the training loop calls.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.batch: CapturedBatch | None = None

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record the inputs of the calls in this block (the last ones win); cheap."""
        batch = CapturedBatch()

        def model_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if torch.is_grad_enabled():
                batch.args = tuple(_detached(a) for a in args)
                batch.kwargs = {k: _detached(v) for k, v in kwargs.items()}

        def loss_hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            if torch.is_grad_enabled():
                batch.output_shape = inputs[0].shape
                batch.target = inputs[1].detach()

        handles = [
            self.model.register_forward_pre_hook(model_hook, with_kwargs=True),
            self.loss_fn.register_forward_pre_hook(loss_hook),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self.batch = batch

    def last(self) -> CapturedBatch:
        """The captured batch.

        Raises:
            RuntimeError: Without a completed block that called the model and the loss.
        """
        batch = self.batch
        if batch is None or batch.args is None or batch.target is None:
            raise RuntimeError(
                "No captured batch: the exact curvature products need the forward pass "
                "`loss_fn(model(x), y)` inside `with opt.record():` on every step."
            )
        return batch


@contextmanager
def _frozen_batchnorm(model: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm uses batch statistics without updating its running estimates."""
    changed = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


def _parameter_name(layer: str, param: str) -> str:
    return f"{layer}.{param}" if layer else param


def ggn_gram(
    model: nn.Module,
    layout: ModelLayout,
    loss: LossCurvature,
    batch: CapturedBatch,
    directions: Sequence[Mapping[str, Tensor]],
    fraction: float = 1.0,
) -> Tensor:
    r"""The Gram matrix $[d_i^\top J^\top H_L J d_j]_{ij}$ of the exact batch-loss GGN.

    Args:
        model: The network (its current parameters are the linearisation point).
        layout: Its curvature layers.
        loss: The loss module's curvature.
        batch: The inputs of the last captured forward pass.
        directions: Per-layer $[W \mid b]$ matrices keyed by layer name; a layer
            missing from a direction is zero there.
        fraction: Estimate the products from the first $\lceil fN\rceil$ samples of
            the batch (every tensor argument whose leading dimension is the
            target's $N$ is cut, and a ``sum`` loss is scaled by $N/m$), which
            cuts the cost of the Jacobian-vector products by $1/f$.

    Returns:
        ``[k, k]`` for ``k`` directions, in the dtype of the model output.

    Raises:
        ValueError: For an unknown layer name, or when the re-run model output
            does not have the shape the loss module received.
    """
    names = sorted({name for d in directions for name in d}, key=layout.names.index)
    unknown = set(names) - set(layout.names)
    if unknown:
        raise ValueError(f"Unknown curvature layers {sorted(unknown)}; have {layout.names}.")
    primals: dict[str, Tensor] = {}
    for name in names:
        layer = layout[name]
        for param, value in zip(("weight", "bias"), layer.parameters, strict=False):
            primals[_parameter_name(name, param)] = value.detach()
    assert batch.args is not None and batch.target is not None
    batch, scale = _sub_batch(batch, fraction)

    def forward(params: dict[str, Tensor]) -> Tensor:
        out = functional_call(model, params, batch.args, batch.kwargs)
        if not isinstance(out, Tensor):
            raise ValueError(
                f"The model returned {type(out).__name__}: the exact curvature products need "
                "a model whose output tensor goes into the loss module."
            )
        return out

    devices = [p.device for p in primals.values() if p.device.type == "cuda"]
    outputs: list[Tensor] = []
    tangents_out: list[Tensor] = []
    with (
        warnings.catch_warnings(),
        torch.random.fork_rng(devices=sorted({d.index or 0 for d in devices})),
        _frozen_batchnorm(model),
    ):
        # torch.func scripts a decomposition internally on first use.
        warnings.filterwarnings("ignore", message=".*torch.jit.script", category=FutureWarning)
        for direction in directions:
            tangents: dict[str, Tensor] = {}
            for name in names:
                layer = layout[name]
                matrix = direction.get(name)
                if matrix is None:
                    matrix = layer.weight.new_zeros(layer.out_dim, layer.in_dim_aug)
                parts = layer.from_matrix(matrix)
                for param, value, part in zip(
                    ("weight", "bias"), layer.parameters, parts, strict=False
                ):
                    assert part is not None
                    tangents[_parameter_name(name, param)] = part.to(value).contiguous()
            result = jvp(forward, (primals,), (tangents,))
            outputs.append(result[0])
            tangents_out.append(result[1])
    output = outputs[0]
    if batch.output_shape is not None and output.shape != batch.output_shape:
        raise ValueError(
            f"The model output has shape {tuple(output.shape)} but the loss module received "
            f"{tuple(batch.output_shape)}: the exact curvature products need "
            "`loss_fn(model(x), y)` with the model output passed to the loss unchanged."
        )
    k = len(directions)
    target = batch.target
    assert target is not None
    gram = output.new_zeros(k, k)
    for i in range(k):
        for j in range(i, k):
            entry = loss.batch_hessian_form(output, target, tangents_out[i], tangents_out[j])
            gram[i, j] = gram[j, i] = entry
    return gram * scale if loss.loss_fn.reduction == "sum" else gram


def _sub_batch(batch: CapturedBatch, fraction: float) -> tuple[CapturedBatch, float]:
    """The first ``ceil(fraction * N)`` samples, and ``N / m``, the factor a ``sum`` loss needs."""
    assert batch.args is not None and batch.target is not None
    n = batch.target.shape[0] if batch.target.dim() else 0
    m = math.ceil(fraction * n)
    if fraction >= 1.0 or n == 0 or m >= n:
        return batch, 1.0

    def cut(value: Any) -> Any:
        return value[:m] if isinstance(value, Tensor) and value.dim() and len(value) == n else value

    shape = batch.output_shape
    sub = CapturedBatch(
        args=tuple(cut(a) for a in batch.args),
        kwargs={k: cut(v) for k, v in batch.kwargs.items()},
        target=batch.target[:m],
        output_shape=None if shape is None or shape[0] != n else torch.Size((m, *shape[1:])),
    )
    return sub, n / m
