"""The dtype KFAC and the two-term methods apply their inverses in: ``"auto"``, bfloat16's cost."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from curvlib.approx import EKFAC, KPSVD, Deflation, KFACCorrected, Lanczos
from curvlib.approx.base import LayerwiseApprox
from curvlib.approx.kfac import KFAC, EigenbasisInverse, KFACDamping, KroneckerInverse
from curvlib.linalg import precision
from curvlib.linalg.kron import two_term_inverse
from curvlib.linalg.precision import (
    LOW_PRECISION_MAX_CONDITION,
    LOW_PRECISION_MAX_CONDITION_EIGENBASIS,
    LOW_PRECISION_MIN_COST,
    check_apply_dtype,
    resolve_apply_dtype,
)
from tests import problems as P
from tests.approx.cases import fit_statistics

CPU, LARGE, SMALL = torch.device("cpu"), LOW_PRECISION_MIN_COST, LOW_PRECISION_MIN_COST / 2
WELL = LOW_PRECISION_MAX_CONDITION
"""A condition number ``"auto"`` still applies in bfloat16."""


@pytest.fixture
def bfloat16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_multiplies_bfloat16", lambda: True)


@pytest.fixture
def float32_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_multiplies_bfloat16", lambda: False)


@pytest.mark.usefixtures("bfloat16_cpu")
def test_auto_takes_bfloat16_only_for_large_float32_layers_on_the_cpu() -> None:
    assert resolve_apply_dtype("auto", torch.float32, CPU, LARGE, condition=WELL) == torch.bfloat16
    assert resolve_apply_dtype("auto", torch.float32, CPU, SMALL, condition=WELL) == torch.float32
    assert resolve_apply_dtype("auto", torch.float64, CPU, LARGE, condition=WELL) == torch.float64
    cuda = torch.device("cuda")
    assert resolve_apply_dtype("auto", torch.float32, cuda, LARGE, condition=WELL) == torch.float32


@pytest.mark.usefixtures("bfloat16_cpu")
@pytest.mark.parametrize("condition", [WELL * 1.01, 1e4, math.inf, math.nan])
def test_auto_keeps_float32_for_an_ill_conditioned_inverse(condition: float) -> None:
    assert resolve_apply_dtype("auto", torch.float32, CPU, LARGE, condition=condition) == (
        torch.float32
    )


@pytest.mark.usefixtures("float32_cpu")
def test_auto_keeps_the_factors_dtype_without_hardware_bfloat16() -> None:
    assert resolve_apply_dtype("auto", torch.float32, CPU, LARGE, condition=1.0) == torch.float32


@pytest.mark.usefixtures("bfloat16_cpu")
def test_none_and_an_explicit_dtype_are_used_as_given() -> None:
    assert resolve_apply_dtype(None, torch.float32, CPU, LARGE, condition=1.0) == torch.float32
    explicit = resolve_apply_dtype(torch.bfloat16, torch.float64, CPU, SMALL, condition=1e9)
    assert explicit == torch.bfloat16


@pytest.mark.usefixtures("bfloat16_cpu")
def test_an_eigenbasis_inverse_takes_bfloat16_up_to_its_own_bound() -> None:
    between = 10 * LOW_PRECISION_MAX_CONDITION
    assert between < LOW_PRECISION_MAX_CONDITION_EIGENBASIS
    for eigenbasis, expected in ((False, torch.float32), (True, torch.bfloat16)):
        got = resolve_apply_dtype(
            "auto", torch.float32, CPU, LARGE, condition=between, eigenbasis=eigenbasis
        )
        assert got == expected
    beyond = LOW_PRECISION_MAX_CONDITION_EIGENBASIS * 1.01
    got = resolve_apply_dtype("auto", torch.float32, CPU, LARGE, condition=beyond, eigenbasis=True)
    assert got == torch.float32


@pytest.mark.parametrize("bad", ["fast", "bfloat16", torch.int8, 16])
def test_anything_else_is_refused_naming_the_choices(bad: object) -> None:
    with pytest.raises(ValueError, match="'auto', None"):
        check_apply_dtype(bad)  # type: ignore[arg-type]
    for make in (KFAC, EKFAC):
        with pytest.raises(ValueError, match="apply_dtype"):
            make(apply_dtype=bad)  # type: ignore[arg-type]


def _applied(approx: LayerwiseApprox, damping: float) -> dict[str, Tensor]:
    """``approx`` fitted to a small MLP, its damped inverse applied to fixed random gradients."""
    approx.update(fit_statistics(P.mlp_ce(), approx))
    gen = torch.Generator().manual_seed(0)
    grads = {
        name: torch.randn(block.out_dim, block.in_dim, generator=gen)
        for name, block in approx.blocks.items()
    }
    return approx.inverse(damping).apply(grads)


def _directions(mode: KFACDamping, apply_dtype: precision.ApplyDtype) -> dict[str, Tensor]:
    return _applied(KFAC(mode, dtype=torch.float32, apply_dtype=apply_dtype), 1e-3)


@pytest.mark.parametrize("mode", [KFACDamping.PI, KFACDamping.SQRT, KFACDamping.EIGEN])
def test_a_bfloat16_apply_is_returned_in_float32_within_its_rounding(mode: KFACDamping) -> None:
    exact, low = _directions(mode, None), _directions(mode, torch.bfloat16)
    for name, ref in exact.items():
        assert low[name].dtype == torch.float32
        err = float((low[name] - ref).norm() / ref.norm())
        assert 0.0 < err < 2e-2, f"{name}: relative error {err:.2e}"  # bfloat16: 2^-8 per entry


@pytest.mark.usefixtures("bfloat16_cpu")
def test_auto_on_small_layers_is_the_float32_apply_bit_for_bit() -> None:
    exact, auto = _directions(KFACDamping.PI, None), _directions(KFACDamping.PI, "auto")
    for name, ref in exact.items():
        assert torch.equal(auto[name], ref)


def _ekfac_directions(apply_dtype: precision.ApplyDtype) -> dict[str, Tensor]:
    return _applied(EKFAC(dtype=torch.float32, apply_dtype=apply_dtype), 1e-3)


def test_ekfac_applies_in_bfloat16_within_its_rounding() -> None:
    exact, low = _ekfac_directions(None), _ekfac_directions(torch.bfloat16)
    for name, ref in exact.items():
        assert low[name].dtype == torch.float32
        err = float((low[name] - ref).norm() / ref.norm())
        assert 0.0 < err < 2e-2, f"{name}: relative error {err:.2e}"


@pytest.mark.usefixtures("bfloat16_cpu")
def test_ekfac_auto_on_small_layers_is_the_float32_apply_bit_for_bit() -> None:
    exact, auto = _ekfac_directions(None), _ekfac_directions("auto")
    for name, ref in exact.items():
        assert torch.equal(auto[name], ref)


@pytest.mark.usefixtures("bfloat16_everywhere")
def test_ekfac_auto_judges_its_inverse_by_the_eigenbasis_bound() -> None:
    approx = EKFAC(dtype=torch.float32)
    approx.update(fit_statistics(P.mlp_ce(), approx))
    seen = set()
    for damping in (1e-6, 1e2):
        for name, block in approx.blocks.items():
            inverse = block.inverse(damping)
            assert isinstance(inverse, EigenbasisInverse), name
            well = inverse.condition_number <= LOW_PRECISION_MAX_CONDITION_EIGENBASIS
            assert inverse.apply_dtype == (torch.bfloat16 if well else torch.float32)
            seen.add(well)
    assert seen == {True, False}  # both sides of the rule were exercised


def _ill_conditioned_layer() -> tuple[Tensor, Tensor, Tensor]:
    r"""float32 ``(A, G, gradient)`` shaped like the CURVES autoencoder's last layer at step 100.

    Four "samples": inputs of norms 10 down to 1 (a low-rank input factor far
    above $\sqrt\lambda$), output gradients of scale $10^{-2}$ (an output factor
    below it), and the gradient their mean outer product, which lies in the
    factors' high-curvature directions as a real gradient does. The seed is one
    whose bfloat16 direction points uphill (cosine about $-0.08$; float64: $+0.44$).
    """
    gen = torch.Generator().manual_seed(10)
    scales = torch.logspace(1, 0, 4, dtype=torch.float64)[:, None]
    a = torch.randn(4, 64, generator=gen, dtype=torch.float64) * scales
    g = torch.randn(4, 96, generator=gen, dtype=torch.float64) * 1e-2
    return (a.T @ a / 4).float(), (g.T @ g / 4).float(), (g.T @ a / 4).float()


def _layer_inverse(
    mode: KFACDamping, apply_dtype: precision.ApplyDtype, damping: float
) -> KroneckerInverse | EigenbasisInverse:
    """KFAC's inverse of ``_ill_conditioned_layer``'s factors, loaded as a one-layer estimate."""
    A, G, _ = _ill_conditioned_layer()
    approx = KFAC(mode, apply_dtype=apply_dtype)
    state = approx.state_dict()
    state["num_updates"] = 1
    block = {"A": A, "G": G, "positions": 1}
    state["blocks"] = {"fc": {"shape": [len(G), len(A)], "state": block}}
    approx.load_state_dict(state)
    inverse = approx.blocks["fc"].inverse(damping)
    assert isinstance(inverse, KroneckerInverse | EigenbasisInverse)
    return inverse


def _sqrt_inverse(apply_dtype: precision.ApplyDtype, damping: float) -> KroneckerInverse:
    """The ``SQRT``-damped KFAC inverse of ``_ill_conditioned_layer``'s factors."""
    inverse = _layer_inverse(KFACDamping.SQRT, apply_dtype, damping)
    assert isinstance(inverse, KroneckerInverse)
    return inverse


