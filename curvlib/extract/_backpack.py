"""The BackPACK backend: a custom extension that records curvlib's statistics.

BackPACK backpropagates the columns $s_{nk}$ of the factorised loss Hessian
through the network with its module derivatives (``jac_t_mat_prod``). curvlib
uses those derivatives but not BackPACK's curvature extensions, which differ
from curvlib's conventions (loss scaling, ``BCEWithLogitsLoss`` shapes, the
convolution ``G`` factor) and lack several modules (``BCELoss`` among them):

* the loss module starts the backward pass with
  [`LossCurvature.hessian_columns`][curvlib.extract.losses.LossCurvature.hessian_columns];
* curvature layers hand the columns at their output, and their stored input,
  to a recorder, then pass the columns on;
* every other supported module only passes the columns on, through its BackPACK
  derivatives (``BatchNorm`` in eval mode only).

Hooks are installed for one ``collect()`` block and removed afterwards, so
nothing BackPACK stores outlives the block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from backpack import backpack, hook_run_extensions, hook_store_io, memory_cleanup
from backpack.core.derivatives.adaptive_avg_pool_nd import AdaptiveAvgPool2dDerivatives
from backpack.core.derivatives.avgpool2d import AvgPool2DDerivatives
from backpack.core.derivatives.basederivatives import BaseDerivatives
from backpack.core.derivatives.batchnorm_nd import BatchNormNdDerivatives
from backpack.core.derivatives.conv2d import Conv2DDerivatives
from backpack.core.derivatives.conv_transpose2d import ConvTranspose2DDerivatives
from backpack.core.derivatives.dropout import DropoutDerivatives
from backpack.core.derivatives.elu import ELUDerivatives
from backpack.core.derivatives.flatten import FlattenDerivatives
from backpack.core.derivatives.leakyrelu import LeakyReLUDerivatives
from backpack.core.derivatives.linear import LinearDerivatives
from backpack.core.derivatives.logsigmoid import LogSigmoidDerivatives
from backpack.core.derivatives.maxpool1d import MaxPool1DDerivatives
from backpack.core.derivatives.maxpool2d import MaxPool2DDerivatives
from backpack.core.derivatives.relu import ReLUDerivatives
from backpack.core.derivatives.scale_module import ScaleModuleDerivatives
from backpack.core.derivatives.selu import SELUDerivatives
from backpack.core.derivatives.sigmoid import SigmoidDerivatives
from backpack.core.derivatives.tanh import TanhDerivatives
from backpack.core.derivatives.zeropad2d import ZeroPad2dDerivatives
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.mat_to_mat_jac_base import MatToJacMat
from backpack.extensions.module_extension import ModuleExtension
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torch.utils.hooks import RemovableHandle

from curvlib.core.layout import computes_like
from curvlib.extract.losses import SUPPORTED_LOSSES


def _stored_input(module: nn.Module, subsampling: list[int] | None) -> Tensor:
    x = module.input0  # stored by BackPACK's forward hook
    assert isinstance(x, Tensor)
    return x if subsampling is None else x[subsampling]


def _pool_backward(mat: Tensor, x: Tensor, backward: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Apply a pooling layer's transposed Jacobian to ``[V, N, C, H, W]`` columns."""
    v, n = mat.shape[:2]
    # The backward kernels read only the input's shape: a stride-0 view costs nothing.
    shape_ref = x[:1].expand(v * n, *x.shape[1:])
    grad = backward(mat.reshape(v * n, *mat.shape[2:]), shape_ref)
    return grad.reshape(v, n, *x.shape[1:])


