"""The dtype KFAC applies its inverse in: the ``"auto"`` rule and what bfloat16 costs."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from curvlib.approx.kfac import KFAC, KFACDamping
from curvlib.linalg import precision
from curvlib.linalg.precision import (
    LOW_PRECISION_MIN_COST,
    check_apply_dtype,
    resolve_apply_dtype,
)
from tests import problems as P
from tests.approx.cases import fit_statistics

CPU, LARGE, SMALL = torch.device("cpu"), LOW_PRECISION_MIN_COST, LOW_PRECISION_MIN_COST / 2


@pytest.fixture
def amx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_multiplies_bfloat16", lambda: True)


@pytest.fixture
def no_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_multiplies_bfloat16", lambda: False)


@pytest.mark.usefixtures("amx")
def test_auto_takes_bfloat16_only_for_large_float32_layers_on_the_cpu() -> None:
    assert resolve_apply_dtype("auto", torch.float32, CPU, LARGE) == torch.bfloat16
    assert resolve_apply_dtype("auto", torch.float32, CPU, SMALL) == torch.float32
    assert resolve_apply_dtype("auto", torch.float64, CPU, LARGE) == torch.float64
    cuda = torch.device("cuda")
    assert resolve_apply_dtype("auto", torch.float32, cuda, LARGE) == torch.float32


@pytest.mark.usefixtures("no_amx")
def test_auto_keeps_the_factors_dtype_without_hardware_bfloat16() -> None:
    assert resolve_apply_dtype("auto", torch.float32, CPU, LARGE) == torch.float32


@pytest.mark.usefixtures("amx")
def test_none_and_an_explicit_dtype_are_used_as_given() -> None:
    assert resolve_apply_dtype(None, torch.float32, CPU, LARGE) == torch.float32
    assert resolve_apply_dtype(torch.bfloat16, torch.float64, CPU, SMALL) == torch.bfloat16


@pytest.mark.parametrize("bad", ["fast", "bfloat16", torch.int8, 16])
def test_anything_else_is_refused_naming_the_choices(bad: object) -> None:
    with pytest.raises(ValueError, match="'auto', None"):
        check_apply_dtype(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="apply_dtype"):
        KFAC(apply_dtype=bad)  # type: ignore[arg-type]


def _directions(mode: KFACDamping, apply_dtype: precision.ApplyDtype) -> dict[str, Tensor]:
    problem = P.mlp_ce()
    approx = KFAC(mode, dtype=torch.float32, apply_dtype=apply_dtype)
    approx.update(fit_statistics(problem, approx))
    gen = torch.Generator().manual_seed(0)
    grads = {
        name: torch.randn(block.out_dim, block.in_dim, generator=gen)
        for name, block in approx.blocks.items()
    }
    return approx.inverse(1e-3).apply(grads)


@pytest.mark.parametrize("mode", [KFACDamping.PI, KFACDamping.SQRT, KFACDamping.EIGEN])
def test_a_bfloat16_apply_is_returned_in_float32_within_its_rounding(mode: KFACDamping) -> None:
    exact, low = _directions(mode, None), _directions(mode, torch.bfloat16)
    for name, ref in exact.items():
        assert low[name].dtype == torch.float32
        err = float((low[name] - ref).norm() / ref.norm())
        assert 0.0 < err < 2e-2, f"{name}: relative error {err:.2e}"  # bfloat16: 2^-8 per entry


@pytest.mark.usefixtures("amx")
def test_auto_on_small_layers_is_the_float32_apply_bit_for_bit() -> None:
    exact, auto = _directions(KFACDamping.PI, None), _directions(KFACDamping.PI, "auto")
    for name, ref in exact.items():
        assert torch.equal(auto[name], ref)
