r"""The generic preconditioned optimizer, for any extractor and approximation.

One step, for the parameters $\theta_l = [W_l \mid b_l]$ of every curvature layer
$l$ in parameter group $g$:

1. $\nabla_l$ is the gradient (plus $\omega_g\theta_l$ for L2 weight decay $\omega_g$);
2. $\Delta_l = (C_l + \lambda_g I)^{-1}\nabla_l$ from the group's current inverse;
3. $\nu$ is the KL-clipping factor of the whole step, momentum included
   ([`momentum_step_norms`][curvlib.optim.kernels.momentum_step_norms]);
4. momentum $\mu_g$ acts on $\nu\Delta_l$ exactly as ``torch.optim.SGD`` acts on the
   gradient (heavy ball or Nesterov, buffers in ``state[p]``, scaled by $\nu$ too);
5. $\theta_l \leftarrow \theta_l - \eta_g\,\text{step}_l$ (after
   $\theta_l \leftarrow (1 - \eta_g\omega_g)\theta_l$ for decoupled weight decay).

With ``lr="auto"`` and/or ``momentum="auto"`` steps 3–5 are replaced by the
update $\alpha\Delta + \mu\delta$ whose free coefficients minimise the exact
quadratic model of the batch loss, with the KL clip measured in the exact GGN
([`curvlib.optim.adaptive`][curvlib.optim.adaptive]).

Each curvature group is a torch ``param_group`` holding its hyper-parameters
(``lr``, ``momentum``, ``nesterov``, ``weight_decay``, ``decoupled_weight_decay``,
``damping``, ``t_cov``, ``t_inv``; edit them at run time as with any torch
optimizer) and has its own [`CurvatureEngine`][curvlib.optim.engine.CurvatureEngine];
the groups share one extractor. Trainable parameters outside every curvature
layer take the same step without preconditioning: plain SGD with the
optimizer-level learning rate, momentum and weight decay, in the last
``param_group`` (named ``"fallback"``).
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvlib.core.checkpoint import RECORD_KEY, check_record, layer_record, writer_record
from curvlib.core.layout import CurvatureLayer, frozen_message
from curvlib.core.protocols import CurvatureApprox, CurvatureProducts, Extractor, ReplicaSync
from curvlib.core.stats import finite_flag
from curvlib.optim.adaptive import (
    AdaptiveGroup,
    AdaptiveMode,
    AdaptiveStep,
    adaptive_mode,
    adaptive_step,
    apply_adaptive_step,
    is_auto,
)
from curvlib.optim.defaults import (
    DEFAULTS,
    KLClip,
    MaxMove,
    default_damping,
    default_kl_clip,
    default_max_move,
    default_t_inv,
)
from curvlib.optim.deferred import (
    MAX_PENDING,
    DeferredStep,
    GroupPlan,
    check_setting,
    defers,
    device_guards,
    read_pending,
    tracked_norms,
)
from curvlib.optim.engine import (
    CurvatureEngine,
    floating_to,
    layer_grads,
    record_statistics,
)
from curvlib.optim.groups import check_hyper, resolve_groups, select_parameters
from curvlib.optim.guards import (
    DirectionCheck,
    absurd_steps,
    broken_directions,
    check_runtime_hyper,
    measure_directions,
)
from curvlib.optim.hyper import DampingRule, check_positive
from curvlib.optim.kernels import (
    clip_from_norms,
    layer_step,
    momentum_step_norms,
    selected_layer_step,
    selected_sgd_step,
    sgd_step,
)
from curvlib.optim.report import Unread, describe_optimizer, step_stats

CURVATURE_GROUP = "curvature"
OTHER_GROUP = "other"
FALLBACK_GROUP = "fallback"

StepCallback = Callable[[dict[str, Any]], object]
"""Called after every step with ``opt.last_stats`` (the same dict object)."""


class CurvatureOptimizer(torch.optim.Optimizer):
    r"""A ``torch.optim.Optimizer`` that preconditions with $(C + \lambda I)^{-1}$.

    Use it through [`PreconditionedOptimizer`][curvlib.PreconditionedOptimizer],
    which builds the extractor; this class takes any
    [`Extractor`][curvlib.core.protocols.Extractor]. The training loop:

    ```python
    for x, y in loader:
        opt.zero_grad()
        with opt.record():  # the curvature backward runs only when statistics are due
            loss = loss_fn(model(x), y)
            loss.backward()
        opt.step()
    ```

    Args:
        model: The network.
        extractor: Computes the statistics every group's approximation needs.
        approx: The curvature approximation of the layers no entry of ``groups``
            claims (and, copied, of the groups that set no ``approx``).
        lr: Learning rate $\eta$ (a float; schedule it with torch LR schedulers), or
            ``"auto"``: chosen every step by the exact quadratic model, bounded by
            the KL clip in the exact GGN ([`curvlib.optim.adaptive`][curvlib.optim.adaptive]).
        damping: $\lambda$: constant, callable of the step,
            [`LevenbergMarquardt`][curvlib.optim.hyper.LevenbergMarquardt], or
            [`DampingWarmup`][curvlib.optim.DampingWarmup], for every group that
            sets none. ``None`` (the default): each group's approximation's own
            default ([`default_damping`][curvlib.optim.defaults.default_damping]:
            ``DEFAULTS.damping`` unless the approximation names its own
            $\lambda$ or warm-up, as the [`Diagonal`][curvlib.approx.Diagonal]
            and [`TwoLevel`][curvlib.approx.TwoLevel] do).
        kl_clip: KL-clipping bound $c$ on the whole step, momentum included;
            ``None`` disables it. ``"default"``: the default of ``approx``
            ([`default_kl_clip`][curvlib.optim.defaults.default_kl_clip]:
            ``DEFAULTS.kl_clip``, $3\cdot10^{-3}$, unless the approximation
            names its own, as [`EKFAC`][curvlib.approx.EKFAC] does).
        kl_clip_lr_squared: Use $\eta^2$ in the clip (Ba et al.); ``False`` for the
            KPSVD paper's variant without it.
        momentum: Momentum $\mu$ on the preconditioned direction, or ``"auto"``
            (the coefficient of the previous update, chosen with ``lr``).
        max_move: $\rho$: each curvature layer's step moves its weights $[W \mid b]$
            by at most this fraction of their norm; a longer step (momentum
            included) and the layer's momentum buffer are scaled down to it
            ([`move_bounds`][curvlib.optim.kernels.move_bounds]). The KL clip
            measures a step in the approximation's own metric, which can be far
            flatter along the step than the true curvature; this bound does not
            depend on it. ``None`` bounds nothing; steps with ``lr="auto"`` are
            bounded by their own trust region instead. ``"default"``: the
            default of ``approx``
            ([`default_max_move`][curvlib.optim.defaults.default_max_move]:
            ``DEFAULTS.max_move``, 0.2, unless the approximation names its own,
            as [`KPSVD`][curvlib.approx.KPSVD] does: none).
        nesterov: Nesterov momentum.
        weight_decay: $\omega$.
        decoupled_weight_decay: Decay the weights directly (AdamW-style) instead of
            adding $\omega\theta$ to the gradient before preconditioning.
        t_cov: Steps between statistics updates.
        t_inv: Steps between inverse rebuilds, for every group that sets none.
            ``None`` (the default): each group's approximation's own default
            ([`default_t_inv`][curvlib.optim.defaults.default_t_inv]:
            ``DEFAULTS.t_inv``, 10, unless the approximation names its own, as
            [`EKFAC`][curvlib.approx.EKFAC] does).
        warmup: Statistics and inverses also at the steps before ``warmup`` that are
            powers of two (0, 1, 2, 4, 8, ...), whatever ``t_cov`` and ``t_inv``
            say (0 disables it): the curvature of the initial weights goes stale
            fastest ([`CurvatureEngine`][curvlib.optim.CurvatureEngine]).
        refresh_on_move: Statistics and inverses also on any step where some
            curvature layer's weights $[W \mid b]$ have moved by at least this
            fraction of their norm since its group's last statistics (0
            disables it): the curvature follows the weights, refreshed more
            often while they move fast and less often once they settle
            ([`CurvatureEngine`][curvlib.optim.CurvatureEngine]). Costs a copy
            of the curvature layers' weights and a distance per step.
        groups: Per-group settings, e.g. ``[{"layers": ["dec.*", nn.Conv2d],
            "approx": KPSVD(), "damping": 1e-2, "t_inv": 20}]``: the layers a
            group's patterns match get its approximation and hyper-parameters
            (any of ``lr``, ``momentum``, ``nesterov``, ``weight_decay``,
            ``decoupled_weight_decay``, ``damping``, ``t_cov``, ``t_inv``, and a
            ``name``); see [`curvlib.optim.groups`][curvlib.optim.groups].
        params: The parameters to step (default: every trainable parameter of
            ``model``); the others are never touched. Every curvature layer must
            lie inside it.
        on_step: Called after every step (skipped ones included) with
            ``last_stats``.
        grad_scaler: A ``torch.amp.GradScaler`` whose scale empirical statistics
            must undo; call ``scaler.unscale_(opt)`` before ``opt.step()``.
        accumulation_steps: Micro-batches per step when the loss is divided by this
            number for gradient accumulation (empirical statistics undo the factor).
        sync: Data-parallel training on several ranks
            ([`ReplicaSync`][curvlib.core.ReplicaSync], e.g.
            [`DataParallel`][curvlib.distributed.DataParallel]): it averages the
            gradients (unless DDP did), the statistics of every statistics
            step, Levenberg–Marquardt's closure losses and the exact curvature
            products of ``lr="auto"``, so that every rank takes the same step.
            ``PreconditionedOptimizer`` sets it up from the model
            (``data_parallel``); see [Distributed training](../distributed.md).
        deferred_checks: Take the steps on which no group folds in statistics
            or rebuilds its inverse without reading the device: the guards and
            the KL clip are evaluated there and applied through selects, and
            what a skipped step reports is read later
            ([`curvlib.optim.deferred`][curvlib.optim.deferred]). ``"auto"``
            (the default) does so where the curvature layers' parameters are
            not on the CPU (on a GPU a read waits for all queued work; on the
            CPU it costs nothing and the host path is exact to the bit);
            ``True`` or ``False`` always or never. Steps with
            ``lr``/``momentum`` ``"auto"`` or Levenberg–Marquardt damping
            always read.
        overlap_inverse: Steps during which a rebuilt inverse is built in the
            background (on a GPU on a second CUDA stream) before it replaces
            the live one, or until the next rebuild if that comes first; 0 (the
            default) builds it at once. A step then need not wait for the
            factorisations, at the price of inverses that many steps staler
            ([`curvlib.optim.overlap`][curvlib.optim.overlap]; the
            [`CurvatureEngine`][curvlib.optim.CurvatureEngine] argument).

    Attributes:
        extractor: The extractor shared by every group (``layout`` lists the
            curvature layers).
        engines: One [`CurvatureEngine`][curvlib.optim.CurvatureEngine] per
            curvature group, in the order of ``curvature_groups()``: each holds
            its group's approximation, schedule, inverse and counters.
        engine: ``engines[0]``, the group of the layers no ``groups`` entry claims.
        last_stats: What the last ``step`` did, a dictionary (KL-clip
            factor, damping, inverse rebuilt, condition numbers, skipped-step
            counters, time split; the keys are listed in
            [`step_stats`][curvlib.optim.report.step_stats] and on
            [Optimizer and tuning](../optimizer.md)): a
            [`StepStats`][curvlib.optim.report.StepStats], which reads the
            values a step left on the device when they are first used.
        skipped_steps: Steps skipped by the guards (a non-finite gradient, a
            broken or absurdly long direction); reading it reads the answers of
            steps with deferred checks.

    Raises:
        TypeError: For a malformed ``groups`` entry or ``params``.
        ValueError: For bad hyper-parameters, overlapping or empty groups,
            curvature layers outside ``params``, or ``"auto"`` with an extractor
            without [`CurvatureProducts`][curvlib.core.protocols.CurvatureProducts]
            or with parameters that take the fallback step.
    """

    def __init__(
        self,
        model: nn.Module,
        extractor: Extractor,
        approx: CurvatureApprox,
        *,
        lr: float | Literal["auto"] = DEFAULTS.lr,
        damping: DampingRule | None = None,
        kl_clip: KLClip = "default",
        kl_clip_lr_squared: bool = True,
        momentum: float | Literal["auto"] = DEFAULTS.momentum,
        max_move: MaxMove = "default",
        nesterov: bool = False,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        t_cov: int = DEFAULTS.t_cov,
        t_inv: int | None = None,
        warmup: int = DEFAULTS.warmup,
        refresh_on_move: float = DEFAULTS.refresh_on_move,
        groups: Sequence[Mapping[str, Any]] = (),
        params: Iterable[Tensor] | None = None,
        on_step: StepCallback | None = None,
        grad_scaler: Any = None,
        accumulation_steps: int = 1,
        sync: ReplicaSync | None = None,
        deferred_checks: bool | Literal["auto"] = "auto",
        overlap_inverse: int = 0,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "damping": default_damping(approx) if damping is None else damping,
            "t_cov": t_cov,
            "t_inv": default_t_inv(approx) if t_inv is None else t_inv,
        }
        check_hyper(defaults)
        if kl_clip == "default":
            kl_clip = default_kl_clip(approx)
        elif isinstance(kl_clip, str):
            raise ValueError(
                f"kl_clip must be a positive number, 'default' (the approximation's) or None "
                f"(no clip), got {kl_clip!r}."
            )
        elif kl_clip is not None:
            check_positive("kl_clip", kl_clip)
        if max_move == "default":
            max_move = default_max_move(approx)
        elif isinstance(max_move, str) or callable(max_move):
            raise TypeError(
                f"max_move must be a positive number, 'default' (the approximation's) or None "
                f"(no bound), got {max_move!r}."
            )
        elif max_move is not None:
            check_positive("max_move", max_move)
        if isinstance(accumulation_steps, bool) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps!r}.")
        check_setting(deferred_checks)
        if on_step is not None and not callable(on_step):
            raise TypeError(f"on_step must be callable with the stats dict, got {on_step!r}.")
        resolved, uncovered = resolve_groups(extractor.layout.layers, groups, approx)
        self.layers: tuple[CurvatureLayer, ...] = tuple(
            layer for layer in extractor.layout.layers if layer not in uncovered
        )
        selected = select_parameters(model, self.layers, params)
        curvature_ids = {id(p) for layer in self.layers for p in layer.parameters}
        torch_groups: list[dict[str, Any]] = []
        for group in resolved:
            settings = {**defaults, **group.settings}
            if damping is None and "damping" not in group.settings:
                settings["damping"] = default_damping(group.approx)
            if t_inv is None and "t_inv" not in group.settings:
                settings["t_inv"] = default_t_inv(group.approx)
            check_hyper(settings, f"group {group.name!r}: " if group.settings else "")
            layer_params = [p for layer in group.layers for p in layer.parameters]
            torch_groups.append(
                {"params": layer_params, "kind": CURVATURE_GROUP, "name": group.name, **settings}
            )
        other = [p for p in selected if id(p) not in curvature_ids]
        if other:
            torch_groups.append({"params": other, "kind": OTHER_GROUP, "name": FALLBACK_GROUP})
        super().__init__(torch_groups, defaults)
        self.extractor = extractor
        self.sync = sync
        self.kl_clip = kl_clip
        self.kl_clip_lr_squared = kl_clip_lr_squared
        self.max_move = max_move
        self._pending_bounds: _Bounds | None = None
        self.on_step = on_step
        self._stats_scale = _stats_scale(grad_scaler, accumulation_steps)
        self.engines: tuple[CurvatureEngine, ...] = tuple(
            CurvatureEngine(
                extractor, group.approx, damping=pg["damping"], t_cov=pg["t_cov"],
                t_inv=pg["t_inv"], stats_scale=self._stats_scale,
                layers=[layer.name for layer in group.layers], warmup=warmup,
                refresh_on_move=refresh_on_move, sync=sync, overlap_inverse=overlap_inverse,
            )
            for group, pg in zip(resolved, self.param_groups, strict=False)
        )  # fmt: skip
        self.engine = self.engines[0]
        self.group_layers: tuple[tuple[CurvatureLayer, ...], ...] = tuple(
            group.layers for group in resolved
        )
        # Groups whose approximation couples layers: the guards judge their step as a whole.
        self._coupled = [
            [layer.name for layer in layers]
            for engine, layers in zip(self.engines, self.group_layers, strict=True)
            if getattr(engine.approx, "couples_layers", False)
        ]
        self.deferred_checks = deferred_checks
        self._skipped = 0
        self._deferred: list[DeferredStep] = []
        # Deferred steps' tracked momentum norms, on the device: (layers, buffers, layers
        # with momentum) and the vector; the state's numbers are stale while it is set.
        self._norms: tuple[tuple[Any, ...], Tensor] | None = None
        self._layer = {layer.name: layer for layer in self.layers}
        self.last_stats: dict[str, Any] = {}
        self._recording = False
        self._record_times: dict[str, float] = {}
        self._stepped_grads: list[tuple[weakref.ref[Tensor], int]] = []
        ids = {id(p) for p in selected}
        named = list(model.named_parameters())
        self._param_names = {id(p): name for name, p in named}
        self._unstepped = tuple(n for n, p in named if p.requires_grad and id(p) not in ids)
        self._unsupported = tuple(str(u) for u in extractor.layout.unsupported)
        self._check_adaptive(other)
        self._groups_fixed = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused after construction: the groups and their engines are fixed then.

        Raises:
            ValueError: Always, once the optimizer is built (torch's constructor
                adds the groups through this method).
        """
        if getattr(self, "_groups_fixed", False):
            raise ValueError(
                f"{type(self).__name__} fixes its parameter groups when it is built (each "
                "curvature group has its own engine and the extractor its layers), so "
                "add_param_group cannot add parameters later. Build a new optimizer whose "
                "params= (and groups=) include them, e.g. after unfreezing layers, or step "
                "the new parameters with a second torch optimizer."
            )
        super().add_param_group(param_group)

    # -- the training-loop API ----------------------------------------------------

    @contextmanager
    def record(self) -> Iterator[None]:
        """Run the forward and backward pass in this block on every step.

        Statistics are computed only on the steps where some group needs them;
        on the others the block costs nothing.
        """
        if self._recording:
            raise RuntimeError("record() blocks cannot be nested.")
        self._recording = True
        try:
            self._sync()
            if all(layer.weight.grad is None for layer in self.layers):
                self._drop_statistics()  # of a step that never happened (e.g. GradScaler's)
            with (
                self._products().capture() if self._adaptive().active else nullcontext(),
                record_statistics(
                    self.extractor, self.engines, self._record_times, self._stats_scale
                ),
            ):
                yield
        finally:
            self._recording = False

    @property
    def approx(self) -> CurvatureApprox:
        """The curvature approximation of the first group."""
        return self.engine.approx

    @property
    def damping(self) -> float:
        r"""The damping $\lambda$ of the first group at the current step."""
        return self.engine.damping

    @property
    def stats_due(self) -> bool:
        """Whether the next ``record()`` block computes curvature statistics.

        For what must differ on those steps only, such as BatchNorm in eval mode
        for the approximations that need per-sample statistics.
        """
        self._sync()
        return any(engine.stats_due for engine in self.engines)

    @property
    def lm_due(self) -> bool:
        """Whether Levenberg–Marquardt damping adapts at the next ``step`` (needs a closure)."""
        return any(engine.lm_due for engine in self.engines)

    def curvature_groups(self) -> list[tuple[dict[str, Any], CurvatureEngine]]:
        """The curvature ``param_groups`` paired with their engines, in order."""
        return list(zip(self.param_groups, self.engines, strict=False))

    def describe(self) -> str:
        """A printable table: one row per curvature layer, then the other parameters.

        Columns: layer name, kind, parameter shapes, group, approximation,
        Fisher flavour, current damping, ``t_cov``/``t_inv``. Then the parameters
        that take the unpreconditioned fallback step, the parameters outside
        ``params`` (never touched), and the modules without a curvature block.
        """
        return describe_optimizer(
            self, self._param_names, self._unstepped, self._unsupported, OTHER_GROUP
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients, and drop statistics recorded for a step that never ran.

        A ``torch.amp.GradScaler`` skips ``opt.step()`` when the scaled gradients
        overflow; the statistics recorded in that step's ``record()`` block are
        then dropped here (or at the next ``record()`` when the gradients are
        ``None``), not folded into the next update.
        """
        self._drop_statistics()
        super().zero_grad(set_to_none=set_to_none)

    def _drop_statistics(self) -> None:
        for engine in self.engines:
            engine.discard()

    def _sync(self) -> None:
        """Check the (possibly edited) group hyper-parameters and hand them to the engines.

        Raises:
            ValueError: For a value set at run time that the constructor would refuse
                (``lr`` may be 0, for schedulers that warm up from zero).
        """
        for i, group in enumerate(self.param_groups):
            check_runtime_hyper(group, f"param_groups[{i}] ({group.get('name')!r}): ")
        for group, engine in self.curvature_groups():
            engine.configure(damping=group["damping"], t_cov=group["t_cov"], t_inv=group["t_inv"])

    def _group(self, kind: str) -> dict[str, Any] | None:
        return next((g for g in self.param_groups if g["kind"] == kind), None)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one preconditioned step.

        Args:
            closure: Returns the loss of the current batch (no backward needed);
                required on the steps where Levenberg–Marquardt damping adapts
                (``lm_due``) and evaluated only there.

        Returns:
            The closure's loss before the step where it was evaluated (in
            data-parallel training its mean over the ranks), else ``None``.

        Raises:
            RuntimeError: Without gradients, without a ``record()`` block on a step
                that needs statistics, or without a closure when LM damping adapts.
        """
        start = time.perf_counter()
        self._sync()
        self._check_grads()
        if self.sync is not None:
            self.sync.sync_gradients([p for g in self.param_groups for p in g["params"]])
        grads = layer_grads(self.layers)
        other = self._group(OTHER_GROUP)
        other_grads = [] if other is None else [p.grad for p in other["params"]]
        lm_engines = [engine for engine in self.engines if engine.lm_due]
        idle = not lm_engines and all(engine.prepare_idle for engine in self.engines)
        mode = self._adaptive()
        if idle and not mode.active and self._defers():
            return self._deferred_step(grads, other, start)
        finite = finite_flag([*grads.values(), *(g for g in other_grads if g is not None)])
        # Where the engines have nothing to prepare (no statistics, no inverse), the check
        # of the gradients travels with the directions' measurements: one host
        # synchronisation per regular step. Otherwise it comes first, before anything
        # is folded in or rebuilt, read with the answers of the steps whose checks
        # were deferred.
        deferred = finite is not None and idle
        if (self._deferred or self._norms is not None) and (deferred or finite is None):
            self._settle()
        if finite is not None and not deferred and not self._checked_first(finite):
            return self._skip(self._nonfinite_grads(grads, other), start)
        if lm_engines and closure is None:
            raise RuntimeError(
                "Levenberg-Marquardt damping adapts at this step: call "
                "opt.step(closure) with a closure that returns the loss of this batch."
            )
        mark = time.perf_counter()
        parts = {"precondition": mark - start}
        # The closure costs a forward pass: evaluate it only where LM needs it.
        loss_before = None
        if lm_engines and closure is not None:
            loss_before = self._loss_of(closure)
            parts["closure"] = time.perf_counter() - mark
        # Off the CPU (deferred_checks), an inverse rebuilt on this step is checked with the
        # directions' measurements: a statistics step then waits for the device twice.
        ahead = self._defers() and self.sync is None and not lm_engines and not mode.active
        for engine in self.engines:
            engine.prepare(ahead=ahead)
        mark = time.perf_counter()
        directions, lrs = self._precondition(grads)
        buffers = {} if mode.active else self._buffer_matrices()
        checks = self._measured(grads, directions, buffers, finite if deferred else None)
        if checks is None:  # deferred: the engines prepared nothing
            return self._skip(self._nonfinite_grads(grads, other), start)
        reason = broken_directions(checks, self._coupled)
        if reason is not None:
            return self._skip(reason, start, prepared=True)
        nu = 1.0
        buffer_norms: dict[str, float] = {}
        if not mode.active:  # the adaptive step bounds its own update (kl_trust_region)
            nu, buffer_norms = self._momentum_clip(checks, lrs, buffers)
            reason = absurd_steps(checks, nu, self._coupled)
            if reason is not None:
                return self._skip(reason, start, prepared=True)
        now = time.perf_counter()
        parts["precondition"] += now - mark
        deltas: dict[str, Tensor] = {}
        adaptive: AdaptiveStep | None = None
        move_bound: Unread | None = None
        if mode.active:
            groups = self._adaptive_groups()
            adaptive = adaptive_step(
                self._global_products(), groups, grads, directions, self.state, mode, self.kl_clip
            )
            nu = adaptive.clip
            parts["adaptive"], now = time.perf_counter() - now, time.perf_counter()
            apply_adaptive_step(self.state, groups, adaptive, mode)
        else:
            bounds = _Bounds()
            for (group, _), layers in zip(self.curvature_groups(), self.group_layers, strict=True):
                changes, factors = layer_step(
                    self.state, group, layers, directions, bool(lm_engines), clip=nu,
                    max_move=self.max_move,
                )  # fmt: skip
                deltas.update(changes)
                bounds.add(layers, factors)
            for layer in self.layers:
                if layer.name in buffer_norms:
                    self.state[layer.weight]["momentum_norm"] = nu * nu * buffer_norms[layer.name]
            # The buffers were scaled by the bounds; their tracked norms are, with the next read.
            self._pending_bounds = bounds if bounds.names else None
            move_bound = bounds.least()
        other = self._group(OTHER_GROUP)
        if other is not None:
            sgd_step(self.state, other)
        mark = time.perf_counter()
        parts["parameters"] = mark - now
        ratio = None
        if lm_engines:
            assert closure is not None and loss_before is not None
            loss_after = self._loss_of(closure)
            predicted = sum(
                engine.quadratic_model(
                    {layer.name: grads[layer.name] for layer in layers},
                    {layer.name: deltas[layer.name] for layer in layers},
                )
                for engine, layers in zip(self.engines, self.group_layers, strict=True)
                if adaptive is None  # else M of the exact quadratic model, computed already
            )
            predicted = adaptive.predicted if adaptive is not None else predicted
            ratio = (loss_after - loss_before) / predicted if predicted < 0 else math.nan
            for engine in lm_engines:
                engine.adapt_damping(ratio)
            parts["closure"] = parts.get("closure", 0.0) + time.perf_counter() - mark
        for engine in self.engines:
            engine.finish()
        self._mark_grads()
        self._report(start, parts, nu, ratio, adaptive, mode, move_bound=move_bound)
        return loss_before

    def _measured(
        self,
        grads: dict[str, Tensor],
        directions: dict[str, Tensor],
        buffers: dict[str, Tensor],
        finite: Tensor | None,
    ) -> dict[str, DirectionCheck] | None:
        """``measure_directions``, with the checks of inverses built ahead in the same read.

        Where such an inverse failed, its engine has built the checked one instead
        (``CurvatureEngine.settle_inverse``): the directions (updated in place)
        and their measurements are taken again.
        """
        pending = [(e, n) for e in self.engines if (n := e.pending_inverse) is not None]
        bounds = self._pending_bounds
        extra = [bounds.values()] if bounds is not None else []
        checks, values = measure_directions(
            grads, directions, buffers, finite, [*(numbers for _, numbers in pending), *extra]
        )
        if bounds is not None:
            read = values.pop()
            if checks is not None:  # else the step is skipped: the bounds wait for a read
                self._apply_bounds(read)
        rebuilt = [
            engine
            for (engine, _), v in zip(pending, values, strict=True)
            if not engine.settle_inverse(v)
        ]
        if not rebuilt:
            return checks
        for engine, layers in zip(self.engines, self.group_layers, strict=True):
            if engine in rebuilt:
                directions.update(engine.precondition({la.name: grads[la.name] for la in layers}))
        return measure_directions(grads, directions, buffers, finite)[0]

    def _checked_first(self, finite: Tensor) -> bool:
        """Whether the gradients are finite, read with the statistics' own check.

        The engines' statistics of this step are checked in the same transfer
        (``CurvatureEngine.statistics_flag``): one host read for both.
        """
        flags = [(engine, engine.statistics_flag()) for engine in self.engines]
        checked = [(engine, flag) for engine, flag in flags if flag is not None]
        if any(flag.device != finite.device for _, flag in checked):
            checked = []  # on several devices: the engines check their own
        values = self._settle([finite, *(flag for _, flag in checked)])
        if not values[0]:
            return False
        for (engine, _), value in zip(checked, values[1:], strict=True):
            engine.statistics_checked(bool(value))
        return True

    # -- steps with deferred checks (curvlib.optim.deferred) -------------------------

    @property
    def skipped_steps(self) -> int:
        """Steps skipped by the guards so far (reads the deferred checks' answers)."""
        self._settle()
        return self._skipped

    def _defers(self) -> bool:
        """Whether a step the engines need not prepare defers its checks."""
        return defers(self.deferred_checks, self.layers)

    def _deferred_step(
        self, grads: dict[str, Tensor], other: dict[str, Any] | None, start: float
    ) -> None:
        """A step whose guards and KL clip run on the device, applied through selects."""
        for engine in self.engines:
            engine.prepare()  # nothing due: resets this step's timings only
        directions, _ = self._precondition(grads)
        buffers = self._buffer_matrices()
        plans = [
            GroupPlan(
                names=tuple(layer.name for layer in layers),
                lr=float(group["lr"]),
                momentum=float(group["momentum"]),
                nesterov=bool(group["nesterov"]),
                coupled=bool(getattr(engine.approx, "couples_layers", False)),
            )
            for (group, engine), layers in zip(
                self.curvature_groups(), self.group_layers, strict=True
            )
        ]
        names = tuple(directions)
        moving = frozenset(name for plan in plans if plan.momentum != 0.0 for name in plan.names)
        key = (names, frozenset(buffers), moving)
        if self._norms is not None and self._norms[0] != key:
            self._settle()  # the buffers changed: start again from the state's numbers
        if self._norms is None:
            norms = tracked_norms(
                [
                    float(self.state[self._layer[n].weight].get("momentum_norm", 0.0))
                    if n in buffers
                    else 0.0
                    for n in names
                ],
                directions[names[0]].device,
            )
            if self._pending_bounds is not None:  # a host step's bounds, unread: applied so
                held, self._pending_bounds = self._pending_bounds, None
                norms = norms * held.scales(names, norms).square()
        else:
            norms = self._norms[1]
        fallback = [] if other is None else [p for p in other["params"] if p.grad is not None]
        guards = device_guards(
            grads, directions, buffers, norms, [p.grad for p in fallback], plans,
            self.kl_clip, self.kl_clip_lr_squared,
        )  # fmt: skip
        self._norms = (key, guards.norms)
        now = time.perf_counter()
        parts = {"precondition": now - start}
        bounds = _Bounds()
        for (group, _), layers in zip(self.curvature_groups(), self.group_layers, strict=True):
            bounds.add(layers, selected_layer_step(
                self.state, group, layers, directions, guards.clip, guards.ok, self.max_move
            ))  # fmt: skip
        least = None
        if bounds.names:
            # The buffers were scaled by the bounds: so are their tracked norms.
            norms = guards.norms
            self._norms = (key, norms * bounds.scales(names, norms).square())
            least = bounds.values().min()
        if other is not None:
            selected_sgd_step(self.state, other, guards.ok)
        parts["parameters"] = time.perf_counter() - now
        pending = DeferredStep(
            step=self.engine.step_count,
            packed=guards.packed,
            names=names,
            fallback=tuple(self._param_names.get(id(p), "?") for p in fallback),
            eps=tuple(torch.finfo(grads[name].dtype).eps for name in directions),
            coupled=tuple(tuple(group) for group in self._coupled),
            bound=least,
        )
        self._deferred.append(pending)
        for engine in self.engines:
            engine.finish()
        self._mark_grads()
        self._report(start, parts, None, None, None, None, deferred=lambda: self._settled(pending))
        if len(self._deferred) >= MAX_PENDING:
            self._settle()

    def _apply_bounds(self, values: Sequence[float]) -> None:
        """Scale the tracked norms of the buffers the last host step's bounds scaled by $s_l^2$."""
        assert self._pending_bounds is not None
        for name, value in zip(self._pending_bounds.names, values, strict=True):
            state = self.state[self._layer[name].weight]
            if "momentum_norm" in state:
                state["momentum_norm"] *= value * value
        self._pending_bounds = None

    def _settled(self, step: DeferredStep) -> DeferredStep:
        """``step`` with its answer read (reading every pending step's, if not yet)."""
        if step.skipped is None:
            self._settle()
        return step

    def _settle(self, head: Sequence[Tensor] = (), everything: bool = False) -> list[float]:
        """Read the deferred steps' answers, and ``head``'s numbers, in one transfer.

        Counts and warns about the skipped ones in their order, and turns the
        tracked momentum norms they left on the device into numbers. A host
        step's ``max_move`` factors come along where something is read anyway,
        or with ``everything`` (a checkpoint): until then the tracked norms of
        the buffers they scaled lack their $s_l^2$.

        Returns:
            The values of ``head``, flattened.
        """
        pending, self._deferred = self._deferred, []
        norms, self._norms = self._norms, None
        reading = everything or bool(head) or bool(pending) or norms is not None
        bounds = self._pending_bounds if reading else None
        extra = [bounds.values()] if bounds is not None else []
        values = read_pending(pending, [*head, *extra, *([] if norms is None else [norms[1]])])
        offset = sum(t.numel() for t in head)
        if bounds is not None:
            self._apply_bounds(values[offset : offset + len(bounds.names)])
            offset += len(bounds.names)
        if norms is not None:
            (names, _, moving), vector = norms
            for name, value in zip(names, values[offset : offset + vector.numel()], strict=True):
                if name in moving:
                    self.state[self._layer[name].weight]["momentum_norm"] = value
            offset += vector.numel()
        for step in pending:
            size = step.packed.numel()
            numbers, offset = values[offset : offset + size], offset + size
            if step.bound is not None:
                step.move_bound, offset = values[offset], offset + 1
            step.skipped = not numbers[0]
            step.clip = None if step.skipped else numbers[1]
            if step.skipped:
                self._skipped += 1
                reason, directions = step.reason(numbers)
                _warn_skipped(step.step, reason, directions, False, deferred=True)
            step.skipped_steps = self._skipped
        return values[: sum(t.numel() for t in head)]

    def _buffer_matrices(self) -> dict[str, Tensor]:
        """The ``[W | b]`` momentum buffers of the layers that have one."""
        out: dict[str, Tensor] = {}
        for (group, _), layers in zip(self.curvature_groups(), self.group_layers, strict=True):
            if is_auto(group["momentum"]) or float(group["momentum"]) == 0.0:
                continue
            for layer in layers:
                buffers = [self.state[p].get("momentum_buffer") for p in layer.parameters]
                if all(b is not None for b in buffers):
                    out[layer.name] = layer.to_matrix(*buffers)
        return out

    def _momentum_clip(
        self,
        checks: Mapping[str, DirectionCheck],
        lrs: Mapping[str, float],
        buffers: Mapping[str, Tensor],
    ) -> tuple[float, dict[str, float]]:
        r"""The KL-clipping factor of the whole step, momentum included.

        Args:
            checks: Every layer's measurements: $\langle\nabla, \Delta\rangle$ and
                $\langle\nabla, b\rangle$ with its momentum buffer $b$.
            lrs: Every layer's learning rate.
            buffers: The momentum buffers (``_buffer_matrices``).

        Returns:
            $\nu$ and, for the layers with momentum, the squared norm of their new
            momentum buffer before clipping
            ([`momentum_step_norms`][curvlib.optim.kernels.momentum_step_norms]).
        """
        step_norms: dict[str, float] = {}
        buffer_norms: dict[str, float] = {}
        for (group, _), layers in zip(self.curvature_groups(), self.group_layers, strict=True):
            momentum = float(group["momentum"])
            for layer in layers:
                name = layer.name
                check = checks[name]
                if momentum == 0.0:
                    step_norms[name] = check.inner
                    continue
                norm = 0.0
                if name in buffers:
                    norm = float(self.state[layer.weight].get("momentum_norm", 0.0))
                step_norms[name], buffer_norms[name] = momentum_step_norms(
                    check.inner, check.inner_buffer, norm, momentum, bool(group["nesterov"])
                )
        lr = lrs if len(self.engines) > 1 else next(iter(lrs.values()))
        return clip_from_norms(step_norms, lr, self.kl_clip, self.kl_clip_lr_squared), buffer_norms

    # -- adaptive learning rate and momentum --------------------------------------

    def _adaptive(self) -> AdaptiveMode:
        return adaptive_mode([g for g in self.param_groups if g["kind"] == CURVATURE_GROUP])

    def _products(self) -> CurvatureProducts:
        if not isinstance(self.extractor, CurvatureProducts):
            raise ValueError(
                "lr='auto' or momentum='auto' needs an extractor with exact curvature "
                f"products (CurvatureProducts); {type(self.extractor).__name__} has none."
            )
        return self.extractor

    def _global_products(self) -> CurvatureProducts:
        """The exact curvature products, averaged over the ranks in data-parallel training."""
        products = self._products()
        return products if self.sync is None else _RankMeanProducts(products, self.sync)

    def _loss_of(self, closure: Callable[[], Any]) -> float:
        """The closure's loss; in data-parallel training its mean over the ranks."""
        loss = closure()
        if self.sync is None:
            return float(loss)
        return float(self.sync.mean(torch.as_tensor(loss, dtype=torch.float64).detach()))

    def _adaptive_groups(self) -> list[AdaptiveGroup]:
        return [
            AdaptiveGroup(group, layers, engine.precond_damping or engine.damping)
            for (group, engine), layers in zip(
                self.curvature_groups(), self.group_layers, strict=True
            )
        ]

    def _check_adaptive(self, fallback: Sequence[Tensor]) -> None:
        """Raise a ``ValueError`` for ``"auto"`` settings the optimizer cannot honour."""
        if not self._adaptive().active:
            return
        self._products()
        group = self._group(OTHER_GROUP)
        if group is not None and (is_auto(group["lr"]) or is_auto(group["momentum"])):
            names = ", ".join(self._param_names[id(p)] for p in fallback)
            raise ValueError(
                f"lr/momentum='auto' choose the step of the curvature layers; the parameters "
                f"{names} take the unpreconditioned fallback step and need numbers. Give them "
                "a curvature block (e.g. a group with a Diagonal approximation for BatchNorm), "
                "leave them out of params=, or keep numeric optimizer-level lr and momentum "
                "and set 'auto' in a group that claims every layer: "
                "groups=[{'layers': ['*'], 'lr': 'auto'}]."
            )

    def _precondition(self, grads: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Add L2 weight decay to ``grads`` (in place) and precondition every group.

        Returns:
            The directions and the learning rate of every layer.
        """
        directions: dict[str, Tensor] = {}
        lrs: dict[str, float] = {}
        for (group, engine), layers in zip(self.curvature_groups(), self.group_layers, strict=True):
            wd = float(group["weight_decay"])
            if wd and not group["decoupled_weight_decay"]:
                for layer in layers:
                    grads[layer.name] = grads[layer.name] + wd * layer.to_matrix(
                        *(p.detach() for p in layer.parameters)
                    )
            directions.update(
                engine.precondition({layer.name: grads[layer.name] for layer in layers})
            )
            lr = math.nan if is_auto(group["lr"]) else float(group["lr"])  # "auto": no clip
            lrs.update({layer.name: lr for layer in layers})
        return directions, lrs

    def _check_grads(self) -> None:
        frozen = [la.name for la in self.layers if not all(p.requires_grad for p in la.parameters)]
        if frozen:
            raise RuntimeError(frozen_message(frozen))
        missing = [layer.name for layer in self.layers if layer.weight.grad is None]
        if missing:
            raise RuntimeError(
                f"No gradients for layers {missing}: call loss.backward() (inside "
                "`with opt.record():`) before opt.step()."
            )
        grads = [p.grad for layer in self.layers for p in layer.parameters]
        if (
            self._stepped_grads
            and len(grads) == len(self._stepped_grads)
            and all(
                ref() is g and g is not None and g._version == version
                for (ref, version), g in zip(self._stepped_grads, grads, strict=True)
            )
        ):
            raise RuntimeError(
                "step() was called again on the gradients of the previous step: run a new "
                "forward and backward pass (inside `with opt.record():`) before every step()."
            )

    def _mark_grads(self) -> None:
        """Remember the gradients this step consumed (see ``_check_grads``)."""
        self._stepped_grads = [
            (weakref.ref(p.grad), p.grad._version)
            for layer in self.layers
            for p in layer.parameters
            if p.grad is not None
        ]

    def _nonfinite_grads(self, grads: Mapping[str, Tensor], other: dict[str, Any] | None) -> str:
        """The skip reason naming the layers (or parameters) with NaN/Inf gradients."""
        names = [name for name, g in grads.items() if not bool(torch.isfinite(g).all())]
        if other is not None:
            names += [
                self._param_names.get(id(p), "?")
                for p in other["params"]
                if p.grad is not None and not bool(torch.isfinite(p.grad).all())
            ]
        return f"the gradient of {names} contains NaN/Inf"

    def _skip(self, reason: str, start: float, prepared: bool = False) -> None:
        """Skip the step: nothing moves, and a step after ``prepare()`` drops a rebuilt inverse.

        Args:
            reason: Why, for the warning.
            start: When ``step()`` began.
            prepared: Whether the engines had prepared this step (folded in its
                statistics, rebuilt their inverse): an inverse rebuilt on it is
                replaced by the one before, which gave usable steps.
        """
        self._settle()  # the deferred steps before this one count first
        self._skipped += 1
        for engine in self.engines:
            engine.discard()
        restored = prepared and any([engine.restore_replaced() for engine in self.engines])
        _warn_skipped(self.engine.step_count, reason, prepared, restored)
        parts = {"precondition": time.perf_counter() - start}
        for engine in self.engines:
            engine.finish()
        self._mark_grads()
        self._report(start, parts, None, None, None, None)

    def _report(
        self,
        start: float,
        parts: dict[str, float],
        nu: float | None,
        ratio: float | None,
        adaptive: AdaptiveStep | None,
        mode: AdaptiveMode | None,
        deferred: Callable[[], DeferredStep] | None = None,
        move_bound: float | Unread | None = None,
    ) -> None:
        """Fill ``last_stats`` (see ``step_stats``) and call ``on_step``."""
        record, self._record_times = self._record_times, {}
        chosen = None
        if adaptive is not None and mode is not None:
            chosen = {
                "adaptive_lr": adaptive.alpha if mode.lr else None,
                "adaptive_momentum": adaptive.mu if mode.momentum else None,
                "predicted_change": adaptive.predicted,
            }
        self.last_stats = step_stats(
            self, start, {**record, **parts}, nu, ratio, skipped=nu is None, adaptive=chosen,
            deferred=deferred, move_bound=move_bound,
        )  # fmt: skip
        if self.on_step is not None:
            self.on_step(self.last_stats)

    # -- checkpoints --------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer state plus every curvature engine and the extractor's RNG.

        With the record of what wrote it
        ([`curvlib.core.checkpoint`][curvlib.core.checkpoint]): each curvature
        group's approximation and the names and parameter shapes of its layers,
        and the names and shapes of the parameters that take the fallback step.

        A damping rule that is not a number (a schedule or a
        ``LevenbergMarquardt``) is left out of the saved ``param_groups``, as
        ``LambdaLR`` leaves out callables: pass it again when constructing the
        optimizer that loads the checkpoint (its adapted value is saved).
        """
        self._settle(everything=True)  # the tracked norms as numbers, the skipped steps counted
        state = super().state_dict()
        for group in state["param_groups"]:
            damping = group.get("damping")
            if isinstance(damping, bool) or not isinstance(damping, int | float):
                group.pop("damping", None)
        state[RECORD_KEY] = self._record()
        state["curvature"] = {
            "extractor": self.extractor.state_dict(),
            "groups": {g["name"]: e.state_dict() for g, e in self.curvature_groups()},
        }
        state["skipped_steps"] = self._skipped
        return state

    def _record(self) -> dict[str, Any]:
        groups = {
            group["name"]: {"approx": type(engine.approx).__name__, "layers": layer_record(layers)}
            for (group, engine), layers in zip(
                self.curvature_groups(), self.group_layers, strict=True
            )
        }
        other = self._group(OTHER_GROUP)
        fallback = {} if other is None else {
            self._param_names[id(p)]: list(p.shape) for p in other["params"]
        }  # fmt: skip
        return writer_record(self, groups=groups, fallback=fallback)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore everything ``state_dict()`` saved; the run continues exactly.

        All or nothing: the record of what wrote the checkpoint is compared
        with this optimizer first, then every engine's estimate and inverse is
        built aside; on any error the optimizer is left as it was.

        In data-parallel training a checkpoint (written by rank 0) loads on any
        number of ranks: every rank holds the same estimate. Only rank 0 takes
        the saved random state of the MC targets and sub-batches; the other
        ranks keep their own (``seed + rank``), so that their noise stays
        independent of rank 0's.

        Raises:
            ValueError: If the checkpoint was written by an optimizer with other
                curvature groups, approximations, layer names or parameter
                shapes (the message lists every difference), or has no record.
        """
        check_record(state_dict, self._record(), f"this {type(self).__name__}", ignore=("class",))
        self._settle()  # the steps before the load report as they were
        state_dict = dict(state_dict)
        del state_dict[RECORD_KEY]
        curvature = state_dict.pop("curvature")
        skipped = int(state_dict.pop("skipped_steps"))
        # Like torch's per-parameter state, the estimate follows the parameters' device.
        curvature = floating_to(curvature, self.layers[0].weight.device)
        staged = [
            engine.stage(curvature["groups"][group["name"]])
            for group, engine in self.curvature_groups()
        ]
        state, param_groups = self.state, self.param_groups
        try:
            super().load_state_dict(state_dict)
            for group, old in zip(self.param_groups, param_groups, strict=True):
                group.setdefault("damping", old["damping"])
            if self.sync is None or self.sync.rank == 0:  # the others keep their own noise
                self.extractor.load_state_dict(curvature["extractor"])  # all or nothing itself
        except BaseException:
            # torch's load builds new state and groups: the old objects are intact.
            self.state, self.param_groups = state, param_groups
            raise
        for engine, loaded in zip(self.engines, staged, strict=True):
            engine.commit(loaded)
        self._skipped = skipped


class _Bounds:
    """The ``max_move`` factors of one step's groups: the layers' names and one tensor per group."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._parts: list[Tensor] = []

    def add(self, layers: Sequence[CurvatureLayer], factors: Tensor | None) -> None:
        if factors is not None:
            self.names.extend(layer.name for layer in layers)
            self._parts.append(factors)

    def values(self) -> Tensor:
        """Every layer's factor, in the order of ``names`` (one tensor on the device)."""
        return self._parts[0] if len(self._parts) == 1 else torch.cat(self._parts)

    def scales(self, names: Sequence[str], like: Tensor) -> Tensor:
        """The factors of ``names`` as ``like``'s dtype (1 for a layer without one), unread."""
        values = self.values().to(like)
        if list(names) == self.names:
            return values
        at = {name: i for i, name in enumerate(self.names)}
        one = torch.ones((), dtype=like.dtype, device=like.device)
        return torch.stack([values[at[n]] if n in at else one for n in names])

    def least(self) -> Unread | None:
        """The smallest factor, read when used; ``None`` without any."""
        if not self.names:
            return None
        return Unread(lambda: float(self.values().min()))


def _warn_skipped(
    step: int, reason: str, prepared: bool, restored: bool, deferred: bool = False
) -> None:
    """The warning of a skipped step.

    Args:
        step: Its number.
        reason: Why it was skipped.
        prepared: Whether it was skipped after the engines prepared it (for its
            directions, not its gradients).
        restored: Whether an inverse rebuilt on it was dropped for the one before.
        deferred: Whether its checks ran on the device and are read only now.
    """
    state = "parameters, momentum and curvature keep their last good state"
    if prepared:
        state = (
            "parameters and momentum keep their last good state, the estimate this "
            "step's statistics"
        )
        if restored:
            state += "; the inverse rebuilt at this step is dropped and the one before it restored"
        state += "; if this repeats, raise the damping"
    later = " (its checks ran on the device and were read later)" if deferred else ""
    warnings.warn(f"Step {step} skipped: {reason}; {state}{later}.", RuntimeWarning, stacklevel=4)


class _RankMeanProducts:
    """Exact curvature products of the ranks' batches, averaged over the ranks."""

    def __init__(self, products: CurvatureProducts, sync: ReplicaSync) -> None:
        self._products, self._sync = products, sync

    def capture(self) -> AbstractContextManager[Any]:
        return self._products.capture()

    def ggn_gram(self, directions: Sequence[Mapping[str, Tensor]]) -> Tensor:
        return self._sync.mean(self._products.ggn_gram(directions))


def _stats_scale(grad_scaler: Any, accumulation_steps: int) -> Callable[[], float] | None:
    if grad_scaler is None and accumulation_steps == 1:
        return None

    def scale() -> float:
        loss_scale = float(grad_scaler.get_scale()) if grad_scaler is not None else 1.0
        return accumulation_steps / loss_scale

    return scale
