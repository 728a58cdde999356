r"""The curvature side of a step, shared by the optimizer and the preconditioner mode.

One [`CurvatureEngine`][curvlib.optim.engine.CurvatureEngine] runs the named
steps of a second-order method on any extractor and approximation:

1. **statistics**: ``record()`` switches the extractor on for the forward and
   backward pass of the steps where statistics are due (every ``t_cov`` steps);
2. **update**: the statistics are folded into the approximation;
3. **invert**: every ``t_inv`` steps the damped inverse is rebuilt (a
   [`RefreshableApprox`][curvlib.core.protocols.RefreshableApprox] refreshes
   its expensive part then, before that step's update, and rebuilds its cheap
   inverse after every update);
4. **precondition**: gradients are multiplied by the current inverse.

Non-finite statistics skip the update with a warning, and a failed inverse
keeps the last good one: the run goes on with the last good preconditioner.

Several engines may share one extractor (one engine per parameter group of
the optimizer, each with its own approximation, damping and intervals):
[`record_statistics`][curvlib.optim.engine.record_statistics] runs the
extractor once on the steps where any of them is due and hands each due
engine the statistics of its own layers.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvlib.core.checkpoint import RECORD_KEY, check_record, layer_record, writer_record
from curvlib.core.layout import CurvatureLayer
from curvlib.core.protocols import (
    AheadInverse,
    CurvatureApprox,
    Extractor,
    Preconditioner,
    RefreshableApprox,
    ReplicaSync,
    check_approx,
)
from curvlib.core.stats import (
    CurvatureStatistics,
    FisherType,
    StatKind,
    all_finite,
    merge_statistics,
)
from curvlib.optim.hyper import (
    DampingRule,
    DampingWarmup,
    LevenbergMarquardt,
    check_damping,
    resolve,
)
from curvlib.optim.overlap import InverseBuild, check_overlap

RECORD_TIMES = ("statistics", "forward_backward")
"""Keys of the time spent in ``record()`` blocks (see ``record_statistics``)."""


def _clone(state: Any) -> Any:
    if isinstance(state, Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_clone(v) for v in state)
    return copy.copy(state)


class CurvatureEngine:
    r"""Statistics schedule, curvature updates, inverses and preconditioned directions.

    Args:
        extractor: Computes the statistics in ``record()`` blocks.
        approx: The approximation; the extractor must compute ``approx.required_stats``.
        damping: $\lambda$ of $(C + \lambda I)^{-1}$: a constant, a function of the
            step, [`LevenbergMarquardt`][curvlib.optim.hyper.LevenbergMarquardt] or
            [`DampingWarmup`][curvlib.optim.DampingWarmup].
        t_cov: Steps between statistics updates.
        t_inv: Steps between inverse rebuilds.
        stats_scale: Returns the factor that undoes a loss scale seen by
            empirical statistics (``GradScaler``, accumulation); ``None``: 1.
        layers: Names of the layers this engine preconditions; ``None``: every
            layer of the extractor. Statistics of other layers are dropped.
        warmup: Statistics and inverses also on the steps $k <$ ``warmup`` that
            are powers of two (0, 1, 2, 4, 8, ...), whatever ``t_cov`` and
            ``t_inv`` say: the curvature of the initial weights goes stale
            fastest, and doubling intervals refresh it for
            $\log_2$ ``warmup`` extra statistics steps.
        refresh_on_move: Statistics and inverses also on any step where some
            layer's weights $[W \mid b]$ have moved by at least this fraction
            of their norm since the statistics were last folded in,
            $\max_l \lVert\theta_l - \theta_l^\text{ref}\rVert /
            \lVert\theta_l^\text{ref}\rVert \ge$ ``refresh_on_move``; 0 turns
            the rule off. It keeps a copy of the layers' weights from the last
            statistics step and measures the distance once per step (one host
            synchronisation).
        sync: In data-parallel training, turns the merged statistics of a
            step into those of every rank's samples before they are folded in
            ([`ReplicaSync`][curvlib.core.ReplicaSync]; ``time_update`` includes
            it); a [`DampingWarmup`][curvlib.optim.DampingWarmup] counts the samples
            of all ranks. If it names an owner
            for every layer (``inverse_owners``), an approximation that
            ``splits_inverse`` builds the inverses of this rank's layers only,
            and ``precondition`` shares the directions (or, when the sync's
            ``broadcast`` is ``"inverses"``, one that ``shares_inverses``
            sends the inverses it built and every rank applies all of them); a
            two-time-scale approximation that ``splits_refresh`` (EKFAC)
            refreshes this rank's layers only and adopts every rank's (its
            inverse is cheap and built on every rank); and one that
            ``splits_update`` computes the expensive part of this rank's
            layers' updates (``fitted``) and folds in every rank's; one that
            ``splits_grams`` (exact natural gradient) computes this rank's
            layers' kernel blocks and builds its inverse from every rank's.
            The owners balance the approximation's ``work_cost`` per layer
            (its Kronecker factorisations where it has none).

        overlap_inverse: Steps during which a rebuilt inverse is built in the
            background before it replaces the live one; 0 (the default) builds
            it at once. The schedule, the second CUDA stream and what can
            overlap are described in [`curvlib.optim.overlap`][curvlib.optim.overlap].

    Attributes:
        last_moved: The distance ``weights_moved`` measured at the step that
            finished last (``None`` if none was measured); the optimizers report
            it as ``weights_moved`` in ``last_stats``.

    Raises:
        ValueError: For bad intervals or damping, or an extractor that does not
            compute what the approximation needs.
    """

    def __init__(
        self,
        extractor: Extractor,
        approx: CurvatureApprox,
        *,
        damping: DampingRule = 1e-3,
        t_cov: int = 1,
        t_inv: int = 1,
        stats_scale: Callable[[], float] | None = None,
        layers: Sequence[str] | None = None,
        warmup: int = 0,
        refresh_on_move: float = 0.0,
        sync: ReplicaSync | None = None,
        overlap_inverse: int = 0,
    ) -> None:
        check_approx(approx)
        check_overlap(overlap_inverse, approx, sync)
        self.overlap_inverse = overlap_inverse
        _check_intervals(t_cov, t_inv)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative int, got {warmup!r}.")
        _check_refresh_on_move(refresh_on_move)
        self.warmup = warmup
        self.refresh_on_move = float(refresh_on_move)
        # The weights at the last statistics folded in (refresh_on_move), and the
        # distance measured at step ``_moved_at[0]``.
        self._reference: list[Tensor] | None = None
        self._reference_norms: list[float] = []  # per layer, of ``_reference``
        self._moved_at: tuple[int, float] | None = None
        # The distance measured at the step that finished last (telemetry).
        self.last_moved: float | None = None
        # Samples of every statistics update accepted so far (for DampingWarmup).
        self.samples_seen = 0
        check_damping("damping", damping)
        required = frozenset(approx.required_stats)
        provided = frozenset(getattr(extractor, "required_stats", required))
        if not required <= provided:
            missing = ", ".join(sorted(k.name for k in required - provided))
            raise ValueError(
                f"The extractor does not compute {missing}, which {type(approx).__name__} "
                "needs; create it with stats=approx.required_stats."
            )
        if (
            sync is not None
            and sync.broadcast == "inverses"
            and getattr(approx, "splits_inverse", False)
            and not isinstance(approx, RefreshableApprox)
            and not getattr(approx, "shares_inverses", False)
        ):
            raise ValueError(
                f"DataParallel(broadcast='inverses') sends whole layer inverses, which "
                f"{type(approx).__name__}'s cannot be; use broadcast='directions' (the default)."
            )
        self.extractor = extractor
        self.approx = approx
        self.sync = sync
        self._owners: Mapping[str, int] | None = None
        self._owners_known = False
        # Decided once: a runtime protocol check inspects the object on every call.
        self._refreshable = isinstance(approx, RefreshableApprox)
        self.damping_rule = damping
        self.t_cov = t_cov
        self.t_inv = t_inv
        self.stats_scale = stats_scale
        self.layer_names: tuple[str, ...] | None = None if layers is None else tuple(layers)
        names = self.layer_names
        self._own_layers = tuple(
            la for la in extractor.layout.layers if names is None or la.name in names
        )
        self.step_count = 0
        self.lm_damping = damping.initial if isinstance(damping, LevenbergMarquardt) else None
        self.skipped_updates = 0
        self.inverse_failures = 0
        self.timings: dict[str, float] = {}
        self.inverse_rebuilt = False
        self.condition_numbers: dict[str, float] = {}
        self.diagnostics: dict[str, float | Tensor] = {}
        self._pending: list[CurvatureStatistics] = []
        self._recording = False
        self._precond: Preconditioner | None = None
        self._precond_damping: float | None = None
        self._precond_fresh = False
        # The estimate the live inverse was built from, once updates moved past it.
        self._snapshot: Callable[[], dict[str, Any]] | None = None
        # What this step's rebuild replaced: the inverse, its damping, freshness, snapshot
        # and condition numbers (``restore_replaced``); cleared when the step finishes.
        self._replaced: tuple[Any, ...] | None = None
        # An inverse built ahead of its check (``prepare(ahead=True)``), until ``settle_inverse``.
        self._ahead: AheadInverse | None = None
        # The inverse being built in the background (``overlap_inverse``), until it is installed.
        self._building: InverseBuild | None = None

    # -- schedule -------------------------------------------------------------

    @property
    def stats_due(self) -> bool:
        """Whether this step must record statistics."""
        return self._moved or self._warming_up or self.step_count % self.t_cov == 0

    @property
    def _inverse_due(self) -> bool:
        """Whether this step rebuilds the inverse (or, two time scales, refreshes)."""
        return (
            self._moved
            or self._precond is None
            or self._warming_up
            or self.step_count % self.t_inv == 0
        )

    @property
    def prepare_idle(self) -> bool:
        """Whether ``prepare()`` has nothing to do this step: no statistics, no inverse due."""
        return not (self.stats_due or self._pending or self._inverse_due or self._install_due)

    @property
    def _install_due(self) -> bool:
        """Whether the inverse built in the background replaces the live one this step."""
        building = self._building
        return building is not None and self.step_count >= building.step + self.overlap_inverse

    @property
    def _moved(self) -> bool:
        """Whether the weights moved by ``refresh_on_move`` since the last statistics."""
        if not self.refresh_on_move:
            return False
        distance = self.weights_moved
        return distance is not None and distance >= self.refresh_on_move

    @property
    def weights_moved(self) -> float | None:
        r"""How far the weights moved since the last statistics, measured at this step.

        $\max_l \lVert\theta_l - \theta_l^\text{ref}\rVert /
        \lVert\theta_l^\text{ref}\rVert$, where $\theta_l^\text{ref}$ are the
        weights $[W \mid b]$ of layer $l$ when the statistics were last folded
        in. Measured once per step (on first use),
        only with ``refresh_on_move``; ``None`` without it or before the first
        statistics. A layer whose reference is zero counts as moved by any change.
        """
        if not self.refresh_on_move or self._reference is None:
            return None
        if self._moved_at is not None and self._moved_at[0] == self.step_count:
            return self._moved_at[1]
        with torch.no_grad():
            changes = _layer_norms(
                torch._foreach_sub(self._weights(), self._reference), self._parameter_counts()
            )
        distance = 0.0
        for change, norm in zip(changes, self._reference_norms, strict=True):
            if change > 0:
                distance = max(distance, change / norm if norm > 0 else math.inf)
        self._moved_at = (self.step_count, distance)
        return distance

    def _weights(self) -> list[Tensor]:
        return [p.detach() for layer in self._own_layers for p in layer.parameters]

    def _parameter_counts(self) -> list[int]:
        return [len(layer.parameters) for layer in self._own_layers]

    def _take_reference(self) -> None:
        """Keep the current weights as the reference; this step keeps its distance."""
        if self.refresh_on_move:
            before = self.weights_moved
            self._set_reference([w.clone() for w in self._weights()])
            self._moved_at = None if before is None else (self.step_count, before)

    def _set_reference(self, reference: list[Tensor] | None) -> None:
        self._reference = reference
        self._reference_norms = (
            [] if reference is None else _layer_norms(reference, self._parameter_counts())
        )

    @property
    def _warming_up(self) -> bool:
        """Whether this step refreshes the curvature for the warm-up (0, 1, 2, 4, ...)."""
        k = self.step_count
        return k < self.warmup and k & (k - 1) == 0

    @property
    def damping(self) -> float:
        r"""The damping $\lambda$ of the current step."""
        if self.lm_damping is not None:
            return self.lm_damping
        rule = self.damping_rule
        if isinstance(rule, DampingWarmup):
            return rule.at(self.samples_seen)
        assert not isinstance(rule, LevenbergMarquardt)
        return resolve(rule, self.step_count)

    def configure(self, *, damping: DampingRule, t_cov: int, t_inv: int) -> None:
        """Take new hyper-parameters (edited in the optimizer's ``param_groups``).

        A new Levenberg–Marquardt rule restarts from its ``initial`` damping; the
        same rule object keeps the adapted value.

        Raises:
            ValueError: For bad intervals or damping.
        """
        _check_intervals(t_cov, t_inv)
        if damping is not self.damping_rule:
            check_damping("damping", damping)
            self.damping_rule = damping
            self.lm_damping = damping.initial if isinstance(damping, LevenbergMarquardt) else None
        self.t_cov, self.t_inv = t_cov, t_inv

    @contextmanager
    def record(self) -> Iterator[None]:
        """Run the forward and backward pass of a step in this block.

        On steps where statistics are due the extractor records them; on other
        steps the block does nothing. Several blocks before one step accumulate
        micro-batches.
        """
        if self._recording:
            raise RuntimeError("record() blocks cannot be nested.")
        self._recording = True
        try:
            with record_statistics(self.extractor, [self], self.timings, self.stats_scale):
                yield
        finally:
            self._recording = False

    def accept(self, stats: CurvatureStatistics) -> None:
        """Queue the statistics of this engine's layers for the next ``prepare()``."""
        names = self.layer_names
        if names is not None and stats.layers.keys() != set(names):
            stats = CurvatureStatistics(
                {name: stats.layers[name] for name in names}, stats.fisher_type, stats.num_samples
            )
        self._pending.append(stats)

    # -- named steps ----------------------------------------------------------

    def prepare(self, ahead: bool = False) -> None:
        """Fold in the recorded statistics and rebuild the inverse when due.

        Args:
            ahead: Build the inverse without reading its checks where the
                approximation can (``LayerwiseApprox.inverse_ahead``, in a single
                process): ``pending_inverse`` then holds the numbers to read, and
                the caller passes their values to ``settle_inverse`` before the
                step uses anything but the directions.

        Raises:
            RuntimeError: If statistics were due but no ``record()`` block ran.
        """
        if self._ahead is not None:  # a step that never read its check: read it now
            self.settle_inverse(self._ahead.numbers.tolist())
        if self.stats_due and not self._pending:
            why = (
                f"the weights moved by {self.weights_moved:.3g} >= refresh_on_move="
                f"{self.refresh_on_move:g}"
                if self._moved
                else f"t_cov={self.t_cov}"
            )
            raise RuntimeError(
                f"Curvature statistics are due at step {self.step_count} ({why}): "
                "run the forward and backward pass inside `with optimizer.record():` "
                "before step()."
            )
        self.timings = {k: v for k, v in self.timings.items() if k in RECORD_TIMES}
        self.inverse_rebuilt = False
        inverse_due = self._inverse_due
        refreshable = self._refreshable
        inverse_time = 0.0
        if inverse_due and refreshable:
            # Before the update, so that this step's statistics land in the new basis.
            start = time.perf_counter()
            self._refresh()
            inverse_time = time.perf_counter() - start
        updated = False
        if self._pending:
            start = time.perf_counter()
            stats = merge_statistics(self._pending)
            if self.sync is not None:
                owners, kinds = self._sample_owners(stats)
                stats = self.sync.reduce_statistics(stats, owners=owners, kinds=kinds)
            updated = self._update(stats)
            self._pending.clear()
            if updated:
                self._take_reference()
            self.timings["update"] = time.perf_counter() - start
        # Without any accepted statistics there is nothing to invert (the error below).
        has_estimate = updated or self._precond is not None
        if has_estimate and (inverse_due or (refreshable and updated)):
            start = time.perf_counter()
            # The warm-up's rebuilds are built at once: early curvature goes stale fastest.
            if self.overlap_inverse and self._precond is not None and not self._warming_up:
                self._install_built()  # the one started before, if any, now
                device = self._own_layers[0].weight.device
                self._building = InverseBuild.start(
                    self.approx, self.damping, self.step_count, device
                )
            else:
                self._building = None  # built from an older estimate than this one
                self._invert(ahead)
            inverse_time += time.perf_counter() - start
        elif self._install_due:
            start = time.perf_counter()
            self._install_built()
            inverse_time += time.perf_counter() - start
        if self._ahead is not None and not ahead:  # an installed one, checked here
            self.settle_inverse(self._ahead.numbers.tolist())
        if inverse_time:
            self.timings["inverse"] = inverse_time
        if self._precond is None:
            raise RuntimeError(
                "No curvature estimate to precondition with: the statistics of every step so "
                "far were rejected (see the warnings)."
            )

    def _update(self, stats: CurvatureStatistics) -> bool:
        """Fold ``stats`` into the approximation; ``False`` when they were rejected."""
        if not stats.is_finite():
            self.skipped_updates += 1
            layers = [
                name for name, layer in stats.layers.items() if not all_finite(layer.tensors())
            ]
            warnings.warn(
                f"Step {self.step_count}: curvature statistics of layers {layers} contain "
                "NaN/Inf; the update is skipped and the last good preconditioner kept.",
                RuntimeWarning,
                stacklevel=4,
            )
            return False
        owners = self._update_owners()
        # The owners' broadcast runs outside the try (a failed collective is not a failed
        # update); a part that failed on its owner arrives as NaN and is refused below.
        fitted = None if owners is None else self._shared_update(stats, owners)
        before = self._snapshot, self._precond_fresh
        if self._precond is not None and self._precond_fresh:
            # The live inverse was built from the current estimate: keep that estimate
            # so that a checkpoint taken before the next rebuild resumes exactly.
            self._snapshot = self._kept_state()
            self._precond_fresh = False
        try:
            if fitted is None:
                self.approx.update(stats)
            else:
                self.approx.update_with(stats, fitted)  # type: ignore[attr-defined]
        except RuntimeError as err:  # e.g. a factorisation that failed even with jitter
            self._snapshot, self._precond_fresh = before
            self.skipped_updates += 1
            warnings.warn(
                f"Step {self.step_count}: the curvature update failed ({err}); the update is "
                "skipped and the last good preconditioner kept.",
                RuntimeWarning,
                stacklevel=4,
            )
            return False
        self.samples_seen += stats.num_samples
        return True

    def _kept_state(self) -> Callable[[], dict[str, Any]]:
        """The approximation's ``state_dict`` as it is now, written when it is read.

        An approximation whose updates assign new tensors instead of writing into
        its old ones offers ``snapshot()``, which keeps references and no copies;
        any other is copied now.
        """
        snapshot = getattr(self.approx, "snapshot", None)
        if callable(snapshot):
            kept: Callable[[], dict[str, Any]] = snapshot()
            return kept
        state: dict[str, Any] = _clone(self.approx.state_dict())
        return lambda: state

    def _refresh(self) -> None:
        """Refresh a two-time-scale approximation; a failure is counted and warned about."""
        assert isinstance(self.approx, RefreshableApprox)
        owners = self._work_owners() if getattr(self.approx, "splits_refresh", False) else None
        # Split: the broadcast runs outside the try (a failed collective is not a failed
        # refresh), and every rank adopts the same parts, so the ranks stay identical.
        shared = None if owners is None else self._shared_refresh(owners)
        try:
            if shared is None:
                self.approx.refresh()
            else:
                self.approx.adopt_refresh(shared)  # type: ignore[attr-defined]
        except (RuntimeError, ValueError) as err:
            self.inverse_failures += 1
            warnings.warn(
                f"Step {self.step_count}: refreshing the curvature estimate failed ({err}); "
                "its expensive part (e.g. an eigenbasis) stays as it was.",
                RuntimeWarning,
                stacklevel=4,
            )

    def _shared_refresh(self, owners: Mapping[str, int]) -> dict[str, Tensor]:
        """Each due layer's refreshed part, computed by its owner and broadcast to every rank."""
        assert self.sync is not None
        approx: Any = self.approx
        due: dict[str, Tensor] = approx.refresh_due()
        owned = approx.refreshed([name for name in due if owners[name] == self.sync.rank])
        return self.sync.share_directions(owned, owners, due)

    def _shared_inverses(self, damping: float, owners: Mapping[str, int]) -> dict[str, Tensor]:
        """Every layer's packed inverse, built by its owner and broadcast to every rank."""
        assert self.sync is not None
        approx: Any = self.approx
        like: dict[str, Tensor] = approx.inverse_templates()
        mine = [name for name in like if owners[name] == self.sync.rank]
        return self.sync.share_directions(approx.inverse_parts(damping, mine), owners, like)

    def _update_owners(self) -> Mapping[str, int] | None:
        """The rank that computes the expensive part of each layer's update, or ``None``."""
        return self._work_owners() if getattr(self.approx, "splits_update", False) else None

    def _sample_owners(
        self, stats: CurvatureStatistics
    ) -> tuple[Mapping[str, int] | None, frozenset[StatKind]]:
        """The owner of each layer whose split update alone reads its per-sample statistics.

        The layers of ``update_due`` (from this rank's statistics: the same
        layers as the merged ones'), and the kinds only their owners read
        (``owner_statistics``); ``None`` where the update is not split.
        """
        kinds: frozenset[StatKind] = getattr(self.approx, "owner_statistics", frozenset())
        owners = self._update_owners()
        if owners is None or not kinds:
            return None, kinds
        approx: Any = self.approx
        return {name: owners[name] for name in approx.update_due(stats)}, kinds

    def _shared_update(
        self, stats: CurvatureStatistics, owners: Mapping[str, int]
    ) -> dict[str, Tensor]:
        """Each due layer's fitted part, computed by its owner and broadcast to every rank."""
        assert self.sync is not None
        approx: Any = self.approx
        due: dict[str, Tensor] = approx.update_due(stats)
        if not due:
            return {}
        owned = approx.fitted(stats, [name for name in due if owners[name] == self.sync.rank])
        return self.sync.share_directions(owned, owners, due)

    def _inverse_owners(self) -> Mapping[str, int] | None:
        """The rank that inverts each layer in data-parallel training, or ``None``.

        Sending directions, an approximation whose inverse ``splits_inverse`` by
        layer (not a two-time-scale one, whose split is its refresh); sending
        inverses, one that ``shares_inverses``.
        """
        if self._sends_inverses():
            splits = getattr(self.approx, "shares_inverses", False)
        else:
            splits = not self._refreshable and getattr(self.approx, "splits_inverse", False)
        return self._work_owners() if splits else None

    def _work_owners(self) -> Mapping[str, int] | None:
        """The rank that does each layer's expensive work (inverse, or refresh), or ``None``."""
        if not self._owners_known:
            self._owners_known = True
            flags = (
                "splits_inverse", "splits_refresh", "splits_update", "shares_inverses",
                "splits_grams",
            )  # fmt: skip
            if self.sync is not None and any(getattr(self.approx, f, False) for f in flags):
                cost = getattr(self.approx, "work_cost", None)
                costs = {
                    la.name: la.kronecker_cost if cost is None else float(cost(la))
                    for la in self._own_layers
                }
                self._owners = self.sync.inverse_owners(costs)
        return self._owners

    def _shared_grams(self) -> dict[str, Tensor] | None:
        """Every layer's kernel block, each computed by its owner and broadcast, or ``None``.

        For an approximation that ``splits_grams`` (exact natural gradient) in
        data-parallel training with a split; its inverse is then built from
        these on every rank. A block that failed on its owner is sent as NaN,
        so that every rank refuses the inverse alike.
        """
        if not getattr(self.approx, "splits_grams", False):
            return None
        owners = self._work_owners()
        if owners is None:
            return None
        assert self.sync is not None
        approx: Any = self.approx
        try:
            like: dict[str, Tensor] = approx.gram_templates()
        except RuntimeError:  # no estimate yet, on every rank: the inverse says so
            return None
        mine = [name for name in like if owners[name] == self.sync.rank]
        try:
            owned: dict[str, Tensor] = approx.grams(mine)
        except (RuntimeError, ValueError):
            owned = {name: torch.full_like(like[name], math.nan) for name in mine}
        return self.sync.share_directions(owned, owners, like)

    def _sends_inverses(self) -> bool:
        """Whether the owners of a split send whole inverses (not directions)."""
        return self.sync is not None and self.sync.broadcast == "inverses"

    def _direction_owners(self) -> Mapping[str, int] | None:
        """The rank that preconditions each layer's gradient and sends it, or ``None``."""
        return None if self._sends_inverses() else self._inverse_owners()

    def _invert(self, ahead: bool = False) -> None:
        damping = self.damping
        owners = self._inverse_owners()
        parts = None
        if owners is not None and self._sends_inverses():
            # The broadcast runs outside the try (a failed collective is not a failed
            # inverse); an inverse that failed on its owner arrives as NaN, refused below.
            parts = self._shared_inverses(damping, owners)
        grams = self._shared_grams()  # a broadcast too: outside the try
        build_ahead = getattr(self.approx, "inverse_ahead", None)
        try:
            drafted = None
            if ahead and owners is None and build_ahead is not None:
                drafted = build_ahead(damping)
            if drafted is not None:
                precond = drafted.preconditioner
            elif grams is not None:
                precond = self.approx.inverse(damping, grams=grams)  # type: ignore[call-arg]
            elif owners is None:
                precond = self.approx.inverse(damping)
            elif parts is not None:
                precond = self.approx.inverse_from_parts(damping, parts)  # type: ignore[attr-defined]
            else:
                assert self.sync is not None
                mine = [name for name, rank in owners.items() if rank == self.sync.rank]
                precond = self.approx.inverse(damping, layers=mine)  # type: ignore[call-arg]
        except (RuntimeError, ValueError) as err:
            self.inverse_failures += 1
            warnings.warn(
                f"Step {self.step_count}: building the damped inverse failed ({err}); the last "
                "good preconditioner is kept.",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        if self._precond is not None:
            self._replaced = (
                self._precond, self._precond_damping, self._precond_fresh, self._snapshot,
                self.condition_numbers,
            )  # fmt: skip
        self._precond, self._precond_damping = precond, damping
        self._precond_fresh, self._snapshot = True, None
        self.inverse_rebuilt = True
        if drafted is not None:  # its condition numbers are known once settled
            self._ahead, self.condition_numbers = drafted, {}
            return
        # Read here, so that an estimate computed on first access counts towards the
        # inverse's time.
        self.condition_numbers = _condition_numbers(precond)

    def _install_built(self) -> None:
        """``overlap_inverse``: make the inverse built in the background the live one.

        Waits until it is built. Its checks are read with the directions
        (``prepare(ahead=True)``) or by ``prepare``; a build that raised is
        counted and warned about, and the live inverse stays.
        """
        build, self._building = self._building, None
        if build is None:
            return
        try:
            built = build.result()
        except (RuntimeError, ValueError) as err:
            self.inverse_failures += 1
            warnings.warn(
                f"Step {self.step_count}: building the damped inverse started at step "
                f"{build.step} failed ({err}); the last good preconditioner is kept.",
                RuntimeWarning,
                stacklevel=5,
            )
            return
        self._install(built, build)

    def _install(self, built: Any, build: InverseBuild) -> None:
        """Make ``built`` (a preconditioner, or one built ahead of its checks) the live inverse."""
        self._replaced = (
            self._precond, self._precond_damping, self._precond_fresh, self._snapshot,
            self.condition_numbers,
        )  # fmt: skip
        drafted = built if hasattr(built, "settle") else None
        precond = built.preconditioner if drafted is not None else built
        self._precond, self._precond_damping = precond, build.damping
        # Built from an earlier estimate: a checkpoint keeps that estimate to rebuild it.
        self._precond_fresh, self._snapshot = False, build.source.state_dict
        self.inverse_rebuilt = True
        self._ahead = drafted
        self.condition_numbers = {} if drafted is not None else _condition_numbers(precond)

    @property
    def pending_inverse(self) -> Tensor | None:
        """The checks of an inverse built ahead of them (``prepare(ahead=True)``), unread.

        A 1-D float64 tensor on the device, for the caller to read with its own
        numbers and pass to ``settle_inverse``; ``None`` when there is none.
        """
        return None if self._ahead is None else self._ahead.numbers

    def settle_inverse(self, values: list[float]) -> bool:
        """The values of ``pending_inverse``: whether the inverse built ahead stands.

        Where a layer's draft failed (a factorisation that needs jitter) the
        inverse is built again with the checked path, which retries with jitter
        (reading the device as ``prepare`` does without ``ahead``): the
        directions computed with the failed one must then be computed again.

        Returns:
            ``True`` when the inverse stands (its condition numbers are now set),
            ``False`` when it was rebuilt.
        """
        ahead, self._ahead = self._ahead, None
        assert ahead is not None, "no inverse was built ahead"
        start = time.perf_counter()
        if ahead.settle(values):
            self.condition_numbers = _condition_numbers(ahead.preconditioner)
            return True
        # Back to the state before the failed build, then the checked one.
        if self._replaced is not None:
            (
                self._precond, self._precond_damping, self._precond_fresh, self._snapshot,
                self.condition_numbers,
            ) = self._replaced  # fmt: skip
            self._replaced = None
        else:
            self._precond, self._precond_damping = None, None
        self._invert()
        self.timings["inverse"] = self.timings.get("inverse", 0.0) + time.perf_counter() - start
        if self._precond is None:
            raise RuntimeError(
                "No curvature estimate to precondition with: building the first inverse failed "
                "(see the warnings)."
            )
        return False

    def precondition(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Multiply per-layer gradient matrices by the current damped inverse."""
        assert self._precond is not None, "prepare() first"
        start = time.perf_counter()
        owners = self._direction_owners()
        if owners is None:
            out = self._precond.apply(grads)
        else:
            assert self.sync is not None
            rank = self.sync.rank
            mine = self._precond.apply({n: g for n, g in grads.items() if owners[n] == rank})
            out = self.sync.share_directions(mine, owners, grads)
        self.timings["precondition"] = time.perf_counter() - start
        # Optional per-step numbers of the preconditioner (e.g. a two-level correction's);
        # those still on the device stay there until the telemetry is read.
        numbers = getattr(self._precond, "diagnostics", None)
        self.diagnostics = (
            {str(k): v if isinstance(v, Tensor) else float(v) for k, v in numbers.items()}
            if isinstance(numbers, Mapping)
            else {}
        )
        return out

    def quadratic_model(self, grads: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> float:
        r"""$M(\delta) = \nabla^\top\delta + \frac12 \delta^\top (C + \lambda I)\delta$."""
        curv = self.approx.matvec(delta)
        value = 0.0
        for name, d in delta.items():
            value += float((grads[name] * d).sum())
            value += 0.5 * float((d * (curv[name] + self._precond_damping_or_current() * d)).sum())
        return value

    def _precond_damping_or_current(self) -> float:
        return self._precond_damping if self._precond_damping is not None else self.damping

    def adapt_damping(self, ratio: float) -> None:
        """Apply the Levenberg–Marquardt rule with reduction ratio ``ratio``."""
        assert isinstance(self.damping_rule, LevenbergMarquardt) and self.lm_damping is not None
        self.lm_damping = self.damping_rule.adapt(self.lm_damping, ratio)

    @property
    def lm_due(self) -> bool:
        """Whether Levenberg–Marquardt adapts the damping on this step."""
        rule = self.damping_rule
        return isinstance(rule, LevenbergMarquardt) and self.step_count % rule.interval == 0

    def finish(self) -> None:
        """Count the step (after the parameter update)."""
        measured = self._moved_at
        self.last_moved = (
            measured[1] if measured is not None and measured[0] == self.step_count else None
        )
        self.step_count += 1
        self._replaced = None

    def restore_replaced(self) -> bool:
        """Put back the inverse that this step's rebuild replaced, its directions being broken.

        The estimate keeps this step's update; the next rebuild starts from it.
        Counted in ``inverse_failures``.

        Returns:
            Whether this step rebuilt the inverse over an earlier one (else nothing changes).
        """
        if self._replaced is None:
            return False
        (
            self._precond, self._precond_damping, self._precond_fresh, self._snapshot,
            self.condition_numbers,
        ) = self._replaced  # fmt: skip
        self._replaced = None
        self.inverse_rebuilt = False
        self.inverse_failures += 1
        return True

    def discard(self) -> None:
        """Drop the statistics recorded for a step that is skipped."""
        self._pending.clear()

    def statistics_flag(self) -> Tensor | None:
        """Whether the statistics ``prepare`` will fold in are finite, on the device, unread.

        For the optimizer, which reads it with the gradients' check in one
        transfer and passes the answer to ``statistics_checked``. ``None`` when
        there are no statistics, or when they are reduced over the ranks first.
        """
        if not self._pending or self.sync is not None:
            return None
        self._pending[:] = [merge_statistics(self._pending)]
        return self._pending[0].finite_flag()

    def statistics_checked(self, finite: bool) -> None:
        """The answer to ``statistics_flag``, for ``prepare`` to use without reading again."""
        self._pending[0].known_finite(finite)

    # -- checkpoints ------------------------------------------------------------

    @property
    def precond_damping(self) -> float | None:
        r"""The $\lambda$ of the live inverse (``None`` before the first one)."""
        return self._precond_damping

    def state_dict(self) -> dict[str, Any]:
        """Counters, damping, estimate and the state of the live inverse.

        With the record of what wrote it
        ([`curvlib.core.checkpoint`][curvlib.core.checkpoint]): the
        approximation's class and the names and parameter shapes of the layers.
        The shared extractor's random state is saved by the owner of the
        extractor (the optimizer or preconditioner), once.
        """
        return {
            RECORD_KEY: self.checkpoint_record(),
            "step_count": self.step_count,
            "lm_damping": self.lm_damping,
            "samples_seen": self.samples_seen,
            "skipped_updates": self.skipped_updates,
            "inverse_failures": self.inverse_failures,
            "approx": self.approx.state_dict(),
            "precond_damping": self._precond_damping,
            "has_precond": self._precond is not None,
            "inverse_source": (
                None if self._precond_fresh or self._snapshot is None else self._snapshot()
            ),
            "move_reference": None if self._reference is None else list(self._reference),
            # ``overlap_inverse``: the estimate and damping of the inverse being built.
            "building": None
            if self._building is None
            else {
                "source": self._building.source.state_dict(),
                "damping": self._building.damping,
                "step": self._building.step,
            },
        }

    def checkpoint_record(self) -> dict[str, Any]:
        """The record of what wrote this engine's ``state_dict`` (checked on loading)."""
        return writer_record(
            self, approx=type(self.approx).__name__, layers=layer_record(self._own_layers)
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from ``state_dict()``, rebuilding the live inverse from its own source.

        All or nothing: the state is checked, loaded into a copy of the
        approximation and its inverse built before the engine changes.

        Raises:
            ValueError: If another approximation or other layers wrote ``state``
                (the message names the difference).
        """
        self.commit(self.stage(state))

    def stage(self, state: Mapping[str, Any]) -> LoadedEngine:
        """Check ``state`` and build everything ``load_state_dict`` installs; change nothing.

        Raises:
            ValueError: If another approximation or other layers wrote ``state``.
        """
        check_record(state, self.checkpoint_record(), "this curvature engine", ignore=("class",))
        approx = copy.deepcopy(self.approx)
        approx.load_state_dict(state["approx"])
        damping = state["precond_damping"]
        precond, snapshot, fresh = None, None, False
        if state["has_precond"]:
            source = state["inverse_source"]
            if source is None:
                precond, fresh = approx.inverse(damping), True
            else:
                builder = copy.deepcopy(approx)
                builder.load_state_dict(source)
                precond, snapshot = builder.inverse(damping), _clone(source)
        # The inverse that was being built (``overlap_inverse``), built now; an engine
        # that does not overlap builds its next inverse at its next rebuild instead.
        building = None
        saved = state.get("building")  # absent: written before overlapped inverses
        if saved is not None and self.overlap_inverse:
            estimate = copy.deepcopy(approx)
            estimate.load_state_dict(saved["source"])
            built = estimate.inverse(saved["damping"])
            building = InverseBuild.ready(estimate, saved["damping"], int(saved["step"]), built)
        return LoadedEngine(
            step_count=int(state["step_count"]),
            lm_damping=state["lm_damping"],
            # Written before the count existed: that run had no damping warm-up.
            samples_seen=int(state.get("samples_seen", _warmup_samples(self.damping_rule))),
            skipped_updates=int(state["skipped_updates"]),
            inverse_failures=int(state["inverse_failures"]),
            approx=approx,
            approx_state=state["approx"],
            precond=precond,
            precond_damping=damping,
            precond_fresh=fresh,
            snapshot=snapshot,
            reference=_loaded_reference(state.get("move_reference"), self._weights()),
            building=building,
        )

    def commit(self, loaded: LoadedEngine) -> None:
        """Install what ``stage`` built.

        The approximation object stays the same (callers may hold it): it takes
        over the attributes of the staged copy, which cannot fail.
        """
        if hasattr(self.approx, "__dict__"):
            vars(self.approx).update(vars(loaded.approx))
        else:  # __slots__: load again what loaded into the staged copy
            self.approx.load_state_dict(loaded.approx_state)
        self.step_count, self.lm_damping = loaded.step_count, loaded.lm_damping
        self.samples_seen = loaded.samples_seen
        self.skipped_updates, self.inverse_failures = (
            loaded.skipped_updates,
            loaded.inverse_failures,
        )
        self._pending.clear()
        self._precond, self._precond_damping = loaded.precond, loaded.precond_damping
        source = loaded.snapshot
        self._precond_fresh = loaded.precond_fresh
        self._snapshot = None if source is None else (lambda: source)
        # Written without the rule (or before it existed): the next statistics take one.
        self._set_reference(loaded.reference if self.refresh_on_move else None)
        self._moved_at = None
        self._building, self._ahead = loaded.building, None


@dataclass(frozen=True)
class LoadedEngine:
    """The checked and built state of a [`CurvatureEngine`][curvlib.optim.engine.CurvatureEngine].

    Returned by ``CurvatureEngine.stage`` and installed by ``commit``, so that an
    owner of several engines changes none of them unless all load.
    """

    step_count: int
    lm_damping: float | None
    samples_seen: int
    skipped_updates: int
    inverse_failures: int
    approx: CurvatureApprox
    approx_state: Any
    precond: Preconditioner | None
    precond_damping: float | None
    precond_fresh: bool
    snapshot: Any
    reference: list[Tensor] | None = None
    building: InverseBuild | None = None


def _condition_numbers(precond: Preconditioner) -> dict[str, float]:
    """A preconditioner's optional per-layer condition estimates (``{}`` without)."""
    numbers = getattr(precond, "condition_numbers", None)
    return {str(k): float(v) for k, v in numbers.items()} if isinstance(numbers, Mapping) else {}


def _warmup_samples(rule: Any) -> int:
    return rule.samples if isinstance(rule, DampingWarmup) else 0


def _layer_norms(tensors: Sequence[Tensor], counts: Sequence[int]) -> list[float]:
    """The norm of each layer's tensors taken together (``counts`` tensors per layer).

    One ``foreach`` pass and one transfer to the host for all layers.
    """
    norms = list(torch._foreach_norm(list(tensors)))
    if len({t.device for t in norms}) > 1:
        norms = [t.cpu() for t in norms]
    flat = torch.stack([t.to(torch.float64) for t in norms]).tolist()
    out, start = [], 0
    for count in counts:
        out.append(math.hypot(*flat[start : start + count]))
        start += count
    return out


def _loaded_reference(saved: Any, weights: Sequence[Tensor]) -> list[Tensor] | None:
    """The saved reference weights of ``refresh_on_move``, checked against the layers'.

    Raises:
        ValueError: If their number or shapes differ from the layers' parameters.
    """
    if saved is None:
        return None
    shapes = [tuple(t.shape) for t in saved]
    if shapes != [tuple(w.shape) for w in weights]:
        raise ValueError(
            f"The checkpoint's reference weights (shapes {shapes}) do not match this engine's "
            f"layers ({[tuple(w.shape) for w in weights]})."
        )
    return [
        t.detach().to(device=w.device, dtype=w.dtype).clone()
        for t, w in zip(saved, weights, strict=True)
    ]


def _check_refresh_on_move(value: Any) -> None:
    """Refuse a ``refresh_on_move`` that is not a finite number >= 0.

    Raises:
        ValueError: Naming the value and what it means.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(
            "refresh_on_move must be a finite number >= 0 (the relative change of a layer's "
            f"weights that triggers new statistics; 0 turns it off), got {value!r}."
        )


def _check_intervals(t_cov: Any, t_inv: Any) -> None:
    for name, value in (("t_cov", t_cov), ("t_inv", t_inv)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


@contextmanager
def record_statistics(
    extractor: Extractor,
    engines: Sequence[CurvatureEngine],
    timings: dict[str, float],
    stats_scale: Callable[[], float] | None = None,
) -> Iterator[None]:
    """Run one forward and backward pass, with statistics for the engines that are due.

    When no engine is due the block runs untouched. Otherwise the extractor
    records once (for all its layers), empirical statistics are rescaled by
    ``stats_scale()``, and every due engine receives those of its own layers.

    Args:
        extractor: The shared extractor.
        engines: The engines it serves.
        timings: Receives the wall time of the block: under ``"statistics"`` when
            statistics were recorded (forward, backward and the extraction, which
            runs inside the backward and cannot be timed apart), else under
            ``"forward_backward"``.
        stats_scale: Factor that undoes a loss scale seen by empirical statistics.
    """
    start = time.perf_counter()
    due = [engine for engine in engines if engine.stats_due]
    if not due:
        yield
        timings["forward_backward"] = timings.get("forward_backward", 0.0) + (
            time.perf_counter() - start
        )
        return
    with extractor.collect():
        yield
    stats = extractor.statistics()
    if extractor.fisher_type is FisherType.EMPIRICAL and stats_scale is not None:
        stats = stats.scaled(float(stats_scale()))
    for engine in due:
        engine.accept(stats)
    timings["statistics"] = timings.get("statistics", 0.0) + (time.perf_counter() - start)


def floating_to(state: Any, device: torch.device) -> Any:
    """Move the floating-point tensors of a nested state to ``device``.

    Random-generator states (``uint8``) and integer counters stay where they are:
    ``torch.Generator.set_state`` takes a CPU byte tensor on every device.
    """
    if isinstance(state, Tensor):
        return state.to(device) if state.is_floating_point() else state
    if isinstance(state, Mapping):
        return {k: floating_to(v, device) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(floating_to(v, device) for v in state)
    return state


def layer_grads(layers: Iterable[CurvatureLayer]) -> dict[str, Tensor]:
    """The ``[W | b]`` gradient matrices of curvature layers, keyed by name."""
    return {layer.name: layer.grad_matrix() for layer in layers}
