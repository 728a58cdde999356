"""One ``collect()`` block: hooks, call counting, recorded tensors and the result.

[`CurvatureExtractor.collect`][curvlib.extract.CurvatureExtractor.collect]
opens a session; the session installs the hooks of the chosen backend (BackPACK
or autograd), checks the order of calls, and turns what the backward pass
handed over into [`CurvatureStatistics`][curvlib.core.stats.CurvatureStatistics].
"""

from __future__ import annotations

import math
import warnings
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.utils.hooks import RemovableHandle

from curvlib.core.layout import NORM_KINDS, CurvatureLayer, LayerKind, frozen_message
from curvlib.core.stats import CurvatureStatistics, FisherType, LayerStatistics, StatKind
from curvlib.extract._autograd import AutogradRun
from curvlib.extract._backpack import BackpackRun
from curvlib.extract.layers import (
    norm_grads,
    output_grads,
    transposed_conv_input_gram,
    unfold_input,
)
from curvlib.extract.statistics import (
    batchnorm_statistics,
    kronecker_statistics,
    layer_statistics,
    widened,
)

if TYPE_CHECKING:
    from curvlib.extract.extractor import CurvatureExtractor

_INPLACE_TYPES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Hardtanh,
    nn.Dropout,
    nn.Dropout2d,
)