def _reference(damping: float) -> Tensor:
    r"""$(G + \sqrt\lambda I)^{-1} \nabla (A + \sqrt\lambda I)^{-1}$ in float64."""
    A, G, grad = (t.double() for t in _ill_conditioned_layer())
    root = damping**0.5
    left = torch.linalg.solve(G + root * torch.eye(len(G), dtype=torch.float64), grad)
    right = A + root * torch.eye(len(A), dtype=torch.float64)
    return torch.linalg.solve(right, left.T).T  # A' is symmetric


def _cosine(grad: Tensor, direction: Tensor) -> float:
    grad, direction = grad.double(), direction.double()
    return float((grad * direction).sum() / grad.norm() / direction.norm())


@pytest.fixture
def bfloat16_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU that multiplies bfloat16, every layer large enough for ``"auto"``'s bfloat16."""
    monkeypatch.setattr(precision, "cpu_multiplies_bfloat16", lambda: True)
    monkeypatch.setattr(precision, "LOW_PRECISION_MIN_COST", 0.0)


def test_a_bfloat16_apply_of_an_ill_conditioned_inverse_points_uphill() -> None:
    """What ``"auto"`` guards against: the rounded inverse is indefinite, the step uphill."""
    damping = 1e-3
    inverse, grad = _sqrt_inverse(torch.bfloat16, damping), _ill_conditioned_layer()[2]
    assert inverse.condition_number > 1e3  # a lower bound
    assert float(torch.linalg.eigvalsh(inverse.a_inv.double())[0]) > 0.0  # float32: definite
    rounded = torch.linalg.eigvalsh(inverse.a_inv.to(torch.bfloat16).double())
    assert float(rounded[0]) < 0.0  # the same inverse in bfloat16: indefinite
    direction, exact = inverse(grad), _reference(damping)
    assert float((direction.double() - exact).norm() / exact.norm()) > 1.0
    assert _cosine(grad, exact) > 0.3
    assert _cosine(grad, direction) < -math.sqrt(torch.finfo(torch.float32).eps)  # the guard's rule


