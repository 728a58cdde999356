"""The diagonal approximation against dense float64 references, alone and in the optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlib.approx import KFAC, Diagonal
from curvlib.core import FisherType, LayerKind
from curvlib.wiring import PreconditionedOptimizer
from tests import oracle
from tests import problems as P
from tests.approx.cases import PROBLEMS, fit_statistics
from tests.hyper import PER_STEP
from tests.problems import Problem

RTOL = 1e-10


@pytest.mark.parametrize("fisher", [FisherType.EXACT, FisherType.EMPIRICAL], ids=str)
@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_one_batch_is_the_diagonal_of_the_dense_matrix(
    problem: Problem, fisher: FisherType
) -> None:
    model = problem.model()
    approx = Diagonal()
    approx.update(fit_statistics(problem, approx, fisher=fisher, model=model))
    reference = oracle.dense_ggn if fisher is FisherType.EXACT else oracle.dense_empirical_fisher
    dense = reference(model, problem.loss_fn, problem.x, problem.y)
    for name, sl in oracle.layer_slices(model).items():
        expected = torch.diag(torch.diagonal(dense[sl, sl]))
        err = float((approx.to_dense(name) - expected).abs().max())
        assert err <= RTOL * float(expected.abs().max()), name


def test_optimizer_preconditions_batchnorm_affine_parameters() -> None:
    problem = P.bn_net(train=False)
    model = problem.model()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    damping, lr = 1e-2, 0.5
    opt = PreconditionedOptimizer(
        model, Diagonal(), loss_fn=problem.loss_fn, fisher_type="exact", lr=lr,
        damping=damping, kl_clip=None, max_move=None, **PER_STEP,
    )  # fmt: skip
    kinds = {layer.name: layer.kind for layer in opt.extractor.layout}
    assert kinds == {
        "0": LayerKind.CONV2D,
        "1": LayerKind.BATCHNORM,
        "5": LayerKind.LINEAR,
        "6": LayerKind.BATCHNORM,
        "8": LayerKind.LINEAR,
    }
    ggn, slices = oracle.dense_ggn_all_params(model, problem.loss_fn, problem.x, problem.y)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt.zero_grad()
    with opt.record():
        problem.loss_fn(model(problem.x), problem.y).backward()
    grads = {k: v.grad.detach().clone() for k, v in model.named_parameters()}  # type: ignore[union-attr]
    opt.step()
    for key, param in model.named_parameters():
        diag = torch.diagonal(ggn[slices[key], slices[key]]).reshape(param.shape)
        expected = before[key] - lr * grads[key] / (diag + damping)
        assert torch.allclose(param.detach(), expected, rtol=1e-9, atol=1e-12), key


def test_batchnorm_in_train_mode_is_refused_with_its_name() -> None:
    problem = P.bn_net(train=True)
    model = problem.model()
    opt = PreconditionedOptimizer(model, Diagonal(), loss_fn=problem.loss_fn)
    with pytest.raises(RuntimeError, match=r"BatchNorm in train mode \(1, 6\)"), opt.record():
        problem.loss_fn(model(problem.x), problem.y).backward()


def test_a_diagonal_group_beside_kfac_leaves_unclaimed_batchnorm_to_the_fallback() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).eval()
    loss_fn = nn.CrossEntropyLoss()
    kwargs = {"loss_fn": loss_fn, "unsupported": "ignore", "kl_clip": None}
    # BatchNorm claimed by the Diagonal group: preconditioned by it.
    opt = PreconditionedOptimizer(
        model, KFAC(), groups=[{"layers": ["1", "3"], "approx": Diagonal()}], **kwargs
    )
    assert [layer.name for layer in opt.layers] == ["0", "1", "3"]
    # Not claimed: KFAC has no block for it, so its parameters take the fallback step.
    opt = PreconditionedOptimizer(
        model, KFAC(), groups=[{"layers": ["3"], "approx": Diagonal()}], **kwargs
    )
    assert [layer.name for layer in opt.layers] == ["0", "3"]
    assert "fallback step" in opt.describe() and "1.weight" in opt.describe()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    before = model[1].weight.detach().clone()
    opt.zero_grad()
    with opt.record():
        loss_fn(model(x), y).backward()
    grad = model[1].weight.grad.detach().clone()  # type: ignore[union-attr]
    opt.step()
    torch.testing.assert_close(model[1].weight.detach(), before - 0.1 * grad)
    # Claimed by a KFAC group: an error naming the layer.
    with pytest.raises(ValueError, match=r"KFAC, which has no block for layers \['1'\]"):
        PreconditionedOptimizer(
            model, Diagonal(), groups=[{"layers": ["1"], "approx": KFAC()}], **kwargs
        )
