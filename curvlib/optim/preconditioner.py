r"""Preconditioner mode: rewrite ``.grad`` so any torch optimizer takes the natural-gradient step.

```python
precond = GradientPreconditioner(...)  # or curvlib.NaturalGradientPreconditioner(model, ...)
sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
for x, y in loader:
    sgd.zero_grad()
    with precond.record():
        loss_fn(model(x), y).backward()
    precond.step()  # .grad <- nu * (C + lambda I)^{-1} grad for every curvature layer
    sgd.step()
```

This is how the published code of these methods is usually used. Parameters
outside the curvature layers keep their gradient. Damping (per approximation,
[`default_damping`][curvlib.optim.defaults.default_damping]), intervals and
warm-up default to the optimizer's ([`DEFAULTS`][curvlib.optim.defaults.DEFAULTS]); the
KL clip is off unless ``kl_clip`` is given ($\nu = 1$), because the clip needs
the learning rate of the optimizer that takes the step: pass it as ``lr``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor

from curvlib.core.checkpoint import RECORD_KEY, check_record, layer_record, writer_record
from curvlib.core.layout import CurvatureLayer
from curvlib.core.protocols import CurvatureApprox, Extractor, ReplicaSync
from curvlib.core.stats import all_finite, finite_flag
from curvlib.optim.defaults import DEFAULTS, default_damping, default_t_inv
from curvlib.optim.deferred import (
    MAX_PENDING,
    check_setting,
    defers,
    device_clip,
    segment_dots,
)
from curvlib.optim.engine import CurvatureEngine, floating_to, layer_grads
from curvlib.optim.hyper import DampingWarmup, LevenbergMarquardt, Schedule, check_positive
from curvlib.optim.kernels import kl_clip_factor
from curvlib.optim.report import StepStats, Unread, read_numbers


@dataclass
class _Pending:
    """A step whose gradients' check and KL clip were left on the device."""

    step: int
    finite: Tensor
    nu: Tensor
    clip: float | None = None
    skipped_steps: int | None = None