@pytest.mark.usefixtures("bfloat16_everywhere")
def test_auto_applies_an_ill_conditioned_inverse_in_float32_and_descends() -> None:
    damping = 1e-3
    inverse, grad = _sqrt_inverse("auto", damping), _ill_conditioned_layer()[2]
    assert inverse.condition_number > LOW_PRECISION_MAX_CONDITION
    assert inverse.apply_dtype == torch.float32
    direction, exact = inverse(grad), _reference(damping)
    # float32 rounding times the condition number, a thousand times below bfloat16's
    assert float((direction.double() - exact).norm() / exact.norm()) < 1e-2
    assert _cosine(grad, direction) > 0.3


@pytest.mark.usefixtures("bfloat16_everywhere")
def test_auto_still_applies_a_well_conditioned_inverse_in_bfloat16() -> None:
    damping = 1e2  # shifts of 10 dwarf the factors: condition about 14
    inverse, grad = _sqrt_inverse("auto", damping), _ill_conditioned_layer()[2]
    assert inverse.condition_number <= LOW_PRECISION_MAX_CONDITION
    assert inverse.apply_dtype == torch.bfloat16
    exact = _reference(damping)
    err = float((inverse(grad).double() - exact).norm() / exact.norm())
    assert 0.0 < err < 2.5e-1 * inverse.condition_number / LOW_PRECISION_MAX_CONDITION


