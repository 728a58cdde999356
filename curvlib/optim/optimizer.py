r"""The generic preconditioned optimizer, for any extractor and approximation.

One step, for the parameters $\theta_l = [W_l \mid b_l]$ of every curvature layer:

1. $\nabla_l$ is the gradient (plus $\omega\theta_l$ for L2 weight decay $\omega$);
2. $\Delta_l = (C_l + \lambda I)^{-1}\nabla_l$ from the current inverse;
3. $\nu$ is the KL-clipping factor ([`kl_clip_factor`][curvlib.optim.kernels.kl_clip_factor]);
4. momentum $\mu$ acts on $\nu\Delta_l$ exactly as ``torch.optim.SGD`` acts on the
   gradient (heavy ball or Nesterov, buffers in ``state[p]``);
5. $\theta_l \leftarrow \theta_l - \eta\,\text{step}_l$ (after
   $\theta_l \leftarrow (1 - \eta\omega)\theta_l$ for decoupled weight decay).

Trainable parameters outside every curvature layer take the same step without
preconditioning (plain SGD with the group's momentum and weight decay).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from curvlib.core.layout import CurvatureLayer
from curvlib.core.protocols import CurvatureApprox, Extractor
from curvlib.optim.engine import CurvatureEngine, all_finite, floating_to, layer_grads
from curvlib.optim.hyper import LevenbergMarquardt, Schedule, check_positive
from curvlib.optim.kernels import kl_clip_factor, momentum_direction

CURVATURE_GROUP = "curvature"
OTHER_GROUP = "other"


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
        extractor: Computes the statistics ``approx`` needs.
        approx: The curvature approximation.
        lr: Learning rate $\eta$ (a float; schedule it with torch LR schedulers).
        damping: $\lambda$: constant, callable of the step, or
            [`LevenbergMarquardt`][curvlib.optim.hyper.LevenbergMarquardt].
        kl_clip: KL-clipping bound $c$; ``None`` disables it.
        kl_clip_lr_squared: Use $\eta^2$ in the clip (Ba et al.); ``False`` for the
            KPSVD paper's variant without it.
        momentum: Momentum $\mu$ on the preconditioned direction.
        nesterov: Nesterov momentum.
        weight_decay: $\omega$.
        decoupled_weight_decay: Decay the weights directly (AdamW-style) instead of
            adding $\omega\theta$ to the gradient before preconditioning.
        t_cov: Steps between statistics updates.
        t_inv: Steps between inverse rebuilds.
        grad_scaler: A ``torch.amp.GradScaler`` whose scale empirical statistics
            must undo; call ``scaler.unscale_(opt)`` before ``opt.step()``.
        accumulation_steps: Micro-batches per step when the loss is divided by this
            number for gradient accumulation (empirical statistics undo the factor).

    Raises:
        ValueError: For bad hyper-parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        extractor: Extractor,
        approx: CurvatureApprox,
        *,
        lr: float = 0.1,
        damping: Schedule | LevenbergMarquardt = 1e-3,
        kl_clip: float | None = 1e-2,
        kl_clip_lr_squared: bool = True,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        t_cov: int = 1,
        t_inv: int = 1,
        grad_scaler: Any = None,
        accumulation_steps: int = 1,
    ) -> None:
        check_positive("lr", lr)
        check_positive("momentum", momentum, allow_zero=True)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        if kl_clip is not None:
            check_positive("kl_clip", kl_clip)
        if nesterov and momentum <= 0.0:
            raise ValueError("nesterov=True needs momentum > 0.")
        if isinstance(accumulation_steps, bool) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps!r}.")
        self.layers: tuple[CurvatureLayer, ...] = extractor.layout.layers
        curvature_params = [p for layer in self.layers for p in layer.parameters]
        ids = {id(p) for p in curvature_params}
        other_params = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        groups: list[dict[str, Any]] = [{"params": curvature_params, "kind": CURVATURE_GROUP}]
        if other_params:
            groups.append({"params": other_params, "kind": OTHER_GROUP})
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(groups, defaults)
        self.kl_clip = kl_clip
        self.kl_clip_lr_squared = kl_clip_lr_squared
        scale = self._stats_scale(grad_scaler, accumulation_steps)
        self.engine = CurvatureEngine(
            extractor, approx, damping=damping, t_cov=t_cov, t_inv=t_inv, stats_scale=scale
        )
        self.skipped_steps = 0
        self.last_stats: dict[str, Any] = {}

    @staticmethod
    def _stats_scale(grad_scaler: Any, accumulation_steps: int) -> Callable[[], float] | None:
        if grad_scaler is None and accumulation_steps == 1:
            return None

        def scale() -> float:
            loss_scale = float(grad_scaler.get_scale()) if grad_scaler is not None else 1.0
            return accumulation_steps / loss_scale

        return scale

    # -- the training-loop API ----------------------------------------------------

    @contextmanager
    def record(self) -> Iterator[None]:
        """Run the forward and backward pass in this block on every step.

        Statistics are computed only on the steps where they are due; on the
        others the block costs nothing.
        """
        with self.engine.record():
            yield

    @property
    def approx(self) -> CurvatureApprox:
        """The curvature approximation."""
        return self.engine.approx

    @property
    def damping(self) -> float:
        r"""The damping $\lambda$ of the current step."""
        return self.engine.damping

    @property
    def lm_due(self) -> bool:
        """Whether Levenberg–Marquardt damping adapts at the next ``step`` (needs a closure)."""
        return self.engine.lm_due

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
            The closure's loss before the step where it was evaluated, else ``None``.

        Raises:
            RuntimeError: Without gradients, without a ``record()`` block on a step
                that needs statistics, or without a closure when LM damping adapts.
        """
        start = time.perf_counter()
        engine = self.engine
        self._check_grads()
        grads = layer_grads(self.layers)
        if not all_finite(grads) or not self._other_grads_finite():
            return self._skip("the gradient contains NaN/Inf")
        lm_due = engine.lm_due
        if lm_due and closure is None:
            raise RuntimeError(
                "Levenberg-Marquardt damping adapts at this step: call "
                "opt.step(closure) with a closure that returns the loss of this batch."
            )
        # The closure costs a forward pass: evaluate it only where LM needs it.
        loss_before = float(closure()) if lm_due and closure is not None else None
        engine.prepare()
        group = self._group(CURVATURE_GROUP)
        assert group is not None
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        if wd and not group["decoupled_weight_decay"]:
            for layer in self.layers:
                grads[layer.name] = grads[layer.name] + wd * layer.to_matrix(
                    *(p.detach() for p in layer.parameters)
                )
        directions = engine.precondition(grads)
        nu = kl_clip_factor(grads, directions, lr, self.kl_clip, self.kl_clip_lr_squared)
        update_start = time.perf_counter()
        deltas = self._apply(group, {n: nu * d for n, d in directions.items()}, lm_due)
        other = self._group(OTHER_GROUP)
        if other is not None:
            self._sgd_step(other)
        engine.timings["update"] = engine.timings.get("update", 0.0) + (
            time.perf_counter() - update_start
        )
        ratio = None
        if lm_due:
            assert closure is not None and loss_before is not None
            loss_after = float(closure())
            predicted = engine.quadratic_model(grads, deltas)
            ratio = (loss_after - loss_before) / predicted if predicted < 0 else math.nan
            engine.adapt_damping(ratio)
        engine.finish()
        self._telemetry(nu, ratio, time.perf_counter() - start)
        return loss_before

    def _check_grads(self) -> None:
        missing = [layer.name for layer in self.layers if layer.weight.grad is None]
        if missing:
            raise RuntimeError(
                f"No gradients for layers {missing}: call loss.backward() (inside "
                "`with opt.record():`) before opt.step()."
            )

    def _other_grads_finite(self) -> bool:
        other = self._group(OTHER_GROUP)
        if other is None:
            return True
        return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in other["params"])

    def _skip(self, reason: str) -> None:
        self.skipped_steps += 1
        self.engine.discard()
        warnings.warn(
            f"Step {self.engine.step_count} skipped: {reason}; parameters, momentum and "
            "curvature keep their last good state.",
            RuntimeWarning,
            stacklevel=3,
        )
        self.engine.finish()
        self.last_stats = {"skipped": True, "skipped_steps": self.skipped_steps}

    def _apply(
        self, group: dict[str, Any], directions: Mapping[str, Tensor], want_deltas: bool
    ) -> dict[str, Tensor]:
        """Momentum and parameter update of the curvature layers.

        Returns:
            The parameter changes as ``[W | b]`` matrices when ``want_deltas``.
        """
        lr, momentum = float(group["lr"]), float(group["momentum"])
        wd = float(group["weight_decay"]) if group["decoupled_weight_decay"] else 0.0
        deltas: dict[str, Tensor] = {}
        for layer in self.layers:
            parts = layer.from_matrix(directions[layer.name])
            changes = []
            for p, d in zip(layer.parameters, parts, strict=False):
                assert d is not None
                step, self.state[p]["momentum_buffer"] = momentum_direction(
                    d, self.state[p].get("momentum_buffer"), momentum, bool(group["nesterov"])
                )
                if want_deltas:
                    changes.append(-lr * (step + wd * p))
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(step.to(p.dtype), alpha=-lr)
            if want_deltas:
                deltas[layer.name] = layer.to_matrix(*changes)
        return deltas

    def _sgd_step(self, group: dict[str, Any]) -> None:
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        decoupled = bool(group["decoupled_weight_decay"])
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad if decoupled or not wd else p.grad.add(p, alpha=wd)
            step, self.state[p]["momentum_buffer"] = momentum_direction(
                grad,
                self.state[p].get("momentum_buffer"),
                float(group["momentum"]),
                bool(group["nesterov"]),
            )
            if decoupled and wd:
                p.mul_(1.0 - lr * wd)
            p.add_(step, alpha=-lr)

    def _telemetry(self, nu: float, ratio: float | None, total: float) -> None:
        engine = self.engine
        self.last_stats = {
            "skipped": False,
            "step": engine.step_count,
            "kl_clip_factor": nu,
            "damping": engine.damping,
            "lm_ratio": ratio,
            "skipped_steps": self.skipped_steps,
            "skipped_updates": engine.skipped_updates,
            "inverse_failures": engine.inverse_failures,
            "time_step": total,
            **{f"time_{k}": v for k, v in engine.timings.items()},
        }
        engine.timings = {}

    # -- checkpoints --------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer state plus the curvature engine (estimates, inverse, RNG)."""
        state = super().state_dict()
        state["curvature"] = self.engine.state_dict()
        state["skipped_steps"] = self.skipped_steps
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore everything ``state_dict()`` saved; the run continues exactly."""
        state_dict = dict(state_dict)
        curvature = state_dict.pop("curvature")
        self.skipped_steps = int(state_dict.pop("skipped_steps"))
        super().load_state_dict(state_dict)
        # Like torch's per-parameter state, the estimate follows the parameters' device.
        self.engine.load_state_dict(floating_to(curvature, self.layers[0].weight.device))
