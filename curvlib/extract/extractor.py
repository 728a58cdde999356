r"""The user-facing extractor: statistics from one forward and backward pass.

```python
extractor = CurvatureExtractor(model, loss_fn, stats={StatKind.KRONECKER})
with extractor.collect():
    loss = loss_fn(model(x), y)
    loss.backward()
stats = extractor.statistics()  # CurvatureStatistics, keyed by layer name
```

Outside a ``collect()`` block the model runs untouched: no hooks, no stored
tensors, no extra cost. Scaling and shapes:
[`curvlib.core.conventions`][curvlib.core.conventions].
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from curvlib.core.layout import CurvatureLayer, ModelLayout
from curvlib.core.stats import CurvatureStatistics, FisherType, LayerStatistics, StatKind
from curvlib.extract._autograd import AutogradRun
from curvlib.extract._backpack import BACKPACK_MODULES, BackpackRun
from curvlib.extract.layers import output_grads, unfold_input
from curvlib.extract.losses import LossCurvature, check_loss_module
from curvlib.extract.statistics import layer_statistics


class Backend(Enum):
    """How the per-sample columns are backpropagated.

    Attributes:
        AUTO: BackPACK where it can (every module supported, no ``BatchNorm`` in
            train mode), autograd otherwise; decided at each ``collect()``.
        BACKPACK: Always BackPACK; an unsupported network is an error.
        AUTOGRAD: Module hooks and one batched ``torch.autograd.grad``.
    """

    AUTO = "auto"
    BACKPACK = "backpack"
    AUTOGRAD = "autograd"


class UnsupportedPolicy(Enum):
    """What to do with trainable modules that have no curvature block.

    Attributes:
        WARN: Leave their parameters unpreconditioned and warn once, naming them.
        IGNORE: Leave them unpreconditioned silently.
        RAISE: Raise a ``ValueError`` naming them.
    """

    WARN = "warn"
    IGNORE = "ignore"
    RAISE = "raise"


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


def _enum(value: Any, cls: type[Enum], arg: str) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(f"{cls.__name__}.{m.name}" for m in cls)
        raise ValueError(f"{arg}={value!r} is not valid; choose one of {choices}.") from None


class CurvatureExtractor:
    """Computes curvature statistics of a model's layers in the backward pass.

    Args:
        model: The network. Its ``Linear``, ``Conv2d`` and ``ConvTranspose2d``
            layers (with ``requires_grad`` weights, filtered by ``include`` and
            ``exclude``) get statistics.
        loss_fn: The loss module the training loop calls, one of
            ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss`` (any output
            shape; soft targets for ``BCEWithLogitsLoss``).
        stats: Which statistics to compute; nothing else is computed.
        fisher_type: The flavour, a [`FisherType`][curvlib.core.stats.FisherType].
        mc_samples: Monte-Carlo samples per datum for ``FisherType.MC``.
        stats_fraction: Fraction of the batch, drawn at random on every
            ``collect()``, that the statistics use (the gradient still uses all).
        include: Glob patterns on qualified names, or module types, to select
            curvature layers (default: all supported layers).
        exclude: Patterns or types of layers to leave out.
        unsupported: What to do with trainable modules without a block.
        backend: How columns are backpropagated.
        dtype: Storage dtype of the statistics (default: the model's).
        seed: Seed of the generator that draws MC targets and sub-batches.

    Raises:
        TypeError: For a functional or unsupported loss.
        ValueError: For bad hyper-parameters, an empty layout, unsupported
            modules under ``UnsupportedPolicy.RAISE``, or a network the
            ``BACKPACK`` backend cannot handle.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        *,
        stats: Iterable[StatKind] = (StatKind.KRONECKER,),
        fisher_type: FisherType | str = FisherType.MC,
        mc_samples: int = 1,
        stats_fraction: float = 1.0,
        include: Sequence[str | type[nn.Module]] | None = None,
        exclude: Sequence[str | type[nn.Module]] = (),
        unsupported: UnsupportedPolicy | str = UnsupportedPolicy.WARN,
        backend: Backend | str = Backend.AUTO,
        dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self._loss = LossCurvature(check_loss_module(loss_fn))
        self._stats = frozenset(_enum(s, StatKind, "stats") for s in stats)
        if not self._stats:
            raise ValueError("stats is empty: ask for at least one StatKind.")
        self._fisher_type: FisherType = _enum(fisher_type, FisherType, "fisher_type")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}.")
        if not 0.0 < stats_fraction <= 1.0:
            raise ValueError(f"stats_fraction must lie in (0, 1], got {stats_fraction!r}.")
        self._mc_samples = mc_samples
        self._fraction = float(stats_fraction)
        self._backend: Backend = _enum(backend, Backend, "backend")
        self._dtype = dtype
        self._model = model
        self._layout = ModelLayout.from_model(model, include=include, exclude=exclude)
        if not self._layout.layers:
            raise ValueError(
                "No curvature layers selected: the model has no trainable Linear, Conv2d or "
                "ConvTranspose2d layer matching include/exclude."
            )
        self._check_unsupported(_enum(unsupported, UnsupportedPolicy, "unsupported"))
        self._by_module = {layer.module: layer for layer in self._layout.layers}
        self._leaves = [m for _, m in model.named_modules() if not any(m.children())]
        self._names = {m: name for name, m in model.named_modules()}
        self._no_backpack = [
            f"{self._names[m]} ({type(m).__name__})"
            for m in self._leaves
            if type(m) not in BACKPACK_MODULES
        ]
        if self._backend is Backend.BACKPACK and self._no_backpack:
            raise ValueError(
                "The BackPACK backend has no derivatives for: "
                + ", ".join(self._no_backpack)
                + ". Use backend=Backend.AUTO or Backend.AUTOGRAD."
            )
        self._seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._active = False
        self._last: CurvatureStatistics | None = None

    # -- public API --------------------------------------------------------------

    @property
    def layout(self) -> ModelLayout:
        """The curvature layers and the modules left without a block."""
        return self._layout

    @property
    def fisher_type(self) -> FisherType:
        """The flavour of the statistics."""
        return self._fisher_type

    @property
    def required_stats(self) -> frozenset[StatKind]:
        """The statistics this extractor computes."""
        return self._stats

    @contextmanager
    def collect(self) -> Iterator[None]:
        """Record statistics of the one forward and backward pass run in this block.

        The block must call the model, then ``loss_fn`` (the module given at
        construction) on its output, then ``backward()`` on that loss.

        Raises:
            RuntimeError: When blocks are nested, a module runs twice in the
                forward pass, or the block ends without the loss call or the
                backward pass.
        """
        if self._active:
            raise RuntimeError("collect() blocks cannot be nested.")
        self._active = True
        try:
            run = _Run(self)
            with run:
                yield
        finally:
            self._active = False
        self._last = run.finish()

    def statistics(self) -> CurvatureStatistics:
        """The statistics of the last completed ``collect()`` block.

        Raises:
            RuntimeError: If no ``collect()`` block has completed yet.
        """
        if self._last is None:
            raise RuntimeError(
                "No statistics yet: run the forward and backward pass inside "
                "`with extractor.collect():` first."
            )
        return self._last

    def state_dict(self) -> dict[str, Any]:
        """Random-generator states (per device), so a resumed run draws the same samples."""
        return {"generators": {dev: gen.get_state() for dev, gen in self._generators.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by ``state_dict``."""
        for dev, gen_state in state["generators"].items():
            self._generator(torch.device(dev)).set_state(gen_state)

    def _generator(self, device: torch.device) -> torch.Generator:
        """The generator for MC targets and sub-batches on ``device``, seeded on first use."""
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[key]

    # -- helpers -----------------------------------------------------------------

    def _check_unsupported(self, policy: UnsupportedPolicy) -> None:
        items = [u for u in self._layout.unsupported if u.reason != "excluded by the user"]
        if not items or policy is UnsupportedPolicy.IGNORE:
            return
        listing = "; ".join(str(u) for u in items)
        if policy is UnsupportedPolicy.RAISE:
            raise ValueError(
                f"Trainable modules without a curvature block: {listing}. Exclude them, "
                "freeze them, or pass unsupported=UnsupportedPolicy.WARN to leave their "
                "parameters unpreconditioned."
            )
        warnings.warn(
            f"These trainable modules have no curvature block and stay unpreconditioned: "
            f"{listing}.",
            stacklevel=3,
        )

    def _coupling_modules(self) -> list[str]:
        """Names of the modules that currently couple the samples (train-mode BatchNorm)."""
        return [
            self._names[m]
            for m in self._leaves
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
        ]

    def _use_backpack(self, coupling: list[str]) -> bool:
        if self._backend is Backend.AUTOGRAD:
            return False
        empirical = self._fisher_type is FisherType.EMPIRICAL
        if self._backend is Backend.BACKPACK:
            if coupling and not empirical:
                raise RuntimeError(
                    f"BatchNorm in train mode ({', '.join(coupling)}) couples the samples; "
                    "the BackPACK backend cannot backpropagate per-sample columns through "
                    "it. Use backend=Backend.AUTO or AUTOGRAD, or call model.eval()."
                )
            return True
        # EMPIRICAL reads the output gradients of the user's backward: any network works.
        return empirical or not (coupling or self._no_backpack)


class _Run:
    """State of one ``collect()`` block: hooks, counters and recorded tensors."""

    def __init__(self, extractor: CurvatureExtractor) -> None:
        self.ex = extractor
        self.inputs: dict[nn.Module, Tensor] = {}
        self.columns: dict[nn.Module, Tensor] = {}
        self.calls: dict[nn.Module, int] = {}
        self.num_batch: int | None = None
        self.subsample: list[int] | None = None
        self.loss_calls = 0
        self.backward_seen = False
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
        self.autograd: AutogradRun | None = None

    def __enter__(self) -> _Run:
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
        empirical = ex._fisher_type is FisherType.EMPIRICAL
        loss_module = ex._loss.loss_fn
        for module in ex._leaves:
            self.handles.append(module.register_forward_hook(self._count_hook))
        for layer in ex._layout.layers:
            self.handles.append(layer.module.register_forward_hook(self._input_hook))
        self.handles.append(loss_module.register_forward_pre_hook(self._loss_hook))

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
                    loss_ran=lambda: self.loss_calls > 0,
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
        strict = self.use_backpack or module in self.ex._by_module
        if self.calls[module] > 1 and strict:
            raise RuntimeError(
                f"Module {self.ex._names[module]!r} ({type(module).__name__}) ran twice in one "
                "forward pass inside collect(); curvlib needs each curvature layer (and, with "
                "the BackPACK backend, each module) to run once. Use separate module "
                "instances, or backend=Backend.AUTOGRAD for shared parameter-free modules."
            )

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

    # -- columns ------------------------------------------------------------------

    def _num_batch(self) -> int:
        if self.num_batch is None:
            raise RuntimeError("internal: the loss module did not run inside collect()")
        return self.num_batch

    def _columns_for(self, net_out: Tensor, target: Tensor) -> Tensor:
        if self.subsample is not None:
            net_out, target = net_out[self.subsample], target[self.subsample]
        ex = self.ex
        return ex._loss.hessian_columns(
            net_out, target, ex._fisher_type, ex._mc_samples, ex._generator(net_out.device)
        )

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
        if self.loss_calls == 0:
            raise RuntimeError(
                "collect() ended without a call of loss_fn: call the loss module passed to "
                "the extractor on the model output inside the block."
            )
        if not self.backward_seen:
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
            raise RuntimeError(
                f"Layer {layer.name!r} did not take part in the forward and backward pass "
                "inside collect(); exclude it from the extractor if it is unused."
            )
        x = self.inputs[module]
        if self.subsample is not None and not self.coupled:
            x = x[self.subsample]
        return layer_statistics(
            layer,
            unfold_input(layer, x),
            output_grads(layer, self.columns[module]),
            self.ex._stats,
            self.ex._dtype,
            num_samples=self._num_samples(),
        )

    def _num_samples(self) -> int:
        return len(self.subsample) if self.subsample is not None else self._num_batch()