@pytest.mark.usefixtures("bfloat16_everywhere")
def test_auto_judges_the_eigen_inverse_by_its_exact_condition_number() -> None:
    # 1e-2: a condition number (about 580) past the explicit inverses' bound, within
    # the eigenbasis bound.
    for damping, expected in ((1e-3, torch.float32), (1e-2, torch.bfloat16)):
        inverse = _layer_inverse(KFACDamping.EIGEN, "auto", damping)
        assert isinstance(inverse, EigenbasisInverse)
        assert inverse.condition_number > LOW_PRECISION_MAX_CONDITION
        assert (inverse.condition_number <= LOW_PRECISION_MAX_CONDITION_EIGENBASIS) == (
            expected == torch.bfloat16
        )
        assert inverse.apply_dtype == expected


@pytest.mark.parametrize("damping", [1e-4, 1e-3, 1e-2, 1e-1, 1.0])
def test_a_bfloat16_eigenbasis_apply_errs_within_its_bound_and_descends(damping: float) -> None:
    r"""The bound of ``LOW_PRECISION_MAX_CONDITION_EIGENBASIS``, on the layer that goes uphill.

    The error in the norm $\|x\|_{P^{-1}}$ stays below $2^{-8}\sqrt\kappa$ for
    condition numbers from 7 to $6\cdot10^4$, and the direction descends where
    the explicit inverse of the same factors points uphill.
    """
    inverse = _layer_inverse(KFACDamping.EIGEN, torch.bfloat16, damping)
    A, G, grad = (t.double() for t in _ill_conditioned_layer())
    values_a, q_a = torch.linalg.eigh(A)
    values_g, q_g = torch.linalg.eigh(G)
    damped = values_g[:, None] * values_a[None, :] + damping  # the eigenvalues of P^{-1}
    exact = q_g @ ((q_g.T @ grad @ q_a) / damped) @ q_a.T
    direction = inverse(grad.float()).double()

    def norm(x: Tensor) -> float:  # ||x||_{P^{-1}}
        return float(((q_g.T @ x @ q_a).square() * damped).sum().sqrt())

    kappa = float(damped.max() / damped.min())
    assert inverse.apply_dtype == torch.bfloat16
    assert norm(direction - exact) / norm(exact) < 2.0**-8 * math.sqrt(kappa)
    assert _cosine(grad, direction) > 0.0


