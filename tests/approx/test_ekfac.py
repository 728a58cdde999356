r"""EKFAC against dense float64 references, and its two time scales in the optimizer.

The exact layer block $F$ comes from ``tests/oracle.py`` (``torch.func``); the
eigenbasis $Q = Q_G \otimes Q_A$ from ``torch.linalg.eigh`` of KFAC's factors on
the same statistics. EKFAC with the exact per-sample second moments of one
batch must equal $Q \operatorname{diag}(\operatorname{diag}(Q^\top F Q)) Q^\top$
(the choice of eigenvectors inside a repeated eigenvalue does not matter: such
eigenvalues of the PSD factors are zero, and $F$ vanishes on their span).
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from curvlib.approx import EKFAC, KFAC
from curvlib.core import RefreshableApprox
from curvlib.linalg import factors
from curvlib.wiring import PreconditionedOptimizer
from tests import oracle
from tests import problems as P
from tests.approx.cases import PROBLEMS, fit_statistics, perturbed
from tests.hyper import train_steps
from tests.problems import Problem
from tests.states import equal_states

RTOL = 1e-9


def _rel(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def _kfac_basis(problem: Problem, name: str) -> Tensor:
    kfac = KFAC()
    kfac.update(fit_statistics(problem, kfac))
    block = kfac.blocks[name]
    assert block.A is not None and block.G is not None  # type: ignore[attr-defined]
    q_a = torch.linalg.eigh(block.A).eigenvectors  # type: ignore[attr-defined]
    q_g = torch.linalg.eigh(block.G).eigenvectors  # type: ignore[attr-defined]
    return torch.kron(q_g.contiguous(), q_a.contiguous())


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_one_batch_equals_the_exact_block_projected_on_the_kfac_eigenbasis(
    problem: Problem,
) -> None:
    model = problem.model()
    ekfac = EKFAC()
    ekfac.update(fit_statistics(problem, ekfac, model=model))
    dense = oracle.dense_ggn(model, problem.loss_fn, problem.x, problem.y)
    for name, sl in oracle.layer_slices(model).items():
        exact = dense[sl, sl]
        q = _kfac_basis(problem, name)
        expected = q @ torch.diag(torch.diagonal(q.T @ exact @ q)) @ q.T
        assert _rel(ekfac.to_dense(name), expected) < RTOL, name


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_never_further_from_the_exact_block_than_kfac(problem: Problem) -> None:
    model = problem.model()
    ekfac, kfac = EKFAC(), KFAC()
    ekfac.update(fit_statistics(problem, ekfac, model=model))
    kfac.update(fit_statistics(problem, kfac, model=model))
    dense = oracle.dense_ggn(model, problem.loss_fn, problem.x, problem.y)
    gaps = []
    for name, sl in oracle.layer_slices(model).items():
        exact = dense[sl, sl]
        err_ekfac = float((ekfac.to_dense(name) - exact).norm())
        err_kfac = float((kfac.to_dense(name) - exact).norm())
        assert err_ekfac <= err_kfac * (1 + 1e-12), (name, err_ekfac, err_kfac)
        gaps.append(err_kfac - err_ekfac)
    assert max(gaps) > 1e-6 * float(dense.norm())  # strictly better somewhere


def test_refresh_switches_basis_at_the_next_update_and_carries_the_scalings_over() -> None:
    r"""The estimate in the new basis: the old one's diagonal there, averaged with the batch's.

    $Q'\operatorname{diag}(\rho\,\operatorname{diag}(Q'^\top C Q') + (1 - \rho)
    \operatorname{diag}(Q'^\top F Q'))Q'^\top$ with $C$ the dense estimate before the
    refresh, $F$ the exact block of the new batch and $\rho$ the running average's weight.
    """
    problem = PROBLEMS[0]
    ekfac = EKFAC(decay=0.5)
    assert isinstance(ekfac, RefreshableApprox)
    ekfac.update(fit_statistics(problem, ekfac))
    first = {name: ekfac.to_dense(name) for name in ekfac.blocks}
    ekfac.refresh()  # the basis was computed from these factors: nothing to do
    ekfac.update(fit_statistics(problem, ekfac))  # same batch, same basis: same estimate
    for name, dense in first.items():
        assert _rel(ekfac.to_dense(name), dense) < RTOL, name

    second = perturbed(problem)
    ekfac.update(fit_statistics(second, ekfac))
    before = {name: ekfac.to_dense(name) for name in ekfac.blocks}
    ekfac.refresh()
    factors_at_refresh = {
        name: (block.A.clone(), block.G.clone())  # type: ignore[attr-defined]
        for name, block in ekfac.blocks.items()
    }
    for name, dense in before.items():  # the estimate waits for the next update
        assert torch.equal(ekfac.to_dense(name), dense), name
    third = perturbed(second, scale=0.5)
    model = third.model()
    ekfac.update(fit_statistics(third, ekfac, model=model))
    dense = oracle.dense_ggn(model, third.loss_fn, third.x, third.y)
    for name, sl in oracle.layer_slices(model).items():
        A, G = factors_at_refresh[name]
        q = torch.kron(torch.linalg.eigh(G).eigenvectors, torch.linalg.eigh(A).eigenvectors)
        rho = 0.5  # min(1 - 1/4, decay) at the fourth update
        moments = torch.diagonal(q.T @ dense[sl, sl] @ q)
        carried = torch.diagonal(q.T @ before[name] @ q)
        expected = q @ torch.diag(rho * carried + (1 - rho) * moments) @ q.T
        assert _rel(ekfac.to_dense(name), expected) < RTOL, name
        restarted = q @ torch.diag(moments) @ q.T  # the batch's moments alone
        assert _rel(ekfac.to_dense(name), restarted) > 1e-6, name
        assert _rel(ekfac.to_dense(name), before[name]) > 1e-6, name


def test_a_failed_refresh_leaves_every_layer_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = PROBLEMS[0]
    ekfac = EKFAC()
    ekfac.update(fit_statistics(problem, ekfac))
    ekfac.update(fit_statistics(perturbed(problem), ekfac))
    before = ekfac.state_dict()
    real = torch.linalg.eigh

    def flaky(mat: Tensor) -> tuple[Tensor, Tensor]:
        # The last layer's 3x3 G fails on every attempt, jittered or not; the others succeed.
        if mat.shape[-1] == 3:
            raise torch.linalg.LinAlgError("planted failure")
        return real(mat)  # type: ignore[no-any-return]

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    with pytest.raises(factors.FactorizationError):
        ekfac.refresh()
    after = ekfac.state_dict()
    for name, entry in before["blocks"].items():
        assert after["blocks"][name]["state"]["pending"] is None, name
        assert after["blocks"][name]["state"]["stale"] == entry["state"]["stale"], name


# -- in the optimizer ---------------------------------------------------------------


def _train(opt: PreconditionedOptimizer, model: nn.Module, batches: list[tuple[Tensor, Tensor]],
           loss_fn: nn.Module) -> list[float]:  # fmt: skip
    return train_steps(opt, model, loss_fn, batches)


def test_basis_every_t_inv_steps_scalings_every_t_cov_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    problem = P.mlp_ce(n=16)
    batches = [(problem.x + 0.2 * i, problem.y) for i in range(7)]
    model = problem.model()
    approx = EKFAC()
    opt = PreconditionedOptimizer(
        model,
        approx,
        loss_fn=problem.loss_fn,
        t_cov=1,
        t_inv=3,
        damping=1e-2,
        kl_clip=None,
        warmup=0,
        refresh_on_move=0,
    )
    refreshed = []
    real_refresh = approx.refresh

    def counting_refresh() -> None:
        refreshed.append(opt.engine.step_count)
        real_refresh()

    monkeypatch.setattr(approx, "refresh", counting_refresh)
    grads = {
        layer.name: torch.randn(layer.out_dim, layer.in_dim_aug, dtype=torch.float64)
        for layer in opt.extractor.layout
    }
    bases = []
    for x, y in batches:
        _train(opt, model, [(x, y)], problem.loss_fn)
        block = approx.blocks["0"]
        bases.append(block.basis_a.clone())  # type: ignore[attr-defined]
        # The live preconditioner applies the current scalings, not those of the last refresh.
        live = opt.engine._precond.apply(grads)  # type: ignore[union-attr]
        fresh = approx.inverse(1e-2).apply(grads)
        for name in grads:
            assert torch.allclose(live[name], fresh[name], rtol=1e-12, atol=0.0), name
    assert refreshed == [0, 3, 6]
    assert approx.num_updates == 7
    # The eigenbasis changes only at the refresh steps.
    assert torch.equal(bases[1], bases[0]) and torch.equal(bases[2], bases[0])
    assert not torch.equal(bases[3], bases[2])
    assert torch.equal(bases[4], bases[3]) and torch.equal(bases[5], bases[3])


def test_failed_refresh_keeps_the_basis_and_trains_on(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = P.mlp_ce(n=16)
    model = problem.model()
    approx = EKFAC()
    opt = PreconditionedOptimizer(model, approx, loss_fn=problem.loss_fn, t_cov=1, t_inv=2)
    _train(opt, model, [(problem.x, problem.y)] * 2, problem.loss_fn)
    basis = approx.blocks["0"].basis_a.clone()  # type: ignore[attr-defined]

    def broken() -> None:
        raise factors.FactorizationError("planted failure")

    monkeypatch.setattr(approx, "refresh", broken)
    with pytest.warns(RuntimeWarning, match="refreshing the curvature estimate failed"):
        _train(opt, model, [(problem.x + 0.5, problem.y)], problem.loss_fn)
    assert opt.engine.inverse_failures == 1
    assert torch.equal(approx.blocks["0"].basis_a, basis)  # type: ignore[attr-defined]
    assert approx.num_updates == 3  # the scalings still took the step's statistics


def test_checkpoint_resume_is_exact() -> None:
    problem = P.autoencoder_bce(n=8)
    batches = [(problem.x + 0.1 * i, problem.y) for i in range(9)]

    def make(model: nn.Module) -> PreconditionedOptimizer:
        return PreconditionedOptimizer(
            model, EKFAC(), loss_fn=problem.loss_fn, lr=0.1, momentum=0.9, t_cov=2, t_inv=3,
            mc_samples=2,
        )  # fmt: skip

    model = problem.model()
    full = _train(make(model), model, batches, problem.loss_fn)
    model = problem.model()
    opt = make(model)
    first = _train(opt, model, batches[:4], problem.loss_fn)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model = problem.model()
    opt = make(model)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    second = _train(opt, model, batches[4:], problem.loss_fn)
    assert first + second == full


def test_mc_statistics_train_in_float32() -> None:
    problem = P.cnn_ce(n=16)
    model = problem.model().float()
    x = problem.x.float()
    opt = PreconditionedOptimizer(model, EKFAC(), loss_fn=problem.loss_fn, lr=0.3, t_inv=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no failed inverse, no skipped update
        losses = _train(opt, model, [(x, problem.y)] * 15, problem.loss_fn)
    assert losses[-1] < 0.5 * losses[0], losses


# -- a refresh split by layer (data-parallel training) --------------------------------


def _two_updates() -> EKFAC:
    problem = PROBLEMS[0]
    ekfac = EKFAC()
    ekfac.update(fit_statistics(problem, ekfac))
    ekfac.update(fit_statistics(perturbed(problem), ekfac))
    return ekfac


def test_a_refresh_split_by_layer_and_adopted_equals_refresh() -> None:
    whole, split = _two_updates(), _two_updates()
    due = split.refresh_due()
    assert list(due) == list(split.blocks), "every layer's factors changed"
    for name, block in split.blocks.items():
        a, g = block.A.shape[0], block.G.shape[0]  # type: ignore[attr-defined]
        assert due[name].shape == (a + a * a + g + g * g,)
    # Each "rank" computes one layer; the parts of both are adopted.
    names = list(due)
    parts = {**split.refreshed(names[:1]), **split.refreshed(names[1:])}
    assert equal_states(split.state_dict(), whole.state_dict()), "refreshed changes nothing"
    split.adopt_refresh(parts)
    whole.refresh()
    assert equal_states(split.state_dict(), whole.state_dict()), "bit for bit"
    assert split.refresh_due() == {}, "nothing left to refresh"
    batch = fit_statistics(perturbed(PROBLEMS[0], scale=0.5), whole)
    whole.update(batch)
    split.update(batch)
    for name in names:
        assert torch.equal(split.to_dense(name), whole.to_dense(name)), name


def test_a_split_refresh_refuses_wrong_parts_and_changes_nothing() -> None:
    ekfac = _two_updates()
    before = ekfac.state_dict()
    names = list(ekfac.refresh_due())
    parts = ekfac.refreshed(names)
    with pytest.raises(ValueError, match="exactly the layers refresh_due"):
        ekfac.adopt_refresh({names[0]: parts[names[0]]})
    with pytest.raises(ValueError, match="wrong size"):
        ekfac.adopt_refresh({**parts, names[0]: parts[names[0]][:-1]})
    broken = {**parts, names[1]: torch.full_like(parts[names[1]], float("nan"))}
    with pytest.raises(ValueError, match=f"layers \\['{names[1]}'\\] are not finite"):
        ekfac.adopt_refresh(broken)
    assert equal_states(ekfac.state_dict(), before)
    ekfac.refresh()
    with pytest.raises(ValueError, match="No refresh is due"):
        ekfac.refreshed(names)


def test_a_failed_eigendecomposition_comes_back_as_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    ekfac = _two_updates()
    names = list(ekfac.refresh_due())

    def broken(mat: Tensor, **kwargs: object) -> factors.Eigh:
        raise factors.FactorizationError("planted failure")

    monkeypatch.setattr("curvlib.approx.ekfac.eigh", broken)
    parts = ekfac.refreshed(names[:1])
    assert list(parts) == names[:1] and bool(parts[names[0]].isnan().all())


def test_dead_units_are_decomposed_apart_to_the_same_preconditioner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The MLP's dead ReLU units (zero rows of its factors) are left out of ``eigh``.

    The preconditioner is the one of the whole factors' eigenbases, to round-off.
    """
    from curvlib.approx import ekfac as ekfac_module
    from tests.approx.cases import PROBLEMS, fit_statistics, perturbed
    from tests.dead_units import decoupled_from_the_first_dead_row

    def fitted() -> EKFAC:
        approx = EKFAC(dtype=torch.float64)
        approx.update(fit_statistics(PROBLEMS[0], approx))
        approx.refresh()
        approx.update(fit_statistics(perturbed(PROBLEMS[0]), approx))
        return approx

    sizes: list[int] = []
    for name in ("eigh", "first_eigh"):  # the checked and the drafted refresh
        decompose = getattr(ekfac_module, name)

        def counted(mat: torch.Tensor, *args: Any, _decompose: Any = decompose) -> Any:
            sizes.append(mat.shape[-1])
            return _decompose(mat, *args)

        monkeypatch.setattr(ekfac_module, name, counted)
    with decoupled_from_the_first_dead_row():
        apart = fitted()
    dead = sum(int(f.eq(0).all(-1).sum()) for b in apart._blocks.values() for f in (b.A, b.G))
    whole = sum(b.A.shape[0] + b.G.shape[0] for b in apart._blocks.values())
    assert dead > 0 and sum(sizes) == whole - dead  # one refresh: each factor once
    monkeypatch.setattr(ekfac_module, "cpu_live_coordinates", lambda *mats, eigh: None)
    together = fitted()
    gen = torch.Generator().manual_seed(0)
    grads = {
        layer: torch.randn(b.out_dim, b.in_dim, generator=gen, dtype=torch.float64)
        for layer, b in apart._blocks.items()
    }
    with decoupled_from_the_first_dead_row():
        got = apart.inverse(1e-3).apply(grads)
    want = together.inverse(1e-3).apply(grads)
    for layer in grads:
        torch.testing.assert_close(got[layer], want[layer], rtol=1e-9, atol=1e-12)
