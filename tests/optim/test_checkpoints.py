"""Checkpoints record what wrote them; loading refuses a mismatch before changing anything."""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import curvlib
import tests.problems as P
from curvlib import (
    EKFAC,
    KFAC,
    KPSVD,
    BlockNaturalGradient,
    Deflation,
    ExactNaturalGradient,
    NaturalGradientPreconditioner,
    PreconditionedOptimizer,
)
from curvlib.approx import Lanczos
from curvlib.core.checkpoint import RECORD_KEY

PROBLEM = P.mlp_ce(n=8)


def _train(opt: Any, model: nn.Module, steps: int = 3) -> None:
    for i in range(steps):
        opt.zero_grad()
        with opt.record():
            PROBLEM.loss_fn(model(PROBLEM.x + 0.1 * i), PROBLEM.y).backward()
        opt.step()


def _optimizer(model: nn.Module, approx: Any, **kwargs: Any) -> PreconditionedOptimizer:
    return PreconditionedOptimizer(
        model, approx, loss_fn=PROBLEM.loss_fn, lr=0.1, momentum=0.9, t_cov=1, t_inv=1, **kwargs
    )


def _saved(opt: Any) -> Any:
    """A checkpoint through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _assert_identical(a: Any, b: Any, path: str = "") -> None:
    """Bit-for-bit equality of nested states (tensors: dtype, shape and every bit)."""
    assert type(a) is type(b), path
    if isinstance(a, Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for key in a:
            _assert_identical(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _trained(approx: Any, model: nn.Module | None = None) -> tuple[nn.Module, Any]:
    model = PROBLEM.model() if model is None else model
    opt = _optimizer(model, approx)
    _train(opt, model)
    return model, opt


def test_the_record_names_the_writer_layers_and_version() -> None:
    _, opt = _trained(KFAC())
    record = _saved(opt)[RECORD_KEY]
    assert record["curvlib"] == curvlib.__version__
    assert record["class"] == "PreconditionedOptimizer"
    layers = record["groups"]["default"]["layers"]
    assert record["groups"]["default"]["approx"] == "KFAC"
    assert layers == {
        "0": {"weight": [5, 6], "bias": [5]},
        "2": {"weight": [4, 5], "bias": [4]},
        "4": {"weight": [3, 4], "bias": [3]},
    }
    engine = opt.engine.state_dict()
    assert engine[RECORD_KEY]["approx"] == "KFAC" and engine[RECORD_KEY]["layers"] == layers
    assert engine["approx"][RECORD_KEY]["class"] == "KFAC"


@pytest.mark.parametrize(
    ("writer", "reader"),
    [(KFAC, KPSVD), (Lanczos, Deflation), (KFAC, EKFAC), (BlockNaturalGradient, KFAC)],
    ids=["KFAC-KPSVD", "Lanczos-Deflation", "KFAC-EKFAC", "BlockNG-KFAC"],
)
def test_another_approximation_is_refused_and_nothing_changes(
    writer: Callable[[], Any], reader: Callable[[], Any]
) -> None:
    _, source = _trained(writer())
    checkpoint = _saved(source)
    model, opt = _trained(reader())
    before = opt.state_dict()
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(checkpoint)
    message = str(info.value)
    w, r = writer.__name__, reader.__name__  # type: ignore[attr-defined]
    assert f"groups['default']['approx']: '{w}' in the checkpoint, '{r}' here" in message
    assert "nothing was changed" in message
    _assert_identical(before, opt.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters(), strict=True))


def test_the_approximations_and_engines_refuse_another_writer() -> None:
    _, kfac_opt = _trained(KFAC())
    _, kpsvd_opt = _trained(KPSVD())
    kpsvd = kpsvd_opt.approx
    before = kpsvd.state_dict()
    with pytest.raises(ValueError, match="class: 'KFAC' in the checkpoint, 'KPSVD' here"):
        kpsvd.load_state_dict(kfac_opt.approx.state_dict())
    _assert_identical(before, kpsvd.state_dict())
    with pytest.raises(ValueError, match="approx: 'KFAC' in the checkpoint, 'KPSVD' here"):
        kpsvd_opt.engine.load_state_dict(kfac_opt.engine.state_dict())
    exact = ExactNaturalGradient()
    with pytest.raises(ValueError, match="'BlockNaturalGradient' in the checkpoint"):
        exact.load_state_dict(BlockNaturalGradient().state_dict())


def test_an_incomplete_layer_estimate_is_a_value_error_not_a_key_error() -> None:
    _, opt = _trained(EKFAC())
    state = opt.approx.state_dict()
    del state["blocks"]["2"]["state"]["basis_a"]
    fresh = EKFAC()
    with pytest.raises(ValueError, match="layer '2' lacks 'basis_a'"):
        fresh.load_state_dict(state)
    assert fresh.blocks == {} and fresh.num_updates == 0


def _named(hidden: int, names: tuple[str, str]) -> nn.Module:
    torch.manual_seed(0)
    modules = [
        (names[0], nn.Linear(6, hidden)),
        ("act", nn.Tanh()),
        (names[1], nn.Linear(hidden, 3)),
    ]
    return nn.Sequential(OrderedDict(modules)).double()


def test_renamed_layers_are_refused_naming_them() -> None:
    _, source = _trained(KFAC(), _named(5, ("enc", "dec")))
    checkpoint = _saved(source)
    _, opt = _trained(KFAC(), _named(5, ("encoder", "decoder")))
    before = opt.state_dict()
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(checkpoint)
    message = str(info.value)
    assert "groups['default']['layers']: 'enc', 'dec' only in the checkpoint" in message
    assert "groups['default']['layers']: 'encoder', 'decoder' only here" in message
    _assert_identical(before, opt.state_dict())


def test_a_wider_layer_is_refused_naming_the_shapes() -> None:
    _, source = _trained(KFAC(), _named(5, ("enc", "dec")))
    checkpoint = _saved(source)
    _, opt = _trained(KFAC(), _named(7, ("enc", "dec")))
    before = opt.state_dict()
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(checkpoint)
    message = str(info.value)
    assert (
        "groups['default']['layers']['enc']['weight']: [5, 6] in the checkpoint, [7, 6] here"
        in (message)
    )
    assert "['dec']['weight']: [3, 5] in the checkpoint, [3, 7] here" in message
    _assert_identical(before, opt.state_dict())


def test_a_fallback_parameter_of_another_shape_is_refused() -> None:
    def net(width: int) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, width)).double()

    source = PreconditionedOptimizer(net(3), KFAC(), loss_fn=PROBLEM.loss_fn, unsupported="ignore")
    target = PreconditionedOptimizer(net(3), KFAC(), loss_fn=PROBLEM.loss_fn, unsupported="ignore")
    target.load_state_dict(_saved(source))  # same shapes: loads
    model = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    other = PreconditionedOptimizer(model, KFAC(), loss_fn=PROBLEM.loss_fn, unsupported="ignore")
    with pytest.raises(ValueError, match=r"fallback\['1.weight'\]: \[5\] in the checkpoint, \[4\]"):
        other.load_state_dict(_saved(source))


def _corrupt_generators(checkpoint: dict[str, Any]) -> None:
    gens = checkpoint["curvature"]["extractor"]["generators"]
    for key in gens:
        gens[key] = gens[key][:7]  # set_state refuses it, after torch's state was loaded


def test_a_failure_late_in_loading_leaves_the_optimizer_bit_for_bit_unchanged() -> None:
    model = PROBLEM.model()
    groups = [{"layers": ["4"], "approx": KPSVD(), "damping": 1e-2}]
    source = _optimizer(model, KFAC(), groups=groups)
    _train(source, model, steps=4)
    checkpoint = _saved(source)
    _corrupt_generators(checkpoint)
    twin_model, twin = PROBLEM.model(), None
    target_model = PROBLEM.model()
    target = _optimizer(target_model, KFAC(), groups=[{**groups[0], "approx": KPSVD()}])
    twin = _optimizer(twin_model, KFAC(), groups=[{**groups[0], "approx": KPSVD()}])
    _train(target, target_model, steps=2)
    _train(twin, twin_model, steps=2)
    before = target.state_dict()
    with pytest.raises(RuntimeError):
        target.load_state_dict(checkpoint)
    _assert_identical(before, target.state_dict())
    # And the next steps are those of the twin that never saw the checkpoint.
    _train(target, target_model, steps=2)
    _train(twin, twin_model, steps=2)
    for p, q in zip(target_model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_failing_estimate_of_the_second_group_changes_neither_group() -> None:
    model = PROBLEM.model()
    source = _optimizer(model, KFAC(), groups=[{"layers": ["4"], "approx": EKFAC()}])
    _train(source, model)
    checkpoint = _saved(source)
    del checkpoint["curvature"]["groups"]["group1"]["approx"]["blocks"]["4"]["state"]["scalings"]
    target_model = PROBLEM.model()
    target = _optimizer(target_model, KFAC(), groups=[{"layers": ["4"], "approx": EKFAC()}])
    _train(target, target_model, steps=1)
    before = target.state_dict()
    with pytest.raises(ValueError, match="layer '4' lacks 'scalings'"):
        target.load_state_dict(checkpoint)
    _assert_identical(before, target.state_dict())


def test_a_checkpoint_without_a_record_is_refused_with_the_reason() -> None:
    _, source = _trained(KFAC())
    checkpoint = _saved(source)
    del checkpoint[RECORD_KEY]
    _, opt = _trained(KFAC())
    before = opt.state_dict()
    with pytest.raises(ValueError, match="no 'written_by' record of what wrote it") as info:
        opt.load_state_dict(checkpoint)
    assert "start a new run" in str(info.value)
    _assert_identical(before, opt.state_dict())


def test_a_checkpoint_of_another_format_is_refused() -> None:
    _, source = _trained(KFAC())
    checkpoint = _saved(source)
    checkpoint[RECORD_KEY]["format"] = 99
    _, opt = _trained(KFAC())
    with pytest.raises(ValueError, match="checkpoint format 99"):
        opt.load_state_dict(checkpoint)


def test_the_preconditioner_mode_checks_and_loads_all_or_nothing() -> None:
    def make(model: nn.Module, approx: Any) -> NaturalGradientPreconditioner:
        return NaturalGradientPreconditioner(model, approx, loss_fn=PROBLEM.loss_fn)

    def train(precond: NaturalGradientPreconditioner, model: nn.Module) -> None:
        for i in range(2):
            model.zero_grad()
            with precond.record():
                PROBLEM.loss_fn(model(PROBLEM.x + 0.1 * i), PROBLEM.y).backward()
            precond.step()

    source_model = PROBLEM.model()
    source = make(source_model, KFAC())
    train(source, source_model)
    checkpoint = _saved(source)
    assert checkpoint[RECORD_KEY]["approx"] == "KFAC"
    model = PROBLEM.model()
    target = make(model, KPSVD())
    train(target, model)
    before = target.state_dict()
    with pytest.raises(ValueError, match="approx: 'KFAC' in the checkpoint, 'KPSVD' here"):
        target.load_state_dict(checkpoint)
    _assert_identical(before, target.state_dict())
    same = make(PROBLEM.model(), KFAC())
    _corrupt_generators({"curvature": {"extractor": checkpoint["extractor"]}})
    before = same.state_dict()
    with pytest.raises(RuntimeError):
        same.load_state_dict(checkpoint)
    _assert_identical(before, same.state_dict())
