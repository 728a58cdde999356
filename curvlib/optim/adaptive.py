r"""Adaptive learning rate and momentum from the exact quadratic model (``lr="auto"``).

Martens & Grosse (2015, section 7) choose the learning rate $\alpha$ and the
momentum $\mu$ of every step by minimising the quadratic model of the loss
along the span of two directions:

* $\Delta = -(C + \lambda I)^{-1}\nabla$, the preconditioned descent direction
  (the engine returns $(C + \lambda I)^{-1}\nabla$; the sign is flipped here, so
  a good step has $\alpha > 0$);
* $\delta$, the previous update $\theta_t - \theta_{t-1}$ of the curvature
  layers (stored in ``state[p]["previous_update"]``; absent on the first step).

With the update $u = \alpha\Delta + \mu\delta$ and
$\mathcal G$ the *exact* GGN of the batch loss (not $C$),

$$M(u) = \nabla^\top u + \tfrac12 u^\top(\mathcal G + \lambda I)u
= b^\top c + \tfrac12 c^\top A c, \qquad c = (\alpha, \mu),$$

$$b = \begin{pmatrix}\nabla^\top\Delta \\ \nabla^\top\delta\end{pmatrix},\qquad
A = \begin{pmatrix}\Delta^\top\mathcal G\Delta & \Delta^\top\mathcal G\delta \\
\Delta^\top\mathcal G\delta & \delta^\top\mathcal G\delta\end{pmatrix}
+ \lambda\begin{pmatrix}\|\Delta\|^2 & \Delta^\top\delta \\
\Delta^\top\delta & \|\delta\|^2\end{pmatrix},$$

and $c^\star = -A^{-1}b$. $\lambda$ is each group's damping (plus its L2 weight
decay $\omega$, the curvature of $\frac\omega2\|\theta\|^2$), so the $\lambda$
terms are sums over groups. The products $\mathcal G\Delta$, $\mathcal G\delta$
are two Jacobian-vector products on the batch
([`CurvatureProducts`][curvlib.core.protocols.CurvatureProducts]).

**The rule** ([`adaptive_coefficients`][curvlib.optim.adaptive.adaptive_coefficients]):
a coefficient that is not ``"auto"`` stays fixed and the others minimise $M$
given it. Both free: the $2\times 2$ solve when $A$ is positive definite with
$\det A > 10^{-6} A_{11}A_{22}$; otherwise (no $\delta$, $\delta$ parallel to
$\Delta$, an indefinite or singular $A$) $\mu = 0$ and
$\alpha = -b_1/A_{11}$. A free coefficient whose diagonal entry is not positive,
or any non-finite entry, gives 0 (no step along that direction). The result is
not clipped (neither is it in the paper or in kfac-jax): $\alpha$ near 1 means
the approximation's scale agrees with $\mathcal G$.

Reference: J. Martens and R. Grosse, *Optimizing Neural Networks with
Kronecker-factored Approximate Curvature*, ICML 2015, section 7 (kfac-jax's
``use_adaptive_learning_rate`` / ``use_adaptive_momentum``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvlib.core.layout import CurvatureLayer
from curvlib.core.protocols import CurvatureProducts

AUTO = "auto"
"""The value of ``lr`` or ``momentum`` that lets the quadratic model choose it."""

SINGULAR_TOLERANCE = 1e-6
r"""$A$ counts as singular when $\det A \le$ this $\cdot A_{11}A_{22}$."""


def is_auto(value: Any) -> bool:
    """Whether a hyper-parameter value is ``"auto"``."""
    return isinstance(value, str) and value == AUTO


@dataclass(frozen=True)
class AdaptiveMode:
    """Which coefficients the quadratic model chooses.

    Attributes:
        lr: ``lr="auto"`` in every curvature group.
        momentum: ``momentum="auto"`` in every curvature group.
    """

    lr: bool
    momentum: bool

    @property
    def active(self) -> bool:
        """Whether the step needs the exact curvature products at all."""
        return self.lr or self.momentum


def adaptive_mode(groups: Sequence[Mapping[str, Any]]) -> AdaptiveMode:
    r"""The adaptive mode of the curvature ``param_groups``.

    Raises:
        ValueError: If some groups set ``"auto"`` for a coefficient and others a number
            (one $\alpha$ and one $\mu$ scale the whole update).
    """
    flags = {}
    for key in ("lr", "momentum"):
        autos = [is_auto(g[key]) for g in groups]
        if any(autos) and not all(autos):
            raise ValueError(
                f"{key}='auto' chooses one coefficient for the whole update: set it in every "
                f"curvature group or in none (groups {[g.get('name') for g in groups]})."
            )
        flags[key] = bool(autos) and all(autos)
    return AdaptiveMode(lr=flags["lr"], momentum=flags["momentum"])


@dataclass(frozen=True)
class QuadraticModel:
    r"""$M(\alpha, \mu) = b^\top c + \frac12 c^\top A c$ with $c = (\alpha, \mu)$.

    Attributes:
        b: $(\nabla^\top\Delta, \nabla^\top\delta)$.
        a: The symmetric $2\times2$ matrix $A$ as ``((A11, A12), (A12, A22))``.
    """

    b: tuple[float, float]
    a: tuple[tuple[float, float], tuple[float, float]]

    def __call__(self, alpha: float, mu: float) -> float:
        r"""The predicted change of the loss for the update $\alpha\Delta + \mu\delta$."""
        (a11, a12), (_, a22) = self.a
        return (
            self.b[0] * alpha
            + self.b[1] * mu
            + 0.5 * (a11 * alpha * alpha + 2.0 * a12 * alpha * mu + a22 * mu * mu)
        )


def adaptive_coefficients(
    model: QuadraticModel, lr: float | None, momentum: float | None
) -> tuple[float, float]:
    r"""The $(\alpha, \mu)$ that minimise the quadratic model; ``None`` marks a free one.

    See the module docstring for the rule: the $2\times2$ solve
    $c = -A^{-1}b$ when both are free and $A$ is safely positive definite, else
    the one-dimensional minimiser of the free coefficient with the other fixed
    ($\mu = 0$ when both were free).

    Args:
        model: $b$ and $A$.
        lr: A fixed $\alpha$, or ``None`` to choose it.
        momentum: A fixed $\mu$, or ``None`` to choose it.

    Returns:
        ``(alpha, mu)``.
    """
    (a11, a12), (_, a22) = model.a
    b1, b2 = model.b
    if not all(math.isfinite(v) for v in (a11, a12, a22, b1, b2)):
        return (0.0 if lr is None else lr), (0.0 if momentum is None else momentum)
    if lr is None and momentum is None:
        det = a11 * a22 - a12 * a12
        if a11 > 0.0 and a22 > 0.0 and det > SINGULAR_TOLERANCE * a11 * a22:
            return (-b1 * a22 + a12 * b2) / det, (-a11 * b2 + a12 * b1) / det
        momentum = 0.0
    if lr is None:
        assert momentum is not None
        return (-(b1 + a12 * momentum) / a11 if a11 > 0.0 else 0.0), momentum
    if momentum is None:
        return lr, (-(b2 + a12 * lr) / a22 if a22 > 0.0 else 0.0)
    return lr, momentum


@dataclass(frozen=True)
class AdaptiveGroup:
    r"""What the adaptive step needs of one curvature group.

    Attributes:
        settings: The ``param_group`` (``lr``, ``momentum``, ``weight_decay``,
            ``decoupled_weight_decay``).
        layers: Its curvature layers.
        damping: Its $\lambda$ (that of the live inverse).
    """

    settings: Mapping[str, Any]
    layers: Sequence[CurvatureLayer]
    damping: float


@dataclass(frozen=True)
class AdaptiveStep:
    r"""The chosen update $u = \alpha\Delta + \mu\delta$.

    Attributes:
        alpha: $\alpha$ (the coefficient of $\Delta$, 1 when ``lr`` is fixed and
            folded into $\Delta$).
        mu: $\mu$ (likewise for a fixed momentum).
        predicted: $M(u)$, the predicted change of the (regularised) loss.
        updates: $u$ per layer, as $[W \mid b]$ matrices.
        clip: The factor $\nu \le 1$ the KL trust region scaled $(\alpha, \mu)$ by
            (1 when it did not bind).
    """

    alpha: float
    mu: float
    predicted: float
    updates: dict[str, Tensor]
    clip: float = 1.0


def _inner(x: Mapping[str, Tensor], y: Mapping[str, Tensor], names: Sequence[str]) -> float:
    return sum(float((x[n] * y[n]).sum()) for n in names if n in x and n in y)


def previous_update(state: Mapping[Any, Mapping[str, Any]], layer: CurvatureLayer) -> Tensor | None:
    r"""The layer's stored previous update as a $[W \mid b]$ matrix, if every part has one."""
    parts: list[Tensor] = []
    for p in layer.parameters:
        part = state.get(p, {}).get("previous_update")
        if part is None:
            return None
        parts.append(part)
    return layer.to_matrix(*parts)