class _AvgPool2dDerivatives(AvgPool2DDerivatives):  # type: ignore[misc]
    """Average pooling through torch's own backward kernel.

    BackPACK's version builds a float32 helper convolution, which fails for other
    dtypes; this one keeps the dtype and honours ``ceil_mode`` and padding options.
    """

    def _jac_t_mat_prod(
        self, module: nn.AvgPool2d, g_inp: Any, g_out: Any, mat: Tensor, subsampling: Any = None
    ) -> Tensor:
        def backward(grad: Tensor, ref: Tensor) -> Tensor:
            result: Tensor = torch.ops.aten.avg_pool2d_backward(
                grad,
                ref,
                _pair(module.kernel_size),
                _pair(module.stride),
                _pair(module.padding),
                module.ceil_mode,
                module.count_include_pad,
                module.divisor_override,
            )
            return result

        return _pool_backward(mat, _stored_input(module, subsampling), backward)


class _AdaptiveAvgPool2dDerivatives(AdaptiveAvgPool2dDerivatives):  # type: ignore[misc]
    """Adaptive average pooling through torch's own backward kernel (any dtype, any sizes)."""

    def _jac_t_mat_prod(
        self,
        module: nn.AdaptiveAvgPool2d,
        g_inp: Any,
        g_out: Any,
        mat: Tensor,
        subsampling: Any = None,
    ) -> Tensor:
        return _pool_backward(
            mat, _stored_input(module, subsampling), torch.ops.aten._adaptive_avg_pool2d_backward
        )


_DERIVATIVES: dict[type[nn.Module], Callable[[], BaseDerivatives]] = {
    nn.Linear: LinearDerivatives,
    nn.Conv2d: Conv2DDerivatives,
    nn.ConvTranspose2d: ConvTranspose2DDerivatives,
    nn.ReLU: ReLUDerivatives,
    nn.Sigmoid: SigmoidDerivatives,
    nn.Tanh: TanhDerivatives,
    nn.LeakyReLU: LeakyReLUDerivatives,
    nn.ELU: ELUDerivatives,
    nn.SELU: SELUDerivatives,
    nn.LogSigmoid: LogSigmoidDerivatives,
    nn.Dropout: DropoutDerivatives,
    nn.Flatten: FlattenDerivatives,
    nn.Identity: ScaleModuleDerivatives,
    nn.MaxPool1d: MaxPool1DDerivatives,
    nn.MaxPool2d: MaxPool2DDerivatives,
    nn.AvgPool2d: lambda: _AvgPool2dDerivatives(),
    nn.AdaptiveAvgPool2d: lambda: _AdaptiveAvgPool2dDerivatives(),
    nn.ZeroPad2d: ZeroPad2dDerivatives,
    nn.BatchNorm1d: BatchNormNdDerivatives,
    nn.BatchNorm2d: BatchNormNdDerivatives,
    nn.BatchNorm3d: BatchNormNdDerivatives,
}

BACKPACK_MODULES: tuple[type[nn.Module], ...] = tuple(_DERIVATIVES)
"""Module types the BackPACK backend can backpropagate through."""

LayerCallback = Callable[[nn.Module, Tensor], None]
"""Receives a curvature layer and the columns ``[K, N_sub, *out]`` at its output."""


