"""Which modules of a model are curvature layers, and how their parameters are laid out.

The matrix view of each layer and the bias column follow
[`curvlib.core.conventions`][curvlib.core.conventions].
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import Tensor, nn


class LayerKind(Enum):
    r"""The kinds of module that carry a curvature block.

    Attributes:
        LINEAR: ``nn.Linear``.
        CONV2D: ``nn.Conv2d``.
        CONV_TRANSPOSE2D: ``nn.ConvTranspose2d``.
        BATCHNORM: The affine parameters of ``nn.BatchNorm1d``/``2d``/``3d``,
            as a ``[C, 2]`` matrix $[\gamma \mid \beta]$ (one row per channel).
            It has no Kronecker structure: only approximations that list it in
            ``supported_kinds`` (the diagonal and unit-wise ones) cover it.
        LAYERNORM: The affine parameters of ``nn.LayerNorm``, as a ``[E, 2]``
            matrix $[\gamma \mid \beta]$ with one row per element of
            ``normalized_shape`` ($E$ of them, row-major). Like ``BATCHNORM``.
        GROUPNORM: The affine parameters of ``nn.GroupNorm``, as a ``[C, 2]``
            matrix $[\gamma \mid \beta]$ with one row per channel. Like
            ``BATCHNORM``.
    """

    LINEAR = "linear"
    CONV2D = "conv2d"
    CONV_TRANSPOSE2D = "conv_transpose2d"
    BATCHNORM = "batchnorm"
    LAYERNORM = "layernorm"
    GROUPNORM = "groupnorm"


_KINDS: dict[type[nn.Module], LayerKind] = {
    nn.Linear: LayerKind.LINEAR,
    nn.Conv2d: LayerKind.CONV2D,
    nn.ConvTranspose2d: LayerKind.CONV_TRANSPOSE2D,
    nn.BatchNorm1d: LayerKind.BATCHNORM,
    nn.BatchNorm2d: LayerKind.BATCHNORM,
    nn.BatchNorm3d: LayerKind.BATCHNORM,
    nn.LayerNorm: LayerKind.LAYERNORM,
    nn.GroupNorm: LayerKind.GROUPNORM,
}

_COMPUTATION = ("forward", "_conv_forward", "_output_padding", "_check_input_dim")
"""The methods that decide what a supported module computes from its input."""


def computes_like(module_type: type[nn.Module], bases: Iterable[type[nn.Module]]) -> type | None:
    """The type in ``bases`` that ``module_type`` is, or extends without changing what it computes.

    A subclass of ``nn.Linear`` that adds attributes or helper methods but keeps
    ``nn.Linear.forward`` (and, for convolutions, ``_conv_forward`` and
    ``_output_padding``) computes exactly what its base computes, so it gets the
    base's curvature block; a subclass with its own ``forward`` does not.
    """
    if module_type in bases:
        return module_type
    for base in bases:
        if issubclass(module_type, base) and all(
            getattr(module_type, name, None) is getattr(base, name, None) for name in _COMPUTATION
        ):
            return base
    return None


def _own_forward(module_type: type[nn.Module]) -> type[nn.Module] | None:
    """The supported base of a subclass that overrides what it computes, else ``None``."""
    for base in _KINDS:
        if issubclass(module_type, base):
            return base
    return None


KRONECKER_KINDS: frozenset[LayerKind] = frozenset(
    {LayerKind.LINEAR, LayerKind.CONV2D, LayerKind.CONV_TRANSPOSE2D}
)
"""The kinds with a Kronecker-factored block; the default selection of a layout."""

NORM_KINDS: frozenset[LayerKind] = frozenset(
    {LayerKind.BATCHNORM, LayerKind.LAYERNORM, LayerKind.GROUPNORM}
)
r"""The normalisation layers: one $[\gamma \mid \beta]$ row per normalised feature."""


def kronecker_cost(out_dim: int, in_dim: int) -> float:
    r"""$d_\text{out}^3 + d_\text{in}^3$: factorising a layer's Kronecker factors, up to a constant.

    What data-parallel training balances the layers' owners by, unless the
    approximation estimates its work otherwise (``work_cost``).
    """
    return float(out_dim) ** 3 + float(in_dim) ** 3


@dataclass(frozen=True, eq=False)
class CurvatureLayer:
    """One curvature layer of a model: its name, kind and matrix shape.

    Attributes:
        name: Qualified name in ``model.named_modules()``.
        kind: The layer kind.
        module: The module itself.
        out_dim: Rows of the weight matrix $W$.
        in_dim: Columns of $W$, without the bias column.
        has_bias: Whether a trainable bias is appended as the last column.
    """

    name: str
    kind: LayerKind
    module: nn.Module = field(repr=False)
    out_dim: int
    in_dim: int
    has_bias: bool

    @property
    def weight(self) -> nn.Parameter:
        """The layer's weight parameter."""
        weight = self.module.weight
        assert isinstance(weight, nn.Parameter)
        return weight

    @property
    def bias(self) -> nn.Parameter | None:
        """The layer's bias, if it is part of the curvature block."""
        if not self.has_bias:
            return None
        bias = self.module.bias
        assert isinstance(bias, nn.Parameter)
        return bias

    @property
    def parameters(self) -> tuple[nn.Parameter, ...]:
        """The parameters covered by this block, weight first."""
        bias = self.bias
        return (self.weight,) if bias is None else (self.weight, bias)

    @property
    def in_dim_aug(self) -> int:
        r"""Columns of $[W \mid b]$: ``in_dim`` plus one when there is a bias."""
        return self.in_dim + int(self.has_bias)

    @property
    def num_params(self) -> int:
        """Number of parameters in the block, ``out_dim * in_dim_aug``."""
        return self.out_dim * self.in_dim_aug

    @property
    def kronecker_cost(self) -> float:
        """[`kronecker_cost`][curvlib.core.kronecker_cost] of its ``out_dim`` and ``in_dim_aug``."""
        return kronecker_cost(self.out_dim, self.in_dim_aug)

    def weight_matrix(self, weight: Tensor) -> Tensor:
        """Turn tensors shaped like the weight into weight matrices.

        Args:
            weight: Shape ``[..., *weight.shape]`` (leading batch dimensions allowed).

        Returns:
            Shape ``[..., out_dim, in_dim]``.
        """
        lead = weight.shape[: weight.dim() - self.weight.dim()]
        if self.kind is LayerKind.CONV_TRANSPOSE2D:
            weight = weight.transpose(-4, -3)
        return weight.reshape(*lead, self.out_dim, self.in_dim)

    def to_matrix(self, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        r"""Stack weight-shaped and bias-shaped tensors into $[W \mid b]$ matrices.

        Args:
            weight: Shape ``[..., *weight.shape]``.
            bias: Shape ``[..., out_dim]``; required exactly when ``has_bias``.

        Returns:
            Shape ``[..., out_dim, in_dim_aug]``.

        Raises:
            ValueError: If ``bias`` is given for a layer without bias or missing.
        """
        if (bias is None) == self.has_bias:
            raise ValueError(
                f"Layer {self.name!r}: bias must be given exactly when the layer has a "
                f"trainable bias (has_bias={self.has_bias})."
            )
        mat = self.weight_matrix(weight)
        if bias is None:
            return mat
        return torch.cat([mat, bias.reshape(*mat.shape[:-1], 1)], dim=-1)

    def from_matrix(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        r"""Split $[W \mid b]$ matrices into parameter-shaped tensors.

        Args:
            mat: Shape ``[..., out_dim, in_dim_aug]``.

        Returns:
            ``(weight, bias)`` shaped like the parameters (with the leading
            dimensions of ``mat``); ``bias`` is ``None`` without a bias column.
        """
        lead = mat.shape[:-2]
        w_mat = mat[..., : self.in_dim]
        shape = tuple(self.weight.shape)
        if self.kind is LayerKind.CONV_TRANSPOSE2D:
            shape = (shape[1], shape[0], *shape[2:])
        weight = w_mat.reshape(*lead, *shape)
        if self.kind is LayerKind.CONV_TRANSPOSE2D:
            weight = weight.transpose(-4, -3)
        if not self.has_bias:
            return weight, None
        bias_shape = tuple(self.module.get_parameter("bias").shape)
        return weight, mat[..., self.in_dim].reshape(*lead, *bias_shape)

    def grad_matrix(self) -> Tensor:
        r"""The current ``.grad`` of the block's parameters as a $[W \mid b]$ matrix.

        Raises:
            RuntimeError: If a parameter has no gradient.
        """
        grads = [p.grad for p in self.parameters]
        if any(g is None for g in grads):
            raise RuntimeError(f"Layer {self.name!r} has no gradient: call loss.backward() first.")
        return self.to_matrix(*grads)  # type: ignore[arg-type]


@dataclass(frozen=True)
class UnsupportedModule:
    """A module with trainable parameters that has no curvature block.

    Attributes:
        name: Qualified name in ``model.named_modules()``.
        type_name: The module's class name.
        reason: Why it has no block.
    """

    name: str
    type_name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.type_name}): {self.reason}"


