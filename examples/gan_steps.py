r"""One step of each network of the GAN example, and the losses they take.

* ``critic_step``: the critic on a real and a generated batch (``bce``: a
  classifier of real against generated; ``wgan-gp``: the Wasserstein loss,
  handed to curvlib as an ``MSELoss`` against ``wasserstein_target``, plus the
  ``gradient_penalty`` outside the statistics).
* ``generator_step``: the generator through the critic (``bce``: the
  non-saturating loss; ``wgan-gp``: $-\mathbb{E}[D(G(z))]$).
* ``simultaneous_step``: simultaneous SGD ascent-descent, both networks stepped
  from gradients at the same parameters.

Each returns the loss (or losses) it stepped on, taken before the step.
"""

from __future__ import annotations

import argparse

import torch
from gan_models import GAN
from torch import Tensor, nn
from training import nothing


def wasserstein_target(scores: Tensor, weights: Tensor) -> Tensor:
    r"""The target that makes ``MSELoss()(scores, target)`` have the gradient of ``Σ w_i D_i``.

    ``MSELoss`` (mean over ``N`` scores) has $\partial/\partial D_i = 2(D_i - t_i)/N$,
    which equals $w_i$ for $t = D - N w / 2$ (``D`` detached).
    """
    return scores.detach() - len(scores) * weights.view_as(scores) / 2


def gradient_penalty(net: nn.Module, real: Tensor, fake: Tensor, gen: torch.Generator) -> Tensor:
    r"""$\mathbb{E}[(\lVert \nabla_x D(\hat x) \rVert - 1)^2]$ at random interpolates $\hat x$."""
    eps = torch.rand(len(real), 1, 1, 1, generator=gen).to(real.device)
    mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(net(mixed).sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


def critic_step(
    args: argparse.Namespace,
    gan: GAN,
    opt: torch.optim.Optimizer,
    real: Tensor,
    fake: Tensor,
    gen: torch.Generator,
    bce: nn.Module,
    mse: nn.Module,
) -> float:
    """One critic step on a real and a generated batch; returns the critic loss."""
    x = torch.cat([real, fake])
    n = len(real)
    opt.zero_grad()
    if args.gan == "bce":
        target = torch.cat([torch.ones(n, 1), torch.zeros(len(fake), 1)]).to(x.device)
        with getattr(opt, "record", nothing)():
            loss = bce(gan.critic(x), target)
            loss.backward()
        opt.step()
        return float(loss.detach())
    # Wasserstein: mean D(fake) - mean D(real), as an MSE with the same gradient.
    weights = torch.cat([-torch.ones(n) / n, torch.ones(len(fake)) / len(fake)]).to(x.device)
    with getattr(opt, "record", nothing)():
        scores = gan.critic(x)
        mse(scores, wasserstein_target(scores, weights)).backward()
    penalty = args.gp_weight * gradient_penalty(gan.critic, real, fake, gen)
    penalty.backward()
    opt.step()
    return float((weights * scores.detach().view(-1)).sum() + penalty.detach())


def generator_step(
    args: argparse.Namespace,
    gan: GAN,
    opt: torch.optim.Optimizer,
    z: Tensor,
    bce: nn.Module,
    mse: nn.Module,
) -> float:
    """One generator step through the critic; returns the generator loss."""
    opt.zero_grad()
    with getattr(opt, "record", nothing)():
        scores = gan(z)
        if args.gan == "bce":
            loss = bce(scores, torch.ones_like(scores))
        else:
            weights = -torch.ones(len(z), device=z.device) / len(z)
            mse(scores, wasserstein_target(scores, weights)).backward()
            loss = -scores.detach().mean()
        if args.gan == "bce":
            loss.backward()
    opt.step()
    return float(loss.detach())


def simultaneous_step(
    args: argparse.Namespace,
    gan: GAN,
    opts: dict[str, torch.optim.Optimizer],
    real: Tensor,
    z: Tensor,
    gen: torch.Generator,
    bce: nn.Module,
) -> tuple[float, float]:
    """One step of simultaneous SGD ascent-descent; returns (generator, critic) losses.

    Both gradients are taken at the current parameters of both networks (the
    generator's through the critic before the critic moves, the critic's on the
    same generated batch), then both networks step.
    """
    for opt in opts.values():
        opt.zero_grad()
    fake = gan.generator(z)
    n = len(real)
    scores = gan.critic(torch.cat([real, fake.detach()]))
    fake_scores = gan.critic(fake)
    if args.gan == "bce":
        target = torch.cat([torch.ones(n, 1), torch.zeros(len(fake), 1)]).to(real.device)
        d_loss = bce(scores, target)
        g_loss = bce(fake_scores, torch.ones_like(fake_scores))
    else:
        d_loss = scores[n:].mean() - scores[:n].mean()
        d_loss = d_loss + args.gp_weight * gradient_penalty(gan.critic, real, fake.detach(), gen)
        g_loss = -fake_scores.mean()
    d_params = list(gan.critic.parameters())
    g_params = list(gan.generator.parameters())
    d_grads = torch.autograd.grad(d_loss, d_params)
    g_grads = torch.autograd.grad(g_loss, g_params)
    for params, grads in ((d_params, d_grads), (g_params, g_grads)):
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
    opts["d"].step()
    opts["g"].step()
    return float(g_loss.detach()), float(d_loss.detach())