class _CurvlibExtension(BackpropExtension):  # type: ignore[misc]
    """Backpropagates loss-Hessian columns, or reads output gradients (empirical)."""

    def __init__(
        self,
        modules: Iterable[nn.Module],
        backpropagate_columns: bool,
        loss_columns: Callable[[nn.Module], Tensor],
        on_layer: Callable[[nn.Module, Tensor], None],
        batch_to_sample: Callable[[], float],
        subsampling: Callable[[], list[int] | None],
        loss_ran: Callable[[], bool],
    ) -> None:
        exts: dict[type[nn.Module], ModuleExtension] = {
            cls: _Passthrough(make()) for cls, make in _DERIVATIVES.items()
        }
        for cls in (
            nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d
        ):  # fmt: skip
            exts[cls] = _RecordLayer(_DERIVATIVES[cls]())
        # BackPACK dispatches on the exact class: subclasses that compute what their
        # base computes (e.g. nn.Linear with extra attributes) use the base's handler.
        for module in modules:
            base = computes_like(type(module), _DERIVATIVES)
            if base is not None and type(module) not in exts:
                exts[type(module)] = exts[base]
        for loss_cls in SUPPORTED_LOSSES:
            exts[loss_cls] = _StartFromLoss()
        super().__init__(savefield="_curvlib_unused", module_exts=exts, fail_mode="ERROR")
        self._backpropagate = backpropagate_columns
        self.loss_columns = loss_columns
        self.on_layer = on_layer
        self.batch_to_sample = batch_to_sample
        self._subsampling_fn = subsampling
        self._loss_ran = loss_ran

    def __call__(self, module: nn.Module, g_inp: Any, g_out: Any) -> None:
        if not self._loss_ran():
            raise RuntimeError(
                "The backward pass inside collect() did not start from the loss module "
                "passed to the extractor: call loss_fn(output, target) inside the block."
            )
        try:
            super().__call__(module, g_inp, g_out)
        except AssertionError as err:
            if "expects a backpropagation quantity" not in str(err):
                raise
            raise RuntimeError(
                f"BackPACK cannot follow the graph into {type(module).__name__}: its output "
                "was changed by an operation that is not a module (e.g. x + y, torch.cat or "
                "a functional activation in forward). Use backend=Backend.AUTOGRAD."
            ) from None

    def expects_backpropagation_quantities(self) -> bool:
        return self._backpropagate

    def get_subsampling(self) -> list[int] | None:
        return self._subsampling_fn()

    def accumulate_backpropagated_quantities(self, existing: Tensor, other: Tensor) -> Tensor:
        return existing + other


class _Passthrough(MatToJacMat):  # type: ignore[misc]
    """Multiplies the columns by the module's transposed Jacobian."""

    def check_hyperparameters_module_extension(
        self, ext: BackpropExtension, module: nn.Module, g_inp: Any, g_out: Any
    ) -> None:
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise RuntimeError(
                "The BackPACK backend cannot backpropagate through BatchNorm in train mode; "
                "use Backend.AUTO or Backend.AUTOGRAD."
            )


class _RecordLayer(_Passthrough):
    """Hands the columns at a layer's output to the recorder, then passes them on."""

    def __call__(self, ext: _CurvlibExtension, module: nn.Module, g_inp: Any, g_out: Any) -> None:
        if ext.expects_backpropagation_quantities():
            output = module.output  # stored by BackPACK's forward hook
            assert isinstance(output, Tensor)
            columns = ext.saved_quantities.retrieve_quantity(output.data_ptr(), delete_old=False)
        else:
            grad = g_out[0]
            sub = ext.get_subsampling()
            if sub is not None:
                grad = grad[sub]
            columns = (grad * ext.batch_to_sample()).unsqueeze(0)
        if columns is not None:
            ext.on_layer(module, columns)
        super().__call__(ext, module, g_inp, g_out)


class _StartFromLoss(ModuleExtension):  # type: ignore[misc]
    """Starts the backward pass with the columns of the factorised loss Hessian."""

    def backpropagate(
        self, ext: _CurvlibExtension, module: nn.Module, g_inp: Any, g_out: Any, bp: Any
    ) -> Tensor:
        columns: Tensor = ext.loss_columns(module)
        return columns


class BackpackRun:
    """BackPACK hooks and context for one ``collect()`` block.

    Args:
        modules: Every module to hook: the network's leaf modules and the loss.
        extension_args: Arguments of the extension (see ``_CurvlibExtension``).
    """

    def __init__(self, modules: list[nn.Module], **extension_args: Any) -> None:
        self._modules = modules
        self._ext = _CurvlibExtension(modules, **extension_args)
        self._handles: list[RemovableHandle] = []
        self._context = backpack(self._ext)

    def __enter__(self) -> BackpackRun:
        for module in self._modules:
            self._handles.append(module.register_forward_hook(hook_store_io))
            self._handles.append(module.register_full_backward_hook(hook_run_extensions))
        self._context.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._context.__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._modules:
            memory_cleanup(module)
        self._ext.saved_quantities._saved_quantities.clear()