def frozen_message(names: Sequence[str]) -> str:
    """The error for curvature layers frozen (``requires_grad=False``) after construction."""
    return (
        f"Curvature layers {list(names)} were frozen (requires_grad=False) after the "
        "extractor and optimizer were built, which fixed their layers. Build them again "
        "after freezing (frozen layers are then left out), or leave the layers out from "
        f"the start with exclude={list(names)}."
    )


def _unsupported_reason(module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        if module.groups != 1:
            return "grouped convolutions (groups > 1) are not supported"
        if module.padding == "same" and any(
            d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size, strict=True)
        ):
            return "padding='same' with an even kernel pads asymmetrically; pad explicitly"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
    weight = module.weight
    assert isinstance(weight, Tensor)
    bias = getattr(module, "bias", None)
    if not weight.requires_grad and bias is not None and bias.requires_grad:
        return "a trainable bias with a frozen weight has no Kronecker block"
    return None


def _matches(name: str, module: nn.Module, patterns: Sequence[str | type[nn.Module]]) -> bool:
    for pattern in patterns:
        if isinstance(pattern, str):
            if fnmatch.fnmatchcase(name, pattern):
                return True
        elif isinstance(module, pattern):
            return True
    return False


@dataclass(frozen=True)
class ModelLayout:
    """The curvature layers of a model and the trainable modules left without one.

    Attributes:
        layers: The curvature layers, in ``named_modules()`` order.
        unsupported: Modules with trainable parameters that have no block
            (unsupported types, or excluded by the user).
    """

    layers: tuple[CurvatureLayer, ...]
    unsupported: tuple[UnsupportedModule, ...]

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        include: Sequence[str | type[nn.Module]] | None = None,
        exclude: Sequence[str | type[nn.Module]] = (),
        kinds: Iterable[LayerKind] | None = None,
    ) -> ModelLayout:
        """Find the curvature layers of ``model``.

        Args:
            model: The network.
            include: If given, only modules whose qualified name matches one of
                these glob patterns (or which are instances of one of these
                types) become curvature layers.
            exclude: Modules matching any of these patterns or types do not.
            kinds: The layer kinds that may become curvature layers (default:
                ``KRONECKER_KINDS``; add the ``NORM_KINDS`` for the
                approximations that support them).

        Returns:
            The layout. Frozen layers (weight without ``requires_grad``) are
            skipped silently; everything else with trainable parameters and no
            block is listed in ``unsupported``.

        Raises:
            ValueError: If a parameter is shared by two modules.
        """
        allowed = KRONECKER_KINDS if kinds is None else frozenset(LayerKind(k) for k in kinds)
        owners: dict[int, str] = {}
        layers: list[CurvatureLayer] = []
        unsupported: list[UnsupportedModule] = []
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            for p in module.parameters(recurse=False):
                if id(p) in owners and owners[id(p)] != name:
                    raise ValueError(
                        f"A parameter is shared by modules {owners[id(p)]!r} and {name!r}; "
                        "curvlib needs each parameter to belong to one module. Exclude one "
                        "of them from the layout or untie the parameters."
                    )
                owners[id(p)] = name
            if not own:
                continue
            type_name = type(module).__name__
            base = computes_like(type(module), _KINDS)
            kind = None if base is None else _KINDS[base]
            if kind is None or kind not in allowed:
                missing = "no curvature block" if kind is None else "no block in this approximation"
                overridden = _own_forward(type(module))
                if kind is None and overridden is not None:
                    missing = (
                        f"a subclass of nn.{overridden.__name__} with its own forward (or "
                        "_conv_forward): curvlib cannot tell what it computes, so it has no "
                        f"curvature block; keep nn.{overridden.__name__}'s forward, or exclude it"
                    )
                unsupported.append(UnsupportedModule(name, type_name, missing))
                continue
            if (include is not None and not _matches(name, module, include)) or _matches(
                name, module, exclude
            ):
                unsupported.append(UnsupportedModule(name, type_name, "excluded by the user"))
                continue
            reason = _unsupported_reason(module)
            if reason is not None:
                unsupported.append(UnsupportedModule(name, type_name, reason))
                continue
            if not module.get_parameter("weight").requires_grad:
                continue
            layers.append(_make_layer(name, kind, module))
        return cls(tuple(layers), tuple(unsupported))

    def __iter__(self) -> Iterator[CurvatureLayer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> CurvatureLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"No curvature layer named {name!r}; have {self.names}.")

    @property
    def names(self) -> tuple[str, ...]:
        """The qualified names of the curvature layers."""
        return tuple(layer.name for layer in self.layers)

    def describe(self) -> str:
        """A printable table of the layers and of the modules left without a block."""
        rows = [f"{'layer':30s} {'kind':18s} {'matrix [W|b]':>14s} {'params':>9s}"]
        for layer in self.layers:
            shape = f"{layer.out_dim}x{layer.in_dim_aug}"
            rows.append(
                f"{layer.name or '<root>':30s} {layer.kind.value:18s} {shape:>14s} "
                f"{layer.num_params:9d}"
            )
        rows.extend(f"without block: {item}" for item in self.unsupported)
        return "\n".join(rows)


def _make_layer(name: str, kind: LayerKind, module: nn.Module) -> CurvatureLayer:
    weight = module.weight
    assert isinstance(weight, Tensor)
    if kind is LayerKind.LINEAR:
        out_dim, in_dim = weight.shape
    elif kind in NORM_KINDS:
        out_dim, in_dim = weight.numel(), 1
    elif kind is LayerKind.CONV2D:
        out_dim, in_dim = weight.shape[0], weight[0].numel()
    else:
        out_dim, in_dim = weight.shape[1], weight.shape[0] * weight[0, 0].numel()
    bias = getattr(module, "bias", None)
    has_bias = bias is not None and bias.requires_grad
    return CurvatureLayer(name, kind, module, int(out_dim), int(in_dim), has_bias)