def adaptive_step(
    products: CurvatureProducts,
    groups: Sequence[AdaptiveGroup],
    grads: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    state: Mapping[Any, Mapping[str, Any]],
    mode: AdaptiveMode,
    kl_clip: float | None = None,
) -> AdaptiveStep:
    r"""Build $\Delta$, $\delta$ and the quadratic model, and choose $(\alpha, \mu)$.

    A fixed learning rate $\eta_g$ or momentum $\mu_g$ is folded into the
    group's part of $\Delta$ or $\delta$ (coefficient 1), so groups may differ in
    their fixed values. Costs one Jacobian-vector product for $\Delta$ and one
    for $\delta$ when there is a previous update and a non-zero momentum.

    Args:
        products: Exact GGN products on the current batch.
        groups: The curvature groups.
        grads: Per-layer gradients (L2 weight decay included).
        directions: Per-layer $(C + \lambda I)^{-1}\nabla$.
        state: The optimizer's per-parameter state (previous updates).
        mode: Which coefficients are free.
        kl_clip: The trust region $c$ of
            [`kl_trust_region`][curvlib.optim.adaptive.kl_trust_region]; ``None``
            leaves the minimiser as it is.

    Returns:
        The coefficients, the predicted change and the update.
    """
    big_delta: dict[str, Tensor] = {}
    small_delta: dict[str, Tensor] = {}
    for group in groups:
        lr = 1.0 if mode.lr else float(group.settings["lr"])
        mu = 1.0 if mode.momentum else float(group.settings["momentum"])
        for layer in group.layers:
            big_delta[layer.name] = -lr * directions[layer.name]
            previous = previous_update(state, layer) if mu != 0.0 else None
            if previous is not None:
                small_delta[layer.name] = mu * previous.to(directions[layer.name])
    vectors = [big_delta, small_delta] if small_delta else [big_delta]
    gram = products.ggn_gram(vectors).double()
    k = len(vectors)
    ridge = torch.zeros(k, k, dtype=torch.float64)
    for group in groups:
        weight_decay = (
            0.0 if group.settings["decoupled_weight_decay"] else group.settings["weight_decay"]
        )
        names = [layer.name for layer in group.layers]
        scale = group.damping + float(weight_decay)
        for i in range(k):
            for j in range(i, k):
                ridge[i, j] += scale * _inner(vectors[i], vectors[j], names)
    a = gram + torch.triu(ridge) + torch.triu(ridge, 1).T
    names = list(big_delta)
    b = [_inner(grads, v, names) for v in vectors]
    if k == 1:
        model = QuadraticModel((b[0], 0.0), ((float(a[0, 0]), 0.0), (0.0, 0.0)))
    else:
        a12 = float(a[0, 1])
        model = QuadraticModel((b[0], b[1]), ((float(a[0, 0]), a12), (a12, float(a[1, 1]))))
    alpha, mu = adaptive_coefficients(
        model, None if mode.lr else 1.0, None if mode.momentum or k == 1 else 1.0
    )
    if k == 1:
        mu = 0.0
    coefficients = torch.tensor([alpha, mu][:k], dtype=torch.float64)
    nu = kl_trust_region(float(coefficients @ gram @ coefficients), kl_clip)
    alpha, mu = nu * alpha, nu * mu
    updates = {
        name: alpha * d + mu * small_delta[name] if name in small_delta else alpha * d
        for name, d in big_delta.items()
    }
    return AdaptiveStep(alpha, mu, model(alpha, mu), updates, nu)