class CollectSession:
    """State of one ``collect()`` block: hooks, counters and recorded tensors."""

    def __init__(self, extractor: CurvatureExtractor) -> None:
        self.ex = extractor
        self.inputs: dict[nn.Module, Tensor] = {}
        self.columns: dict[nn.Module, Tensor] = {}
        self.calls: dict[nn.Module, int] = {}
        self.num_batch: int | None = None
        self.subsample: list[int] | None = None
        self.loss_calls = 0
        self.other_loss: nn.Module | None = None
        self.outputs: list[Any] = []
        self.backward_seen = False
        # Autograd's columns are pulled back in the forward pass; then this waits
        # for the user's backward.
        self.awaiting_backward = False
        self.stack = ExitStack()
        self.handles: list[RemovableHandle] = []
        self.inplace: list[nn.Module] = []
        coupling = extractor._coupling_modules()
        self.coupled = bool(coupling)
        if self.coupled and extractor._stats - {StatKind.KRONECKER}:
            raise RuntimeError(
                f"BatchNorm in train mode ({', '.join(coupling)}) couples the samples, so "
                "per-sample statistics do not exist: request only StatKind.KRONECKER, or run "
                "the statistics step with the model in eval mode."
            )
        self.use_backpack = extractor._use_backpack(coupling)
        self.run_installed = False
        self.autograd: AutogradRun | None = None

    def __enter__(self) -> CollectSession:
        ex = self.ex
        for module in ex._model.modules():
            if isinstance(module, _INPLACE_TYPES) and getattr(module, "inplace", False):
                # Restored on exit: in-place ops break the per-sample hooks.
                setattr(module, "inplace", False)  # noqa: B010
                self.inplace.append(module)
        try:
            self._install()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _install(self) -> None:
        ex = self.ex
        self.stack.enter_context(warnings.catch_warnings())
        # torch warns when a hooked first layer's input needs no gradient; expected here.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss_module = ex._loss.loss_fn
        for module in ex._leaves:
            self.handles.append(module.register_forward_hook(self._count_hook))
        for layer in ex._layout.layers:
            self.handles.append(layer.module.register_forward_hook(self._input_hook))
        self.handles.append(loss_module.register_forward_pre_hook(self._loss_hook))
        self.handles.append(register_module_forward_pre_hook(self._other_loss_hook))
        self.handles.append(ex._model.register_forward_hook(self._output_hook))
        if self.use_backpack:
            # BackPACK cannot follow a graph that torch.autocast computed in float16 or
            # bfloat16: the backend is chosen when the model's forward starts, where it
            # is known whether autocast is on.
            self.handles.append(ex._model.register_forward_pre_hook(self._choose_backend_hook))
        else:
            self._install_run()

    def _choose_backend_hook(self, module: nn.Module, inputs: Any) -> None:
        if self.run_installed:
            return
        if _autocast_enabled(module):
            if self.ex._backpack_forced():
                raise RuntimeError(
                    "BackPACK cannot backpropagate through a forward pass under "
                    "torch.autocast (its derivatives mix the float16/bfloat16 activations "
                    "with float32 columns). Use backend=Backend.AUTO (the default), which "
                    "takes autograd under autocast, or Backend.AUTOGRAD."
                )
            self.use_backpack = False
        self._install_run()

    def _install_run(self) -> None:
        """Install the backend that backpropagates the columns (``use_backpack``)."""
        ex = self.ex
        empirical = ex._fisher_type is FisherType.EMPIRICAL
        loss_module = ex._loss.loss_fn
        self.run_installed = True

        def batch_to_sample() -> float:
            return ex._loss.batch_to_sample(self._num_batch())

        def subsampling() -> list[int] | None:
            return self.subsample

        if self.use_backpack:
            hooked = [layer.module for layer in ex._layout.layers] if empirical else ex._leaves
            self.stack.enter_context(
                BackpackRun(
                    [*hooked, loss_module],
                    backpropagate_columns=not empirical,
                    loss_columns=self._loss_columns,
                    loss_ran=self._loss_ran,
                    on_layer=self._on_layer,
                    batch_to_sample=batch_to_sample,
                    subsampling=subsampling,
                )
            )
        else:
            self.autograd = self.stack.enter_context(
                AutogradRun(
                    [layer.module for layer in ex._layout.layers],
                    on_layer=self._on_layer,
                    batch_to_sample=batch_to_sample,
                    subsampling=subsampling,
                    read_backward=empirical,
                    coupled=self.coupled,
                )
            )

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.stack.close()
        for module in self.inplace:
            setattr(module, "inplace", True)  # noqa: B010

    # -- hooks --------------------------------------------------------------------

    def _count_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        self.calls[module] = self.calls.get(module, 0) + 1
        # BackPACK backpropagates columns through every module, so each must run once;
        # empirical statistics read only the curvature layers' own output gradients.
        columns_through_backpack = self.use_backpack and (
            self.ex._fisher_type is not FisherType.EMPIRICAL
        )
        strict = columns_through_backpack or module in self.ex._by_module
        if self.calls[module] > 1 and strict:
            raise RuntimeError(
                f"Module {self.ex._names[module]!r} ({type(module).__name__}) ran twice in one "
                "forward pass inside collect(); curvlib needs each curvature layer (and, with "
                "the BackPACK backend, each module) to run once. Use separate module "
                "instances, or backend=Backend.AUTOGRAD for shared parameter-free modules."
            )

    def _output_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if torch.is_grad_enabled():
            self.outputs.append(output)

    def _input_hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Any) -> None:
        if torch.is_grad_enabled():
            self.inputs[module] = inputs[0].detach()

    def _loss_hook(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        if not torch.is_grad_enabled():
            return
        self.loss_calls += 1
        if self.loss_calls > 1:
            raise RuntimeError(
                "loss_fn ran twice inside one collect() block; compute the loss once per "
                "block (accumulate micro-batches in separate blocks)."
            )
        net_out, target = inputs[0], inputs[1]
        self.ex._loss.check_shapes(net_out, target)
        n = net_out.shape[0]
        if n == 0:
            raise ValueError(
                "The batch inside the statistics step is empty (0 samples): skip empty "
                "batches before the forward pass (e.g. `if len(x) == 0: continue`, or "
                "DataLoader(..., drop_last=True) when the last batch can be empty)."
            )
        self._check_model_output(net_out)
        self.num_batch = n
        m = max(1, math.ceil(self.ex._fraction * n))
        # Coupled empirical statistics come from the user's whole-batch backward.
        sub_batch = not (self.coupled and self.ex._fisher_type is FisherType.EMPIRICAL)
        if m < n and sub_batch:
            perm = torch.randperm(n, generator=self.ex._generator(torch.device("cpu")))
            self.subsample = sorted(perm[:m].tolist())
        if self.autograd is not None and self.ex._fisher_type is not FisherType.EMPIRICAL:
            # Coupled EXACT columns are not zero-mean draws: pull each back on its own.
            separate = self.coupled and self.ex._fisher_type is FisherType.EXACT
            self.autograd.pull_back(net_out, self._columns_for(net_out, target), separate)
            # The columns are in; the user's own backward must still pass through.
            if net_out.requires_grad:
                self.handles.append(net_out.register_hook(self._user_backward))  # type: ignore[no-untyped-call]
            self.awaiting_backward = True

    def _user_backward(self, grad: Tensor) -> None:
        self.awaiting_backward = False

    def _other_loss_hook(self, module: nn.Module, inputs: Any) -> None:
        # Seen only to name the mistake in finish(): another instance of the loss class.
        if type(module) is type(self.ex._loss.loss_fn) and module is not self.ex._loss.loss_fn:
            self.other_loss = module

    def _check_other_loss(self) -> None:
        """Name the mistake when another instance of the loss class ran instead of ``loss_fn``."""
        if self.loss_calls or self.other_loss is None:
            return
        name = type(self.other_loss).__name__
        raise RuntimeError(
            f"collect() saw a call of another {name} instance, not of the loss_fn passed "
            "to curvlib. curvlib reads the likelihood from that very instance (the "
            "BackPACK backend extends it to backpropagate the loss Hessian), so build "
            f"the loss once and use it in both places: loss_fn = nn.{name}(...); "
            "PreconditionedOptimizer(model, approx, loss_fn=loss_fn); then "
            "loss_fn(model(x), y) inside record() (or read it back as opt.loss_fn)."
        )

    def _loss_ran(self) -> bool:
        self._check_other_loss()
        return self.loss_calls > 0

    def _check_model_output(self, net_out: Tensor) -> None:
        """BackPACK backpropagates from the loss into the model's last module: refuse a slice."""
        columns_through_backpack = self.use_backpack and (
            self.ex._fisher_type is not FisherType.EMPIRICAL
        )
        if not columns_through_backpack or len(self.outputs) != 1:
            return
        output = self.outputs[0]
        if isinstance(output, Tensor) and net_out is not output and net_out.shape != output.shape:
            raise ValueError(
                f"The loss was applied to a tensor of shape {list(net_out.shape)}, not to the "
                f"model's output (shape {list(output.shape)}), e.g. to a slice model(x)[:, :k]. "
                "The BackPACK backend backpropagates the loss curvature from the model's last "
                "module and needs the loss on the output itself: move the slicing into the "
                "model (a final module), or use backend=Backend.AUTOGRAD, which follows any "
                "differentiable operation between the model and the loss."
            )

    # -- columns ------------------------------------------------------------------

    def _num_batch(self) -> int:
        if self.num_batch is None:
            # Empirical statistics are read in the backward pass of whatever loss ran.
            self._check_other_loss()
            raise RuntimeError(
                "The backward pass inside collect() did not start from the loss_fn passed to "
                "curvlib (a functional loss such as F.mse_loss, or a loss computed without "
                "it): call that very instance on the model output inside the block, "
                "loss_fn(model(x), y).backward() (or read it back as opt.loss_fn)."
            )
        return self.num_batch

    def _columns_for(self, net_out: Tensor, target: Tensor) -> Tensor:
        ex = self.ex
        # Of the whole batch: a sub-batch estimates the same statistics, unbiased.
        weights = ex._loss.sample_weights(net_out.detach(), target)
        if self.subsample is not None:
            net_out, target = net_out[self.subsample], target[self.subsample]
            if isinstance(weights, Tensor):
                weights = weights[self.subsample]
        return ex._loss.hessian_columns(
            net_out, target, ex._fisher_type, ex._mc_samples, ex._generator(net_out.device),
            weights=weights,
        )  # fmt: skip

    def _loss_columns(self, loss_module: nn.Module) -> Tensor:
        net_out, target = loss_module.input0, loss_module.input1  # stored by BackPACK
        assert isinstance(net_out, Tensor) and isinstance(target, Tensor)
        return self._columns_for(net_out, target)

    def _on_layer(self, module: nn.Module, columns: Tensor) -> None:
        if module in self.ex._by_module:
            self.backward_seen = True
            self.columns[module] = columns.detach()

    # -- result -------------------------------------------------------------------

    def finish(self) -> CurvatureStatistics:
        self._check_other_loss()
        if self.loss_calls == 0:
            raise RuntimeError(
                "collect() ended without a call of loss_fn: call the loss module passed to "
                "the extractor on the model output inside the block."
            )
        if not self.backward_seen or self.awaiting_backward:
            raise RuntimeError(
                "collect() ended without a backward pass: call loss.backward() inside the "
                "block (statistics are computed during the backward pass)."
            )
        ex = self.ex
        layers: dict[str, LayerStatistics] = {}
        for layer in ex._layout.layers:
            layers[layer.name] = self._layer_stats(layer)
        return CurvatureStatistics(
            layers=layers, fisher_type=ex._fisher_type, num_samples=self._num_samples()
        )

    def _layer_stats(self, layer: CurvatureLayer) -> LayerStatistics:
        module = layer.module
        if module not in self.columns or module not in self.inputs:
            if not all(p.requires_grad for p in layer.parameters):
                raise RuntimeError(frozen_message([layer.name]))
            raise RuntimeError(
                f"Layer {layer.name!r} did not take part in the forward and backward pass "
                "inside collect(); exclude it from the extractor if it is unused."
            )
        x = self.inputs[module]
        if self.subsample is not None and not self.coupled:
            x = x[self.subsample]
        if layer.kind in NORM_KINDS:
            per_sample = norm_grads(layer, x, self.columns[module])
            return batchnorm_statistics(layer, per_sample, self.ex._stats, self.ex._dtype)
        grads = output_grads(layer, self.columns[module])
        if layer.kind is LayerKind.CONV_TRANSPOSE2D and self.ex._stats == {StatKind.KRONECKER}:
            gram = transposed_conv_input_gram(layer, widened(x.detach(), self.ex._dtype))
            if gram is not None:  # the unfolded input's zeros never formed
                return kronecker_statistics(
                    layer, gram, len(x), grads, self.ex._dtype, num_samples=self._num_samples()
                )
        return layer_statistics(
            layer,
            unfold_input(layer, x),
            grads,
            self.ex._stats,
            self.ex._dtype,
            num_samples=self._num_samples(),
        )

    def _num_samples(self) -> int:
        return len(self.subsample) if self.subsample is not None else self._num_batch()


def _autocast_enabled(model: nn.Module) -> bool:
    """Whether ``torch.autocast`` is on for the device of ``model``'s parameters."""
    devices = {p.device.type for p in model.parameters()} or {"cpu"}
    return any(torch.is_autocast_enabled(device) for device in devices)
