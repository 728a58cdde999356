r"""Loss options that change the curvature: ignored targets, and options edited later.

``CrossEntropyLoss`` skips the targets equal to its ``ignore_index`` (-100 by
default) and its ``mean`` divides by the number $K$ of the others. The
statistics must be the curvature of that loss: the exact layer block equals
the GGN of the batch loss torch computes (``mean``), or that GGN over $N$
(``sum``). The references below differentiate the batch loss itself with
``torch.func``; they do not use the per-sample convention of the extractor.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

from curvlib.core import FisherType, StatKind
from curvlib.extract import Backend, CurvatureExtractor, UnsupportedPolicy
from tests import oracle
from tests import problems as P
from tests.extract.test_oracle import assert_close, extract, sample_block
from tests.problems import Problem

IGNORED = (1, 4)
"""Samples of ``mlp_ce`` whose target is ignored."""


def _ignoring(problem: Problem, ignore_index: int, reduction: str) -> Problem:
    y = problem.y.clone()
    if y.dim() == 1:
        y[list(IGNORED)] = ignore_index
    else:  # segmentation: ignore a few pixels of every image and a whole image
        y[:, 0, :2] = ignore_index
        y[1] = ignore_index
    loss = nn.CrossEntropyLoss(reduction=reduction, ignore_index=ignore_index)
    return problem.with_loss(loss, y)


def _batch_ggn(problem: Problem, model: nn.Module, name: str) -> Tensor:
    r"""$J^\top \nabla^2_f L\, J$ of the batch loss $L$ torch computes, for one layer."""
    module = model.get_submodule(name)
    params = {f"{name}.weight": module.weight.detach()}
    if module.bias is not None:
        params[f"{name}.bias"] = module.bias.detach()

    def forward(p: dict[str, Tensor]) -> Tensor:
        return functional_call(model, p, (problem.x,))

    output = forward(params).detach()
    jac = jacrev(forward)(params)
    weight = jac[f"{name}.weight"].reshape(*output.shape, *module.weight.shape)
    bias = jac.get(f"{name}.bias")
    jac_mat = oracle.layer_matrix(module, weight, bias).reshape(output.numel(), -1)
    hess = hessian(lambda out: problem.loss_fn(out, problem.y))(output)
    hess = hess.reshape(output.numel(), output.numel())
    return jac_mat.T @ hess @ jac_mat


CASES = [
    pytest.param(
        problem, ignore, reduction, backend,
        id=f"{problem.name}-{ignore}-{reduction}-{backend.value}",
    )
    for problem in (P.mlp_ce(), P.segmentation_ce())
    for ignore in (-100, 2)
    for reduction in ("mean", "sum")
    for backend in (Backend.BACKPACK, Backend.AUTOGRAD)
]  # fmt: skip


@pytest.mark.parametrize(("base", "ignore_index", "reduction", "backend"), CASES)
def test_exact_statistics_are_the_ggn_of_the_loss_with_ignored_targets(
    base: Problem, ignore_index: int, reduction: str, backend: Backend
) -> None:
    problem = _ignoring(base, ignore_index, reduction)
    model = problem.model()
    stats = extract(problem, model, backend, FisherType.EXACT)
    divisor = 1.0 if reduction == "mean" else float(problem.n)
    for name, layer_stats in stats.layers.items():
        assert layer_stats.grads is not None
        expected = _batch_ggn(problem, model, name) / divisor
        assert expected.abs().max() > 0
        assert_close(sample_block(layer_stats.grads.grads), expected, what=f"block of {name!r}")
        # and the Kronecker factor G sees the same columns: the ignored samples add nothing
        counted = extract(problem, model, backend, FisherType.EXACT, stats=[StatKind.KRONECKER])
        kron = counted[name].kronecker
        assert kron is not None and torch.isfinite(kron.G).all()


@pytest.mark.parametrize("backend", [Backend.BACKPACK, Backend.AUTOGRAD])
@pytest.mark.parametrize("fisher", [FisherType.MC, FisherType.EMPIRICAL], ids=lambda f: f.value)
def test_ignored_samples_have_zero_per_sample_gradients(
    backend: Backend, fisher: FisherType
) -> None:
    problem = _ignoring(P.mlp_ce(), -100, "mean")
    stats = extract(problem, problem.model(), backend, fisher, mc_samples=3)
    kept = [n for n in range(problem.n) if n not in IGNORED]
    for name, layer_stats in stats.layers.items():
        assert layer_stats.grads is not None
        grads = layer_stats.grads.grads
        assert torch.equal(grads[:, list(IGNORED)], torch.zeros_like(grads[:, list(IGNORED)]))
        assert grads[:, kept].abs().sum() > 0, name


@pytest.mark.parametrize("backend", [Backend.BACKPACK, Backend.AUTOGRAD])
def test_empirical_per_sample_gradients_average_to_the_batch_gradient(backend: Backend) -> None:
    problem = _ignoring(P.mlp_ce(), 0, "mean")
    model = problem.model()
    stats = extract(problem, model, backend, FisherType.EMPIRICAL)
    for name, layer_stats in stats.layers.items():
        module = model.get_submodule(name)
        batch = oracle.layer_matrix(module, module.weight.grad, module.bias.grad)
        assert layer_stats.grads is not None
        assert_close(layer_stats.grads.grads[0].mean(0), batch, what=name)


def test_mc_factor_converges_to_exact_with_ignored_targets() -> None:
    problem = _ignoring(P.mlp_ce(), -100, "mean")
    kron = [StatKind.KRONECKER]
    exact = extract(problem, problem.model(), Backend.BACKPACK, FisherType.EXACT, stats=kron)
    many = extract(
        problem, problem.model(), Backend.BACKPACK, FisherType.MC, kron, mc_samples=2000, seed=1
    )
    for name, layer in exact.layers.items():
        assert layer.kronecker is not None
        sampled = many[name].kronecker
        assert sampled is not None
        err = float((sampled.G - layer.kronecker.G).norm() / layer.kronecker.G.norm())
        assert err < 0.1, f"{name!r}: MC(2000) error {err:.3f}"


def test_every_target_ignored_gives_nan_statistics_like_torch() -> None:
    problem = P.mlp_ce().with_loss(nn.CrossEntropyLoss(), torch.full((6,), -100))
    stats = extract(problem, problem.model(), Backend.BACKPACK, FisherType.EXACT)
    assert torch.isnan(problem.loss_fn(problem.model()(problem.x), problem.y))
    assert not stats.is_finite()


@pytest.mark.parametrize(
    ("attribute", "value", "match"),
    [
        ("label_smoothing", 0.1, "label smoothing"),
        ("reduction", "none", "reduction='none'"),
        ("weight", torch.ones(3, dtype=torch.float64), "class weights"),
    ],
)
def test_loss_options_changed_after_construction_are_refused(
    attribute: str, value: object, match: str
) -> None:
    problem = P.mlp_ce()
    model = problem.model()
    loss_fn = nn.CrossEntropyLoss()
    ex = CurvatureExtractor(
        model, loss_fn, stats=[StatKind.KRONECKER], unsupported=UnsupportedPolicy.IGNORE
    )
    setattr(loss_fn, attribute, value)
    with pytest.raises(ValueError, match=match), ex.collect():
        loss_fn(model(problem.x), problem.y).sum().backward()
