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

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from curvlib.core.layout import NORM_KINDS, LayerKind, ModelLayout, UnsupportedModule, computes_like
from curvlib.core.stats import CurvatureStatistics, FisherType, StatKind
from curvlib.extract._backpack import BACKPACK_MODULES
from curvlib.extract._session import CollectSession
from curvlib.extract.losses import LossCurvature, check_loss_module
from curvlib.extract.products import ForwardCapture, ggn_gram
from curvlib.extract.statistics import BATCHNORM_KINDS

AUTOGRAD_MAX_DRAWS = 4
"""The most MC draws per sample for which ``Backend.AUTO`` picks autograd over BackPACK.

With few columns per sample one more backward pass from the network output
costs less than BackPACK's hooks on every module (the extractor benchmark's
backend rows). The exact Fisher's many columns per sample favour BackPACK.
Autograd's extra backward covers the whole batch even when the statistics use
a fraction of it, so for large networks on the CPU ``backend="backpack"`` can
be the cheaper one; ``Backend.AUTO`` keeps to this rule, so that the choice does
not depend on timings.
"""


class Backend(Enum):
    """How the per-sample columns are backpropagated.

    Attributes:
        AUTO: Autograd for the empirical Fisher and for the MC Fisher with at
            most ``AUTOGRAD_MAX_DRAWS`` draws (the default: one), where one more
            backward pass costs less than BackPACK's hooks on every module; for
            the exact Fisher and more draws, BackPACK where it can (every module
            supported, no ``BatchNorm`` in train mode) and autograd otherwise.
            Decided at each ``collect()``.
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


def _enum(value: Any, cls: type[Enum], arg: str) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(f"{cls.__name__}.{m.name}" for m in cls)
        raise ValueError(f"{arg}={value!r} is not valid; choose one of {choices}.") from None


LOW_PRECISION = (torch.float16, torch.bfloat16)
"""Parameter dtypes whose statistics are stored in float32 unless ``dtype`` says otherwise."""


def _statistics_dtype(model: nn.Module, dtype: torch.dtype | None) -> torch.dtype | None:
    """``dtype``; else float32 for a model with float16/bfloat16 parameters, else theirs.

    Cholesky and eigendecompositions have no half-precision kernels on the CPU, and
    factors averaged in 8 mantissa bits lose the small eigenvalues the inverse needs.
    A model with float32 (or float64) parameters keeps its statistics in that dtype
    also when ``torch.autocast`` runs its layers in float16 or bfloat16: their inputs
    and output gradients are cast up before the statistics are formed.
    """
    if dtype is not None:
        return dtype
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad and p.is_floating_point()}
    if dtypes & set(LOW_PRECISION):
        return torch.float32
    return max(dtypes, key=lambda d: torch.finfo(d).bits) if dtypes else None


def _check_materialised(model: nn.Module) -> None:
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(
            f"The model's parameters {meta[:3]}{' ...' if len(meta) > 3 else ''} are on the "
            "meta device (shapes without data). Materialise them before building the "
            "extractor or optimizer: model.to_empty(device='cpu') and initialise them, or "
            "model.load_state_dict(weights, assign=True)."
        )


def report_unsupported(
    items: Sequence[UnsupportedModule], policy: UnsupportedPolicy | str, stacklevel: int = 2
) -> None:
    """Apply ``policy`` to trainable modules without a curvature block.

    Raises:
        ValueError: Naming the modules, under ``UnsupportedPolicy.RAISE``; or for
            a ``policy`` that is not an ``UnsupportedPolicy``.
    """
    policy = _enum(policy, UnsupportedPolicy, "unsupported")
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
        f"These trainable modules have no curvature block and stay unpreconditioned: {listing}.",
        stacklevel=stacklevel + 1,
    )


def coupling_modules(model: nn.Module) -> list[str]:
    """Names of ``model``'s modules that currently couple the samples of a batch.

    BatchNorm couples them in train mode, and in eval mode too when it keeps no
    running statistics (it then normalises with the batch's). Where any does,
    per-sample statistics do not exist: the extractor computes only Kronecker
    factors then, and refuses the other kinds.
    """
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
    ]


class CurvatureExtractor:
    """Computes curvature statistics of a model's layers in the backward pass.

    Args:
        model: The network. Its ``Linear``, ``Conv2d`` and ``ConvTranspose2d``
            layers (with ``requires_grad`` weights, filtered by ``include`` and
            ``exclude``) get statistics.
        loss_fn: The loss module the training loop calls, one of
            ``MSELoss``, ``CrossEntropyLoss``, ``BCEWithLogitsLoss`` or ``BCELoss``
            on probabilities (any output shape; soft targets for both BCE losses).
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
        dtype: Storage dtype of the statistics (default: the model's parameters',
            also when ``torch.autocast`` runs the layers in float16 or bfloat16,
            and float32 for a model with float16 or bfloat16 parameters: the
            factorisations have no half-precision CPU kernels and lose the small
            eigenvalues).
        seed: Seed of the generator that draws MC targets and sub-batches.
        kinds: The layer kinds that get statistics (default: ``Linear``,
            ``Conv2d``, ``ConvTranspose2d``); ``LayerKind.BATCHNORM``,
            ``LAYERNORM`` and ``GROUPNORM`` add the affine parameters of
            eval-mode BatchNorm, LayerNorm and GroupNorm layers, which get only
            the ``DIAGONAL`` and ``PER_SAMPLE_GRAD`` statistics among ``stats``
            (``PER_SAMPLE_IO`` is answered with per-sample gradients). BackPACK
            has no LayerNorm or GroupNorm derivatives: ``Backend.AUTO`` uses
            autograd for a network with them, ``Backend.BACKPACK`` refuses it.

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
        kinds: Iterable[LayerKind] | None = None,
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
        _check_materialised(model)
        self._dtype = _statistics_dtype(model, dtype)
        self._model = model
        self._layout = ModelLayout.from_model(model, include=include, exclude=exclude, kinds=kinds)
        if not self._layout.layers:
            raise ValueError(
                "No curvature layers selected: the model has no trainable Linear, Conv2d or "
                "ConvTranspose2d layer matching include/exclude."
            )
        norms = [la for la in self._layout.layers if la.kind in NORM_KINDS]
        if norms and not self._stats & BATCHNORM_KINDS:
            kinds_named = sorted({f"LayerKind.{la.kind.name}" for la in norms})
            raise ValueError(
                f"Normalisation layers {[la.name for la in norms]} have no "
                f"{', '.join(sorted(k.name for k in self._stats))} statistics (only DIAGONAL, "
                "PER_SAMPLE_GRAD, and PER_SAMPLE_IO answered with per-sample gradients): "
                f"leave {', '.join(kinds_named)} out of kinds."
            )
        self._check_unsupported(unsupported)
        self._by_module = {layer.module: layer for layer in self._layout.layers}
        self._leaves = [m for _, m in model.named_modules() if not any(m.children())]
        self._names = {m: name for name, m in model.named_modules()}
        self._no_backpack = [
            f"{self._names[m]} ({type(m).__name__})"
            for m in self._leaves
            if computes_like(type(m), BACKPACK_MODULES) is None
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
        self._capture = ForwardCapture(model, self._loss.loss_fn)

    # -- public API --------------------------------------------------------------

    @property
    def layout(self) -> ModelLayout:
        """The curvature layers and the modules left without a block."""
        return self._layout

    @property
    def loss_fn(self) -> nn.Module:
        """The loss module: the very instance ``collect()`` blocks must call."""
        return self._loss.loss_fn

    @property
    def fisher_type(self) -> FisherType:
        """The flavour of the statistics."""
        return self._fisher_type

    @property
    def stats_fraction(self) -> float:
        """The fraction of each batch the statistics and curvature products use."""
        return self._fraction

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
            run = CollectSession(self)
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

    def capture(self) -> AbstractContextManager[Any]:
        """Keep the inputs of the model's and the loss's calls in this block, for ``ggn_gram``.

        Independent of ``collect()`` and cheap (two forward pre-hooks, references
        to the detached inputs); the last call with gradients enabled wins.
        """
        return self._capture.capture()

    def ggn_gram(self, directions: Sequence[Mapping[str, Tensor]]) -> Tensor:
        r"""Gram matrix $[d_i^\top \mathcal G d_j]$ of the exact GGN of the batch loss.

        One Jacobian-vector product per direction on the batch of the last
        ``capture()`` block, at the current parameters; see
        [`curvlib.extract.products`][curvlib.extract.products]. With
        ``stats_fraction < 1`` the products use the first
        $\lceil \text{stats\_fraction}\cdot N\rceil$ samples of the batch.

        Args:
            directions: Per-layer $[W \mid b]$ matrices keyed by layer name.

        Returns:
            The symmetric ``[k, k]`` matrix for ``k`` directions.

        Raises:
            RuntimeError: Without a completed ``capture()`` block.
        """
        return ggn_gram(
            self._model, self._layout, self._loss, self._capture.last(), directions, self._fraction
        )

    def state_dict(self) -> dict[str, Any]:
        """Random-generator states (per device), so a resumed run draws the same samples."""
        return {"generators": {dev: gen.get_state() for dev, gen in self._generators.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by ``state_dict``; all or nothing.

        Raises:
            RuntimeError: If a saved generator state is malformed (nothing is changed).
        """
        loaded = {}
        for dev, gen_state in state["generators"].items():
            generator = torch.Generator(device=torch.device(dev))
            generator.set_state(gen_state)
            loaded[str(torch.device(dev))] = generator
        self._generators.update(loaded)

    def _generator(self, device: torch.device) -> torch.Generator:
        """The generator for MC targets and sub-batches on ``device``, seeded on first use."""
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[key]

    # -- helpers -----------------------------------------------------------------

    def _check_unsupported(self, policy: UnsupportedPolicy | str) -> None:
        items = [u for u in self._layout.unsupported if u.reason != "excluded by the user"]
        report_unsupported(items, policy, stacklevel=3)

    def _coupling_modules(self) -> list[str]:
        """Names of the modules that currently couple the samples (``coupling_modules``)."""
        return coupling_modules(self._model)

    def _backpack_forced(self) -> bool:
        return self._backend is Backend.BACKPACK

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
        few_columns = empirical or (
            self._fisher_type is FisherType.MC and self._mc_samples <= AUTOGRAD_MAX_DRAWS
        )
        return not (few_columns or coupling or self._no_backpack)
