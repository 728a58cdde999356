"""The autograd backend: module hooks and a batched ``torch.autograd.grad``.

Used where BackPACK cannot backpropagate per-sample columns: ``BatchNorm`` in
train mode (which couples the samples, so the columns at a layer's output mix
samples exactly as the batch statistics do), modules BackPACK has no
derivatives for, and functional operations between modules. For ``MC`` and
``EXACT`` the columns $s_{nk}$ are pulled back from the network output to every
layer output with one vectorised ``autograd.grad`` call when the loss module
runs; for ``EMPIRICAL`` the output gradients of the user's own backward are
read by tensor hooks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class AutogradRun:
    """Hooks on the curvature layers for one ``collect()`` block.

    Args:
        layers: The curvature layer modules.
        on_layer: Receives a layer and the columns ``[K, N_sub, *out]`` at its output.
        batch_to_sample: Factor from batch-loss gradients to per-sample gradients.
        subsampling: Returns the active sample indices (``None``: all).
        read_backward: Read the user's backward (``EMPIRICAL``) instead of
            pulling back columns at the loss.
        coupled: The samples are coupled (train-mode ``BatchNorm``): every row of
            a layer output receives gradient from every sample, so all rows are
            kept, and ``pull_back(separate=True)`` pulls back each column of each
            sample on its own.
    """

    def __init__(
        self,
        layers: list[nn.Module],
        on_layer: Callable[[nn.Module, Tensor], None],
        batch_to_sample: Callable[[], float],
        subsampling: Callable[[], list[int] | None],
        read_backward: bool,
        coupled: bool,
    ) -> None:
        self._layers = layers
        self._on_layer = on_layer
        self._batch_to_sample = batch_to_sample
        self._subsampling = subsampling
        self._read_backward = read_backward
        self._coupled = coupled
        self._outputs: dict[nn.Module, Tensor] = {}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> AutogradRun:
        for layer in self._layers:
            self._handles.append(layer.register_forward_hook(self._forward_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    def _forward_hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        if self._read_backward:
            if output.requires_grad:
                self._handles.append(output.register_hook(self._grad_reader(module)))  # type: ignore[no-untyped-call]
        else:
            self._outputs[module] = output

    def _grad_reader(self, module: nn.Module) -> Callable[[Tensor], None]:
        def read(grad: Tensor) -> None:
            sub = None if self._coupled else self._subsampling()
            grad = grad if sub is None else grad[sub]
            self._on_layer(module, (grad * self._batch_to_sample()).unsqueeze(0))

        return read

    def pull_back(self, network_output: Tensor, columns: Tensor, separate: bool = False) -> None:
        """Pull columns at the network output back to every layer output.

        Args:
            network_output: The tensor the loss module received, ``[N, ...]``.
            columns: ``[K, N_sub, ...]`` for the active samples.
            separate: Pull back each (sample, column) pair on its own, giving
                ``K * N_sub`` columns over all ``N`` rows (needed when samples are
                coupled and the columns are not zero-mean draws).
        """
        if self._read_backward or not self._outputs:
            return
        sub = self._subsampling()
        rows = list(range(network_output.shape[0])) if sub is None else sub
        k = columns.shape[0]
        if separate:
            full = columns.new_zeros(len(rows) * k, *network_output.shape)
            samples = torch.tensor(rows, device=columns.device).repeat_interleave(k)
            full[torch.arange(len(rows) * k), samples] = columns.transpose(0, 1).flatten(0, 1)
        elif sub is None:
            full = columns
        else:
            full = columns.new_zeros(k, *network_output.shape)
            full[:, sub] = columns
        # A frozen layer's output may need no gradient: it gets no columns, and
        # the session names the frozen layer.
        modules = [m for m, out in self._outputs.items() if out.requires_grad]
        outputs = [self._outputs[m] for m in modules]
        if not outputs:
            self._outputs.clear()
            return
        if full.shape[0] == 1:  # one column (one MC draw): a plain backward, no vmap
            grads = tuple(
                None if g is None else g.unsqueeze(0)
                for g in torch.autograd.grad(
                    network_output, outputs, full[0], retain_graph=True, allow_unused=True
                )
            )
        else:
            grads = torch.autograd.grad(
                network_output,
                outputs,
                grad_outputs=full,
                is_grads_batched=True,
                retain_graph=True,
                allow_unused=True,
            )
        for module, grad in zip(modules, grads, strict=True):
            if grad is None:
                continue
            keep_all = self._coupled or sub is None
            self._on_layer(module, grad if keep_all else grad[:, sub])
        self._outputs.clear()