class GradientPreconditioner:
    r"""Replaces the gradient of every curvature layer by $\nu (C + \lambda I)^{-1}\nabla$.

    Args:
        extractor: Computes the statistics ``approx`` needs.
        approx: The curvature approximation.
        damping: $\lambda$: constant, callable of the step or
            [`DampingWarmup`][curvlib.optim.DampingWarmup] (Levenberg–Marquardt
            needs the step the optimizer takes: use ``PreconditionedOptimizer``);
            ``None`` (the default): the approximation's default
            ([`default_damping`][curvlib.optim.defaults.default_damping]).
        kl_clip: KL-clipping bound $c$; ``None`` (default) disables it, since
            only the optimizer taking the step knows its learning rate.
        lr: The learning rate the wrapped optimizer uses, for the KL clip.
        kl_clip_lr_squared: Use $\eta^2$ in the clip.
        t_cov: Steps between statistics updates.
        t_inv: Steps between inverse rebuilds; ``None`` (the default): the
            approximation's default
            ([`default_t_inv`][curvlib.optim.defaults.default_t_inv]).
        warmup: Statistics and inverses also at the steps before it that are
            powers of two, as in the optimizer.
        refresh_on_move: Statistics and inverses also on any step where some
            layer's weights have moved by at least this fraction of their norm
            since the last statistics, as in the optimizer (0 disables it).
        sync: Data-parallel training on several ranks
            ([`ReplicaSync`][curvlib.core.ReplicaSync]): statistics of every
            rank's samples, and gradients averaged over the ranks before they
            are preconditioned (unless DDP did).
        deferred_checks: As the optimizer's: on a step without statistics or
            inverse due, the gradients' check and the KL clip stay on the
            device (a gradient with NaN/Inf is still left as it is, through a
            select), and ``skipped_steps``, ``last_stats["kl_clip_factor"]``
            and ``["skipped_steps"]`` are read when used. ``"auto"`` (the
            default): where the curvature layers are not on the CPU.
        overlap_inverse: As the optimizer's: steps during which a rebuilt
            inverse is built in the background before it is used (0: at once).

    Attributes:
        sync_params: The parameters whose gradients ``sync`` averages in
            ``step()`` (default: those of the curvature layers;
            ``NaturalGradientPreconditioner`` sets every trainable parameter of
            the model, which the wrapped optimizer steps too).
    """

    def __init__(
        self,
        extractor: Extractor,
        approx: CurvatureApprox,
        *,
        damping: Schedule | DampingWarmup | None = None,
        kl_clip: float | None = None,
        lr: float = 1.0,
        kl_clip_lr_squared: bool = True,
        t_cov: int = DEFAULTS.t_cov,
        t_inv: int | None = None,
        warmup: int = DEFAULTS.warmup,
        refresh_on_move: float = DEFAULTS.refresh_on_move,
        sync: ReplicaSync | None = None,
        deferred_checks: bool | Literal["auto"] = "auto",
        overlap_inverse: int = 0,
    ) -> None:
        if isinstance(damping, LevenbergMarquardt):
            raise TypeError(
                "Levenberg-Marquardt damping needs the step taken: use PreconditionedOptimizer."
            )
        check_positive("lr", lr)
        if kl_clip is not None:
            check_positive("kl_clip", kl_clip)
        check_setting(deferred_checks)
        self.deferred_checks = deferred_checks
        self.layers: tuple[CurvatureLayer, ...] = extractor.layout.layers
        self.engine = CurvatureEngine(
            extractor,
            approx,
            damping=default_damping(approx) if damping is None else damping,
            t_cov=t_cov,
            t_inv=default_t_inv(approx) if t_inv is None else t_inv,
            warmup=warmup,
            refresh_on_move=refresh_on_move,
            sync=sync,
            overlap_inverse=overlap_inverse,
        )
        self.kl_clip, self.lr, self.kl_clip_lr_squared = kl_clip, lr, kl_clip_lr_squared
        self.sync = sync
        self.sync_params: list[torch.Tensor] = [p for la in self.layers for p in la.parameters]
        self._skipped = 0
        self._pending: list[_Pending] = []
        self.last_stats: dict[str, Any] = {}

    @property
    def skipped_steps(self) -> int:
        """Steps whose gradient had NaN/Inf (reads the deferred steps' answers)."""
        self._settle()
        return self._skipped

    @contextmanager
    def record(self) -> Iterator[None]:
        """Run the forward and backward pass in this block (statistics when due)."""
        with self.engine.record():
            yield

    @torch.no_grad()
    def step(self) -> None:
        """Rewrite ``.grad`` of the curvature layers with the preconditioned direction.

        A gradient with NaN/Inf is left as it is (with a warning) and counted as skipped.

        Raises:
            RuntimeError: Without gradients or without a due ``record()`` block.
        """
        missing = [layer.name for layer in self.layers if layer.weight.grad is None]
        if missing:
            raise RuntimeError(f"No gradients for layers {missing}: call loss.backward() first.")
        if self.sync is not None:
            self.sync.sync_gradients(self.sync_params)
        grads = layer_grads(self.layers)
        if self._defers():
            if self.engine.prepare_idle:
                return self._deferred_step(grads)
            return self._deferred_statistics_step(grads)
        self._settle()
        if not all_finite(grads.values()):
            return self._skip()
        self.engine.prepare()
        directions = self.engine.precondition(grads)
        nu = kl_clip_factor(grads, directions, self.lr, self.kl_clip, self.kl_clip_lr_squared)
        for layer in self.layers:
            weight, bias = layer.from_matrix(nu * directions[layer.name])
            for p, d in zip(layer.parameters, (weight, bias), strict=False):
                assert p.grad is not None and d is not None
                p.grad.copy_(d)
        self.engine.finish()
        self._report(nu, self._skipped)

    def _skip(self) -> None:
        """Leave a NaN/Inf gradient as it is: nothing folded in, counted, warned about."""
        self._skipped += 1
        self.engine.discard()
        self.engine.finish()
        warnings.warn("The gradient contains NaN/Inf: not preconditioned.", stacklevel=3)
        self._report(None, self._skipped, skipped=True)

    def _defers(self) -> bool:
        """Whether a step leaves its check (and the clip) on the device."""
        return defers(self.deferred_checks, self.layers)

    def _deferred_statistics_step(self, grads: dict[str, Tensor]) -> None:
        """A step that folds in statistics or rebuilds the inverse, with deferred checks.

        One read for the gradients' and statistics' finiteness (with the answers
        of the earlier deferred steps), one for the new inverse's checks
        (``CurvatureEngine.pending_inverse``); the clip is left on the device.
        """
        finite = finite_flag(grads.values())
        assert finite is not None
        flag = self.engine.statistics_flag()
        values = self._settle([finite, *([] if flag is None else [flag])])
        if not values[0]:
            return self._skip()
        if flag is not None:
            self.engine.statistics_checked(bool(values[1]))
        self.engine.prepare(ahead=self.sync is None)
        pending = self.engine.pending_inverse
        if pending is not None:
            self.engine.settle_inverse(pending.tolist())  # rebuilt, checked, where it failed
        self._deferred_step(grads, finite)

    def _deferred_step(self, grads: dict[str, Tensor], finite: Tensor | None = None) -> None:
        """``step`` on the device: the check and the clip unread, the gradients selected.

        ``finite``: the gradients' check of a step that prepared (and read it) already.
        """
        if finite is None:
            self.engine.prepare()  # nothing due: resets this step's timings only
            finite = finite_flag(grads.values())
            assert finite is not None
        directions = self.engine.precondition(grads)
        denominator = finite.new_zeros((), dtype=torch.float64)
        if self.kl_clip is not None:
            rate = self.lr * self.lr if self.kl_clip_lr_squared else 1.0
            inner = segment_dots([grads[n] for n in directions], list(directions.values()))
            denominator = inner.sum() * rate
        nu = device_clip(denominator, self.kl_clip)
        for layer in self.layers:
            weight, bias = layer.from_matrix(directions[layer.name])
            for p, d in zip(layer.parameters, (weight, bias), strict=False):
                assert p.grad is not None and d is not None
                p.grad.copy_(torch.where(finite, d * nu.to(d.dtype), p.grad))
        pending = _Pending(self.engine.step_count, finite, nu)
        self.engine.finish()
        self._pending.append(pending)
        self._report(
            Unread(lambda: self._settled(pending).clip),
            Unread(lambda: self._settled(pending).skipped_steps),
        )
        if len(self._pending) >= MAX_PENDING:
            self._settle()

    def _settled(self, step: _Pending) -> _Pending:
        """``step`` with its answer read (reading every pending step's, if not yet)."""
        if step.skipped_steps is None:
            self._settle()
        return step

    def _settle(self, head: list[Tensor] | None = None) -> list[float]:
        """Read the deferred steps' answers in one transfer; count and warn about NaN/Inf.

        Returns:
            The values of ``head`` (0-dimensional tensors on one device), read in
            the same transfer.
        """
        head = head or []
        if not self._pending and not head:
            return []
        pending, self._pending = self._pending, []
        parts = [torch.stack([t.double() for t in head])] if head else []
        parts += [torch.stack([s.finite.double(), s.nu]) for s in pending]
        if len({t.device for t in parts}) > 1:
            parts = [t.cpu() for t in parts]
        flat = torch.cat(parts).tolist()
        values, flat = flat[: len(head)], flat[len(head) :]
        for k, step in enumerate(pending):
            finite, nu = flat[2 * k : 2 * k + 2]
            if not finite:
                self._skipped += 1
                warnings.warn(
                    f"The gradient of step {step.step} contained NaN/Inf: not preconditioned "
                    "(its check ran on the device and was read later).",
                    stacklevel=4,
                )
            step.clip = nu if finite else None
            step.skipped_steps = self._skipped
        return values

    def _report(self, nu: Any, skipped_steps: Any, skipped: bool = False) -> None:
        """``last_stats`` of this step (``nu`` and ``skipped_steps`` may be unread).

        A skipped step prepared nothing: no inverse, no condition numbers, no diagnostics.
        """
        rebuilt = self.engine.inverse_rebuilt and not skipped
        diagnostics = {} if skipped else self.engine.diagnostics
        self.last_stats = StepStats(
            {
                "kl_clip_factor": nu,
                "damping": self.engine.damping,
                "inverse_rebuilt": rebuilt,
                "weights_moved": self.engine.last_moved,
                "condition_numbers": dict(self.engine.condition_numbers) if rebuilt else {},
                "diagnostics": Unread(partial(read_numbers, {"": diagnostics})),
                "skipped_steps": skipped_steps,
                "skipped_updates": self.engine.skipped_updates,
                "inverse_failures": self.engine.inverse_failures,
            }
        )

    def state_dict(self) -> dict[str, Any]:
        """The curvature engine's state (estimates, live inverse, counters) and the RNG.

        With the record of what wrote it
        ([`curvlib.core.checkpoint`][curvlib.core.checkpoint]): the
        approximation and the names and parameter shapes of the layers.
        """
        return {
            RECORD_KEY: self._record(),
            "curvature": self.engine.state_dict(),
            "extractor": self.engine.extractor.state_dict(),
            "skipped_steps": self.skipped_steps,
        }

    def _record(self) -> dict[str, Any]:
        return writer_record(
            self, approx=type(self.engine.approx).__name__, layers=layer_record(self.layers)
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()``; all or nothing.

        Raises:
            ValueError: If the checkpoint was written for another approximation
                or other layers (the message names the difference), or has no
                record; nothing is changed then.
        """
        check_record(state, self._record(), f"this {type(self).__name__}", ignore=("class",))
        self._settle()  # the steps before the load report as they were
        device = self.layers[0].weight.device
        loaded = self.engine.stage(floating_to(state["curvature"], device))
        skipped = int(state["skipped_steps"])
        if self.sync is None or self.sync.rank == 0:  # the others keep their own noise
            self.engine.extractor.load_state_dict(state["extractor"])  # all or nothing itself
        self.engine.commit(loaded)
        self._skipped = skipped
