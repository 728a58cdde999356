"""An update split by layer (data-parallel training) equals ``update``, bit for bit.

In data-parallel training each layer's owner computes the expensive part of its
update (``fitted``), the owners broadcast them, and every rank folds all of them
in (``update_with``). Here two "ranks" are two calls in one process; the
multi-process runs are in ``tests/distributed``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from curvlib.approx import (
    EKFAC,
    KFAC,
    KPSVD,
    Deflation,
    Diagonal,
    KFACCorrected,
    KFACDamping,
    Lanczos,
    TwoLevel,
)
from curvlib.approx.base import LayerwiseApprox, OwnerFailedError
from curvlib.linalg import factors
from curvlib.linalg.sample_space import RearrangedForm
from tests.approx.cases import PROBLEMS, fit_statistics, perturbed
from tests.problems import Problem
from tests.states import equal_states

MAKERS: dict[str, Callable[[], LayerwiseApprox]] = {
    "kpsvd": KPSVD,
    "kpsvd-matrix-free": lambda: KPSVD(form=RearrangedForm.MATRIX_FREE),
    "kpsvd-sample-space": lambda: KPSVD(form=RearrangedForm.SAMPLE_SPACE),
    "deflation": Deflation,
    "lanczos-matrix-free": lambda: Lanczos(form=RearrangedForm.MATRIX_FREE),
    "kfac-corrected": KFACCorrected,
    "ekfac": EKFAC,
}


def _batches(problem: Problem) -> list[Problem]:
    return [problem, perturbed(problem), perturbed(problem, scale=0.5)]


def _telemetry(approx: LayerwiseApprox) -> object:
    last_products = getattr(approx, "last_products", None)
    return None if last_products is None else last_products()


@pytest.mark.parametrize("problem", PROBLEMS[:2], ids=lambda p: p.name)
@pytest.mark.parametrize("make", MAKERS.values(), ids=list(MAKERS))
def test_an_update_split_by_layer_equals_update(
    make: Callable[[], LayerwiseApprox], problem: Problem
) -> None:
    whole, split = make(), make()
    assert split.splits_update
    for step, batch in enumerate(_batches(problem)):
        stats = fit_statistics(batch, whole)
        due = split.update_due(stats)
        assert list(due) == list(stats.layers), "every layer has a part on every update"
        if isinstance(split, EKFAC):
            # The scalings, preceded at the first update by the first eigenbases.
            for name, layer_stats in stats.layers.items():
                block = split._block_for(name, layer_stats)
                basis = sum(block._packed_sizes()) if step == 0 else 0  # type: ignore[attr-defined]
                assert due[name].numel() == basis + block.num_params
        for name, template in due.items():
            block = split._block_for(name, stats.layers[name])
            assert template.shape == (block.fit_size(),)  # type: ignore[attr-defined]
        names = list(due)
        before = split.state_dict() if step else None
        # Two "ranks", each fitting every other layer.
        parts = {**split.fitted(stats, names[::2]), **split.fitted(stats, names[1::2])}
        if before is not None:
            assert equal_states(split.state_dict(), before), "fitted() changes no estimate"
        assert {n: (p.shape, p.dtype) for n, p in parts.items()} == {
            n: (t.shape, t.dtype) for n, t in due.items()
        }
        whole.update(stats)
        split.update_with(stats, parts)
        assert equal_states(split.state_dict(), whole.state_dict()), f"step {step}: bit for bit"
        assert _telemetry(split) == _telemetry(whole)
        assert (split.num_updates, split.num_samples_seen) == (
            whole.num_updates,
            whole.num_samples_seen,
        )


def test_a_split_update_refuses_wrong_parts_and_changes_nothing() -> None:
    problem = PROBLEMS[0]
    kpsvd = KPSVD()
    kpsvd.update(fit_statistics(problem, kpsvd))
    before, updates = kpsvd.state_dict(), kpsvd.num_updates
    stats = fit_statistics(perturbed(problem), kpsvd)
    names = list(kpsvd.update_due(stats))
    parts = kpsvd.fitted(stats, names)
    with pytest.raises(ValueError, match="exactly the layers update_due"):
        kpsvd.update_with(stats, {names[0]: parts[names[0]]})
    with pytest.raises(ValueError, match="wrong size"):
        kpsvd.update_with(stats, {**parts, names[0]: parts[names[0]][:-1]})
    broken = {**parts, names[1]: torch.full_like(parts[names[1]], float("nan"))}
    with pytest.raises(OwnerFailedError, match=f"layers \\['{names[1]}'\\] are not finite"):
        kpsvd.update_with(stats, broken)
    with pytest.raises(ValueError, match="No split update is due for layers \\['nope'\\]"):
        kpsvd.fitted(stats, ["nope"])
    assert equal_states(kpsvd.state_dict(), before) and kpsvd.num_updates == updates


def test_a_failed_fit_comes_back_as_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = PROBLEMS[0]
    kpsvd, ekfac = KPSVD(), EKFAC()
    stats = fit_statistics(problem, kpsvd)
    first = list(kpsvd.update_due(stats))[:1]

    def broken(*args: object, **kwargs: object) -> factors.Eigh:
        raise factors.FactorizationError("planted failure")

    monkeypatch.setattr("curvlib.approx.kpsvd.power_svd", broken)
    monkeypatch.setattr("curvlib.approx.ekfac.eigh", broken)
    parts = kpsvd.fitted(stats, first)
    assert list(parts) == first and bool(parts[first[0]].isnan().all())
    stats = fit_statistics(problem, ekfac)
    parts = ekfac.fitted(stats, first)
    assert list(parts) == first and bool(parts[first[0]].isnan().all())
    assert kpsvd.blocks == {} and ekfac.blocks == {}, "no block is stored before an update"


# -- inverses built by their owners and sent whole ----------------------------------------

SHARED: dict[str, Callable[[], LayerwiseApprox]] = {
    "kfac": KFAC,
    "kfac-sqrt": lambda: KFAC(damping_mode=KFACDamping.SQRT),
    "kfac-eigen": lambda: KFAC(damping_mode=KFACDamping.EIGEN),
    "kpsvd": KPSVD,
    "deflation": Deflation,
    "lanczos": Lanczos,
    "kfac-corrected": KFACCorrected,
}


@pytest.mark.parametrize("problem", PROBLEMS[:2], ids=lambda p: p.name)
@pytest.mark.parametrize("make", SHARED.values(), ids=list(SHARED))
def test_inverses_built_by_layer_and_rebuilt_from_parts_apply_as_inverse(
    make: Callable[[], LayerwiseApprox], problem: Problem
) -> None:
    approx = make()
    assert approx.shares_inverses
    for batch in _batches(problem)[:2]:
        approx.update(fit_statistics(batch, approx))
    templates = approx.inverse_templates()
    assert list(templates) == list(approx.blocks)
    names = list(templates)
    parts = {**approx.inverse_parts(1e-3, names[::2]), **approx.inverse_parts(1e-3, names[1::2])}
    assert {n: (p.shape, p.dtype) for n, p in parts.items()} == {
        n: (t.shape, t.dtype) for n, t in templates.items()
    }
    rebuilt, direct = approx.inverse_from_parts(1e-3, parts), approx.inverse(1e-3)
    gen = torch.Generator().manual_seed(0)
    grads = {
        name: torch.randn(b.out_dim, b.in_dim, generator=gen, dtype=torch.float64)
        for name, b in approx.blocks.items()
    }
    for name, value in direct.apply(grads).items():
        assert torch.equal(rebuilt.apply(grads)[name], value), name
    assert rebuilt.condition_numbers == direct.condition_numbers


def test_inverses_from_wrong_or_failed_parts_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    kfac = KFAC()
    kfac.update(fit_statistics(PROBLEMS[0], kfac))
    names = list(kfac.inverse_templates())
    parts = kfac.inverse_parts(1e-3, names)
    with pytest.raises(ValueError, match="exactly the layers"):
        kfac.inverse_from_parts(1e-3, {names[0]: parts[names[0]]})
    with pytest.raises(ValueError, match="wrong size"):
        kfac.inverse_from_parts(1e-3, {**parts, names[0]: parts[names[0]][:-1]})
    with pytest.raises(ValueError, match="No estimate for layers \\['nope'\\]"):
        kfac.inverse_parts(1e-3, ["nope"])

    def broken(*args: object, **kwargs: object) -> object:
        raise factors.FactorizationError("planted failure")

    monkeypatch.setattr("curvlib.approx.kfac.damped_cholesky", broken)
    failed = kfac.inverse_parts(1e-3, names[:1])
    assert bool(failed[names[0]].isnan().all())
    with pytest.raises(OwnerFailedError, match=f"layers \\['{names[0]}'\\] are not finite"):
        kfac.inverse_from_parts(1e-3, {**parts, **failed})
    assert not Diagonal.shares_inverses and not EKFAC.shares_inverses


# -- a two-level method splits its fine level ---------------------------------------------


def test_a_two_level_method_splits_its_fine_level_bit_for_bit() -> None:
    problem = PROBLEMS[0]
    whole, split = TwoLevel(KPSVD()), TwoLevel(KPSVD())
    assert split.splits_update and split.shares_inverses
    assert not TwoLevel(Diagonal()).shares_inverses and not TwoLevel(KFAC()).splits_update
    for batch in _batches(problem):
        stats = fit_statistics(batch, whole)  # type: ignore[arg-type]
        names = list(split.update_due(stats))
        assert names == list(stats.layers)
        parts = {**split.fitted(stats, names[:1]), **split.fitted(stats, names[1:])}
        whole.update(stats)
        split.update_with(stats, parts)
        assert equal_states(split.state_dict(), whole.state_dict())
    names = list(split.inverse_templates())
    parts = {**split.inverse_parts(1e-3, names[:1]), **split.inverse_parts(1e-3, names[1:])}
    rebuilt, direct = split.inverse_from_parts(1e-3, parts), whole.inverse(1e-3)
    gen = torch.Generator().manual_seed(0)
    grads = {
        name: torch.randn(b.out_dim, b.in_dim, generator=gen, dtype=torch.float64)
        for name, b in whole.fine.blocks.items()  # type: ignore[attr-defined]
    }
    for name, value in direct.apply(grads).items():
        assert torch.equal(rebuilt.apply(grads)[name], value), name


def test_a_two_level_method_splits_its_fine_levels_refresh_bit_for_bit() -> None:
    problem = PROBLEMS[0]
    whole, split = TwoLevel(EKFAC()), TwoLevel(EKFAC())
    assert split.splits_refresh and not getattr(TwoLevel(KFAC()), "splits_refresh", False)
    for index, batch in enumerate(_batches(problem)):
        stats = fit_statistics(batch, whole)  # type: ignore[arg-type]
        whole.update(stats)
        split.update(stats)
        names = list(split.refresh_due())
        # The first update computes the first bases; after it, new factors make every one due.
        assert names == ([] if index == 0 else list(stats.layers))
        parts = {**split.refreshed(names[:1]), **split.refreshed(names[1:])}
        whole.refresh()  # type: ignore[attr-defined]
        split.adopt_refresh(parts)
        assert equal_states(split.state_dict(), whole.state_dict())
        assert split.refresh_due() == {}, "refreshed: nothing due until the factors change"