TWO_TERM = [Deflation, KFACCorrected, Lanczos, KPSVD]


def _two_term_directions(
    make: type[LayerwiseApprox], apply_dtype: precision.ApplyDtype
) -> dict[str, Tensor]:
    return _applied(make(dtype=torch.float32, apply_dtype=apply_dtype), 1e-2)  # type: ignore[call-arg]


@pytest.mark.parametrize("make", TWO_TERM, ids=lambda m: m.__name__)
def test_the_two_term_methods_apply_in_bfloat16_within_its_rounding(
    make: type[LayerwiseApprox],
) -> None:
    exact, low = _two_term_directions(make, None), _two_term_directions(make, torch.bfloat16)
    for name, ref in exact.items():
        assert low[name].dtype == torch.float32
        err = float((low[name] - ref).norm() / ref.norm())
        assert 0.0 < err < 3e-2, f"{name}: relative error {err:.2e}"


@pytest.mark.usefixtures("bfloat16_cpu")
@pytest.mark.parametrize("make", TWO_TERM, ids=lambda m: m.__name__)
def test_the_two_term_methods_auto_on_small_layers_is_float32_bit_for_bit(
    make: type[LayerwiseApprox],
) -> None:
    exact, auto = _two_term_directions(make, None), _two_term_directions(make, "auto")
    for name, ref in exact.items():
        assert torch.equal(auto[name], ref)


@pytest.mark.parametrize("make", TWO_TERM, ids=lambda m: m.__name__)
def test_the_two_term_methods_refuse_an_unknown_apply_dtype(make: type[LayerwiseApprox]) -> None:
    with pytest.raises(ValueError, match="apply_dtype"):
        make(apply_dtype="bf16")  # type: ignore[call-arg]


@pytest.mark.usefixtures("bfloat16_everywhere")
def test_two_term_inverse_judges_bfloat16_by_its_condition_bound() -> None:
    A, G, grad = _ill_conditioned_layer()
    gen = torch.Generator().manual_seed(1)
    G2 = 1e-3 * torch.randn(len(G), len(G), generator=gen)
    A2 = torch.randn(len(A), len(A), generator=gen)
    G2, A2 = G2 + G2.T, A2 + A2.T
    seen = set()
    for damping in (1e-3, 1e2):
        inverse = two_term_inverse(G, A, G2, A2, damping, apply_dtype="auto")
        well = inverse.condition_number <= LOW_PRECISION_MAX_CONDITION
        assert inverse.apply_dtype == (torch.bfloat16 if well else torch.float32)
        exact = two_term_inverse(G, A, G2, A2, damping, apply_dtype=None)(grad)
        err = float((inverse(grad) - exact).norm() / exact.norm())
        assert err < (2.5e-1 if well else 1e-6), f"damping {damping}: {err:.2e}"
        seen.add(well)
    assert seen == {True, False}  # both sides of the rule were exercised
    with pytest.raises(ValueError, match="apply_dtype"):
        two_term_inverse(G, A, G2, A2, 1.0, apply_dtype=torch.int8)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(True, False, True), (False, True, True), (True, True, True), (False, False, False)],
)
def test_hardware_bfloat16_is_amx_or_avx512_bfloat16(
    monkeypatch: pytest.MonkeyPatch, amx: bool, avx512_bf16: bool, expected: bool
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    precision.cpu_multiplies_bfloat16.cache_clear()
    try:
        assert precision.cpu_multiplies_bfloat16() is expected
        # Without oneDNN nothing multiplies bfloat16 fast, whatever the CPU has.
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
        precision.cpu_multiplies_bfloat16.cache_clear()
        assert precision.cpu_multiplies_bfloat16() is False
    finally:
        monkeypatch.undo()
        precision.cpu_multiplies_bfloat16.cache_clear()
