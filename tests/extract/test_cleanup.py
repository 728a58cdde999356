"""collect() leaves nothing behind: no attributes, no hooks, no growing memory."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn

from curvlib.core import FisherType, StatKind
from curvlib.extract import Backend, CurvatureExtractor


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(3 * 6 * 6, 4),
    )


def _hooks(module: nn.Module) -> int:
    return sum(
        len(getattr(module, attr))
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
        )
    )


@pytest.mark.parametrize("fisher_type", list(FisherType))
@pytest.mark.parametrize("train", [True, False])
def test_no_attributes_or_hooks_remain(fisher_type: FisherType, train: bool) -> None:
    model, loss_fn = _net(), nn.CrossEntropyLoss()
    model.train(train)
    params_before = {name: set(vars(p)) for name, p in model.named_parameters()}
    # Train-mode BatchNorm couples the samples: only Kronecker factors exist there.
    stats = {StatKind.KRONECKER} if train else set(StatKind)
    ex = CurvatureExtractor(
        model, loss_fn, stats=stats, fisher_type=fisher_type, unsupported="ignore"
    )
    x, y = torch.randn(5, 1, 6, 6), torch.randint(0, 4, (5,))
    with ex.collect():
        loss_fn(model(x), y).backward()
    assert set(ex.statistics().layers) == {"0", "5"}
    for name, p in model.named_parameters():
        assert set(vars(p)) == params_before[name], name
    for module in [*model.modules(), loss_fn]:
        assert _hooks(module) == 0
        assert not [a for a in vars(module) if a.startswith("input") or a == "output"]


def test_hooks_are_removed_when_the_block_raises() -> None:
    model, loss_fn = _net(), nn.CrossEntropyLoss()
    ex = CurvatureExtractor(model, loss_fn, unsupported="ignore")
    with pytest.raises(KeyError), ex.collect():
        model(torch.randn(2, 1, 6, 6))
        raise KeyError("user code failed")
    assert all(_hooks(m) == 0 for m in [*model.modules(), loss_fn])


def _live_tensors() -> tuple[int, int]:
    gc.collect()
    with warnings.catch_warnings():  # some torch module objects warn on isinstance checks
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("backend", [Backend.BACKPACK, Backend.AUTOGRAD])
def test_no_memory_growth_over_200_steps(backend: Backend) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 4))
    loss_fn = nn.CrossEntropyLoss()
    ex = CurvatureExtractor(
        model, loss_fn, stats={StatKind.KRONECKER, StatKind.PER_SAMPLE_IO}, backend=backend
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    at_50 = None
    for step in range(1, 201):
        opt.zero_grad()
        with ex.collect():
            loss_fn(model(x), y).backward()
        opt.step()
        if step == 50:
            at_50 = _live_tensors()
    assert at_50 is not None
    assert _live_tensors() == at_50
