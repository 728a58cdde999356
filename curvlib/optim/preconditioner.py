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
from typing import Any

import torch

from curvlib.core.checkpoint import RECORD_KEY, check_record, layer_record, writer_record
from curvlib.core.layout import CurvatureLayer
from curvlib.core.protocols import CurvatureApprox, Extractor, ReplicaSync
from curvlib.core.stats import all_finite
from curvlib.optim.defaults import DEFAULTS, default_damping
from curvlib.optim.engine import CurvatureEngine, floating_to, layer_grads
from curvlib.optim.hyper import DampingWarmup, LevenbergMarquardt, Schedule, check_positive
from curvlib.optim.kernels import kl_clip_factor
from curvlib.optim.report import read_numbers


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
        t_inv: Steps between inverse rebuilds.
        warmup: Statistics and inverses also at the steps before it that are
            powers of two, as in the optimizer.
        refresh_on_move: Statistics and inverses also on any step where some
            layer's weights have moved by at least this fraction of their norm
            since the last statistics, as in the optimizer (0 disables it).
        sync: Data-parallel training on several ranks
            ([`ReplicaSync`][curvlib.core.ReplicaSync]): statistics of every
            rank's samples, and gradients averaged over the ranks before they
            are preconditioned (unless DDP did).

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
        t_inv: int = DEFAULTS.t_inv,
        warmup: int = DEFAULTS.warmup,
        refresh_on_move: float = DEFAULTS.refresh_on_move,
        sync: ReplicaSync | None = None,
    ) -> None:
        if isinstance(damping, LevenbergMarquardt):
            raise TypeError(
                "Levenberg-Marquardt damping needs the step taken: use PreconditionedOptimizer."
            )
        check_positive("lr", lr)
        if kl_clip is not None:
            check_positive("kl_clip", kl_clip)
        self.layers: tuple[CurvatureLayer, ...] = extractor.layout.layers
        self.engine = CurvatureEngine(
            extractor,
            approx,
            damping=default_damping(approx) if damping is None else damping,
            t_cov=t_cov,
            t_inv=t_inv,
            warmup=warmup,
            refresh_on_move=refresh_on_move,
            sync=sync,
        )
        self.kl_clip, self.lr, self.kl_clip_lr_squared = kl_clip, lr, kl_clip_lr_squared
        self.sync = sync
        self.sync_params: list[torch.Tensor] = [p for la in self.layers for p in la.parameters]
        self.skipped_steps = 0
        self.last_stats: dict[str, Any] = {}

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
        if not all_finite(grads.values()):
            self.skipped_steps += 1
            self.engine.discard()
            self.engine.finish()
            warnings.warn("The gradient contains NaN/Inf: not preconditioned.", stacklevel=2)
            return
        self.engine.prepare()
        directions = self.engine.precondition(grads)
        nu = kl_clip_factor(grads, directions, self.lr, self.kl_clip, self.kl_clip_lr_squared)
        for layer in self.layers:
            weight, bias = layer.from_matrix(nu * directions[layer.name])
            for p, d in zip(layer.parameters, (weight, bias), strict=False):
                assert p.grad is not None and d is not None
                p.grad.copy_(d)
        self.engine.finish()
        self.last_stats = {
            "kl_clip_factor": nu,
            "damping": self.engine.damping,
            "inverse_rebuilt": self.engine.inverse_rebuilt,
            "weights_moved": self.engine.last_moved,
            "condition_numbers": dict(self.engine.condition_numbers)
            if self.engine.inverse_rebuilt
            else {},
            "diagnostics": read_numbers({"": self.engine.diagnostics})[""],
            "skipped_steps": self.skipped_steps,
            "skipped_updates": self.engine.skipped_updates,
            "inverse_failures": self.engine.inverse_failures,
        }

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
        device = self.layers[0].weight.device
        loaded = self.engine.stage(floating_to(state["curvature"], device))
        skipped = int(state["skipped_steps"])
        if self.sync is None or self.sync.rank == 0:  # the others keep their own noise
            self.engine.extractor.load_state_dict(state["extractor"])  # all or nothing itself
        self.engine.commit(loaded)
        self.skipped_steps = skipped