def kl_trust_region(curvature: float, clip: float | None) -> float:
    r"""The factor $\nu = \min(1, \sqrt{c / u^\top\mathcal G u})$ that bounds the update.

    The quadratic model is trusted only near the current parameters: the
    chosen update $u$ is scaled so that $u^\top \mathcal G u \le c$, the bound
    the KL clip puts on $\eta^2\Delta^\top C\Delta$ in the fixed-rate step,
    here with the exact GGN $\mathcal G$ of the actual update (momentum
    included) and at no extra cost: $u^\top\mathcal G u = c^\top \mathcal G_{2\times2} c$
    comes from the same Gram matrix. For the losses curvlib supports the GGN
    is the Fisher of the model's predictive distribution, so this bounds the
    change of that distribution to second order in KL. A non-finite or
    non-positive curvature leaves the update unscaled (the minimiser already
    gave 0 for a direction without curvature).

    Args:
        curvature: $u^\top \mathcal G u$.
        clip: $c$; ``None`` disables the trust region.
    """
    if clip is None or not curvature > clip or not math.isfinite(curvature):
        return 1.0
    return math.sqrt(clip / curvature)


def apply_adaptive_step(
    state: MutableMapping[Any, dict[str, Any]],
    groups: Sequence[AdaptiveGroup],
    step: AdaptiveStep,
    mode: AdaptiveMode,
) -> None:
    r"""$\theta \leftarrow (1 - \alpha_g\omega)\theta + u$ and store $u$ as the next $\delta$.

    Decoupled weight decay (only) shrinks the weights by $\alpha_g\omega$, with
    $\alpha_g$ the chosen $\alpha$ under ``lr="auto"`` and the group's ``lr``
    otherwise; it is outside the quadratic model and outside $\delta$.
    """
    for group in groups:
        decoupled = bool(group.settings["decoupled_weight_decay"])
        wd = float(group.settings["weight_decay"]) if decoupled else 0.0
        lr = step.alpha if mode.lr else float(group.settings["lr"])
        for layer in group.layers:
            parts = layer.from_matrix(step.updates[layer.name])
            for p, u in zip(layer.parameters, parts, strict=False):
                assert u is not None
                u = u.to(p.dtype)
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(u)
                state[p]["previous_update"] = u.clone()
