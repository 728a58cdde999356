"""Steps with deferred checks: no host read on a regular step, the same steps and skips.

Each scenario runs one seeded training run twice, with the checks on the host
(``deferred_checks=False``, the reference) and deferred (``True``), and compares
every step: parameters, momentum buffers, what was skipped and why.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from curvlib import (
    EKFAC,
    KFAC,
    KPSVD,
    Diagonal,
    NaturalGradientPreconditioner,
    PreconditionedOptimizer,
)
from curvlib.approx.coarse import Nicolaides
from curvlib.approx.natural_gradient import BlockNaturalGradient, ExactNaturalGradient
from curvlib.approx.two_level import TwoLevel
from curvlib.optim import deferred as deferred_module
from curvlib.optim.report import StepStats
from curvlib.optim.syncs import host_reads

Tamper = Callable[[int, dict[str, Tensor]], None]
"""Changes the gradients (before the step) or the directions of step ``k`` in place."""

STEPS = 26  # statistics at 0, 1, 2, 4, 8, 10, 20 (the warm-up, t_cov = 10); 16 regular steps
REGULAR = 23  # a regular step: nothing folded in, no inverse rebuilt


def _model() -> nn.Module:
    torch.manual_seed(0)
    # The LayerNorm has no curvature block: its parameters take the fallback step.
    return nn.Sequential(
        nn.Linear(6, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)
    ).double()


X, Y = (
    torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
    (torch.arange(40) % 3),
)


def _optimizer(
    deferred: bool | str, approx: Any = None, model: nn.Module | None = None, **kwargs: Any
) -> tuple[nn.Module, PreconditionedOptimizer, Callable[[], int]]:
    """The model, its optimizer, and one training step on ``X, Y`` that returns its host reads."""
    model = _model() if model is None else model
    loss_fn = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the LayerNorm without a block
        opt = PreconditionedOptimizer(
            model, KFAC() if approx is None else approx, loss_fn=loss_fn,
            deferred_checks=deferred, **kwargs,
        )  # fmt: skip

    def step() -> int:
        opt.zero_grad()
        with opt.record():
            loss_fn(model(X), Y).backward()
        with host_reads() as counted:
            opt.step()
        return counted.count

    return model, opt, step


def _run(
    deferred: bool,
    approx: Any = None,
    *,
    grads: Tamper | None = None,
    directions: Tamper | None = None,
    steps: int = STEPS,
    look: bool = True,
    **kwargs: Any,
) -> tuple[nn.Module, PreconditionedOptimizer, list[dict[str, Any]], list[str], list[int]]:
    """The run: model, optimizer, every step's state and stats, the warnings, host reads.

    ``look=False`` leaves every ``last_stats`` unread (the deferred answers pending).
    """
    model, opt, _ = _optimizer(deferred, approx, **kwargs)
    loss_fn = opt.loss_fn
    if directions is not None:
        for engine in opt.engines:
            original = engine.precondition

            def precondition(g: Mapping[str, Tensor], original: Any = original) -> Any:
                out = original(g)
                directions(opt.engine.step_count, out)
                return out

            engine.precondition = precondition  # type: ignore[method-assign]
    states, messages, reads = [], [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for k in range(steps):
            opt.zero_grad()
            with opt.record():
                loss_fn(model(X), Y).backward()
            if grads is not None:
                grads(k, {n: p.grad for n, p in model.named_parameters()})
            with host_reads() as counted:
                opt.step()
            reads.append(counted.count)
            if not look:
                continue
            stats = opt.last_stats
            states.append(
                {
                    "params": [p.detach().clone() for p in model.parameters()],
                    "buffers": [
                        None if b is None else b.clone()
                        for b in (opt.state[p].get("momentum_buffer") for p in model.parameters())
                    ],
                    "skipped": stats["skipped"],
                    "clip": stats["kl_clip_factor"],
                    "skipped_steps": stats["skipped_steps"],
                }
            )
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return model, opt, states, messages, reads


def _close(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        # A step skipped before any buffer existed leaves zeros (deferred) or none (host).
        return (a if b is None else b) is None or not bool((a if b is None else b).any())
    # Round-off apart (the deferred measurements are float64 sums on the device).
    return bool((a - b).abs().max() <= 1e-10 * a.abs().max())


def _same_runs(reference: list[dict[str, Any]], deferred: list[dict[str, Any]]) -> None:
    for k, (ref, got) in enumerate(zip(reference, deferred, strict=True)):
        assert got["skipped"] == ref["skipped"], k
        assert got["skipped_steps"] == ref["skipped_steps"], k
        assert (got["clip"] is None) == (ref["clip"] is None), k
        if ref["clip"] is not None:
            assert got["clip"] == pytest.approx(ref["clip"], rel=1e-10), k
        assert all(map(_close, ref["params"], got["params"])), k
        assert all(map(_close, ref["buffers"], got["buffers"])), k


def _without_suffix(message: str) -> str:
    return message.replace(" (its checks ran on the device and were read later)", "")


# -- the same training, no read on a regular step -------------------------------------------


SETTINGS = {
    "plain": {"momentum": 0.0},
    "heavy-ball": {"momentum": 0.9},
    "nesterov+decoupled": {
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 1e-2,
        "decoupled_weight_decay": True,
    },
    "l2+no-clip": {"weight_decay": 1e-2, "kl_clip": None, "lr": 0.02},
    "no-eta-squared": {"kl_clip_lr_squared": False, "kl_clip": 1e-4},
}


@pytest.mark.parametrize("settings", list(SETTINGS.values()), ids=list(SETTINGS))
@pytest.mark.parametrize("make", [KFAC, EKFAC, KPSVD, Diagonal], ids=lambda m: m.__name__)
def test_deferred_checks_train_as_the_host_path_without_reading_on_regular_steps(
    make: Callable[[], Any], settings: dict[str, Any]
) -> None:
    *_, reference, ref_messages, ref_reads = _run(False, make(), **settings)
    *_, deferred, messages, reads = _run(True, make(), **settings)
    _same_runs(reference, deferred)
    assert messages == ref_messages == []
    regular = [k for k in range(STEPS) if k not in (0, 1, 2, 4, 8, 10, 20)]
    assert [reads[k] for k in regular] == [0] * len(regular)
    assert [ref_reads[k] for k in regular] == [1] * len(regular)
    # Statistics steps read the deferred answers with their first check: no extra read;
    # their new inverse is checked with the directions' measurements: one read less.
    # (The stats above were looked at after each step, so each regular step's answer was
    # read then; the count on a statistics step after unread steps is tested below.)
    assert [reads[k] for k in (10, 20)] == [ref_reads[k] - 1 for k in (10, 20)]


def test_a_statistics_step_reads_the_pending_answers_with_its_first_check() -> None:
    def counts(deferred: bool) -> list[int]:
        _, opt, step = _optimizer(deferred, momentum=0.9)
        reads = [step() for _ in range(21)]  # last_stats is not looked at
        assert opt.last_stats["skipped_steps"] == 0
        return reads

    host, deferred = counts(False), counts(True)
    assert deferred[11:20] == [0] * 9 and host[11:20] == [1] * 9
    # Nine pending answers and tracked norms, no extra read; the inverse: one read less.
    assert deferred[20] == host[20] - 1


def test_auto_defers_only_off_the_cpu() -> None:
    *_, reads = _run("auto")  # type: ignore[arg-type]
    assert reads[REGULAR] == 1  # the parameters are on the CPU: the exact host path
    with (
        pytest.raises(ValueError, match="deferred_checks must be True, False or 'auto'"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", UserWarning)
        PreconditionedOptimizer(
            _model(), KFAC(), loss_fn=nn.CrossEntropyLoss(), deferred_checks="yes"
        )


# -- skipped steps: the same skips, read later ------------------------------------------------


def _nan_gradient(layer: str) -> Tamper:
    def tamper(k: int, grads: dict[str, Tensor]) -> None:
        if k == REGULAR:
            grads[layer][0].fill_(float("nan"))

    return tamper


def _directions(change: Callable[[dict[str, Tensor]], None]) -> Tamper:
    def tamper(k: int, directions: dict[str, Tensor]) -> None:
        if k == REGULAR:
            change(directions)

    return tamper


def _uphill(directions: dict[str, Tensor]) -> None:
    directions["3"].neg_()


def _infinite(directions: dict[str, Tensor]) -> None:
    directions["5"][0, 0] = float("inf")


def _absurd(directions: dict[str, Tensor]) -> None:
    directions["0"].mul_(1e12)


SKIPS: dict[str, dict[str, Any]] = {
    "nan-gradient": {"grads": _nan_gradient("0.weight"), "match": r"gradient of \['0'\]"},
    "nan-fallback-gradient": {
        "grads": _nan_gradient("1.bias"),
        "match": r"gradient of \['1.bias'\]",
    },
    "uphill": {"directions": _directions(_uphill), "match": r"layers \['3'\] points uphill"},
    "infinite": {"directions": _directions(_infinite), "match": r"\['5'\] is not finite"},
    "absurd": {
        "directions": _directions(_absurd),
        "kl_clip": None,
        "lr": 1e-9,
        "match": r"step of layers \['0'\] would be",
    },
}


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("case", list(SKIPS.values()), ids=list(SKIPS))
def test_a_step_the_guards_refuse_is_skipped_exactly_as_on_the_host(
    case: dict[str, Any], momentum: float
) -> None:
    case = dict(case)
    match = case.pop("match")
    _, _, reference, ref_messages, _ = _run(False, momentum=momentum, **case)
    _, opt, deferred, messages, reads = _run(True, momentum=momentum, **case)
    assert reference[REGULAR]["skipped"] and reference[REGULAR]["skipped_steps"] == 1
    _same_runs(reference, deferred)
    # Parameters and momentum buffers bit for bit as before the skipped step.
    before, after = deferred[REGULAR - 1], deferred[REGULAR]
    assert all(map(torch.equal, before["params"], after["params"]))
    assert all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        for a, b in zip(before["buffers"], after["buffers"], strict=True)
    )
    assert reads[REGULAR] == 0  # the skip, too, was decided on the device
    assert len(messages) == len(ref_messages) == 1
    assert _without_suffix(messages[0]) == ref_messages[0]
    assert f"Step {REGULAR} skipped" in messages[0]
    assert re.search(match, messages[0]), messages[0]
    assert opt.skipped_steps == 1


def test_the_warning_waits_until_an_answer_is_looked_at() -> None:
    model, opt, step = _optimizer(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for k in range(REGULAR + 2):
            if k == REGULAR:  # an infinite gradient at this step
                hook = model[0].weight.register_hook(lambda g: torch.full_like(g, math.inf))
            step()
            if k == REGULAR:
                hook.remove()
        assert caught == []  # nothing read yet
        stats = opt.last_stats
        assert stats["time_step"] > 0 and caught == []  # host values never wait
        with host_reads() as counted:
            assert stats["skipped"] is False and stats["skipped_steps"] == 1
            assert stats["kl_clip_factor"] is not None
        assert counted.count == 1  # both pending steps answered in one transfer
        assert [f"Step {REGULAR} skipped" in str(w.message) for w in caught] == [True]
        assert opt.skipped_steps == 1 and len(caught) == 1  # read once, warned once


def test_groups_with_their_own_learning_rates_and_a_coupled_approximation() -> None:
    groups = [{"layers": ["5"], "lr": 0.05, "momentum": 0.5, "approx": BlockNaturalGradient()}]
    *_, reference, ref_messages, _ = _run(False, groups=groups, momentum=0.9)
    *_, deferred, messages, reads = _run(True, groups=groups, momentum=0.9)
    _same_runs(reference, deferred)
    assert messages == ref_messages == [] and reads[REGULAR] == 0


def test_a_coupled_group_is_judged_as_a_whole_on_the_device() -> None:
    # Layer '3' alone turns slightly uphill; the exact natural gradient's whole step still
    # descends, so neither path skips it. Turned far uphill, both skip it.
    def slightly(directions: dict[str, Tensor]) -> None:
        directions["3"].mul_(-1e-3)

    def far(directions: dict[str, Tensor]) -> None:
        for d in directions.values():
            d.neg_()

    for change, skipped in ((slightly, False), (far, True)):
        case = {"directions": _directions(change)}
        *_, reference, ref_messages, _ = _run(False, ExactNaturalGradient(), **case)
        *_, deferred, messages, _ = _run(True, ExactNaturalGradient(), **case)
        _same_runs(reference, deferred)
        assert reference[REGULAR]["skipped"] is skipped
        assert [_without_suffix(m) for m in messages] == ref_messages


def test_many_unread_steps_are_answered_every_max_pending_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("curvlib.optim.optimizer.MAX_PENDING", 4)
    assert deferred_module.MAX_PENDING == 1000
    _, _, step = _optimizer(True, t_cov=1000, t_inv=1000, warmup=0)
    reads = [step() for _ in range(13)]
    assert reads[1:] == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1]


# -- what the user reads --------------------------------------------------------------------


def test_last_stats_reads_its_device_values_whichever_way_it_is_used() -> None:
    uses: dict[str, Callable[[StepStats], Any]] = {
        "dict": dict,
        "unpack": lambda s: {**s},
        "json": lambda s: json.loads(
            json.dumps({k: v for k, v in s.items() if k != "diagnostics"})
        ),
        "copy": copy.copy,
        "deepcopy": copy.deepcopy,
        "pickle": lambda s: pickle.loads(pickle.dumps(s)),
        "get": lambda s: {"skipped": s.get("skipped"), "kl_clip_factor": s.get("kl_clip_factor")},
        "values": lambda s: dict(zip(s.keys(), s.values(), strict=True)),
        "or": lambda s: s | {},
        "copy-method": lambda s: s.copy(),
        "repr": lambda s: {"repr": repr(s)},
    }
    model, opt, *_ = _run(True, steps=REGULAR, look=False, t_cov=100, t_inv=100)
    x = torch.randn(40, 6, dtype=torch.float64)
    for name, use in uses.items():
        opt.zero_grad()
        model(x).logsumexp(1).sum().backward()  # a regular step: nothing recorded
        opt.step()
        with host_reads() as counted:
            result = use(opt.last_stats)
        assert counted.count == 1, name  # read once, on first use
        if name == "repr":
            assert "_Unread" not in result["repr"] and "'skipped': False" in result["repr"]
            continue
        assert result["skipped"] is False, name
        assert isinstance(result["kl_clip_factor"], float), name
        assert result.get("skipped_steps", 0) == 0, name


def test_a_checkpoint_after_unread_steps_resumes_exactly() -> None:
    model, opt, step = _optimizer(True, momentum=0.9)
    for _ in range(REGULAR):
        step()
    with host_reads() as counted:
        saved = copy.deepcopy(opt.state_dict())
    assert counted.count == 1  # the pending answers and the tracked norms, in one read
    norms = [s["momentum_norm"] for s in saved["state"].values() if "momentum_norm" in s]
    assert norms and all(isinstance(n, float) for n in norms)
    fresh = copy.deepcopy(model)

    def three_more(net: nn.Module, step: Callable[[], int]) -> list[Tensor]:
        for _ in range(3):
            step()
        return [p.detach().clone() for p in net.parameters()]

    expected = three_more(model, step)
    _, resumed, resumed_step = _optimizer(True, model=fresh, momentum=0.9)
    resumed.load_state_dict(saved)
    assert all(map(torch.equal, expected, three_more(fresh, resumed_step)))


def test_a_two_level_step_leaves_its_diagnostics_on_the_device_until_read() -> None:
    runs = {}
    for deferred in (False, True):
        _, opt, step = _optimizer(deferred, TwoLevel(KFAC(), Nicolaides()))
        reads = [step() for _ in range(REGULAR + 1)]
        with host_reads() as counted:
            diagnostics = opt.last_stats["diagnostics"]
        runs[deferred] = (reads[REGULAR], counted.count, diagnostics["default"])
    assert runs[True][:2] == (0, 1)  # no read in the step; one when the numbers are used
    assert runs[False][:2] == (1, 1)
    host, device = runs[False][2], runs[True][2]
    assert {"coarse_scale", "coarse_error_change"} <= host.keys() == device.keys()
    assert all(isinstance(v, float) for v in device.values())
    assert all(device[k] == pytest.approx(host[k], rel=1e-8, abs=1e-12) for k in host)


# -- preconditioner mode ----------------------------------------------------------------------


def _preconditioned(deferred: bool, nan_at: int | None = None) -> tuple[list[Any], list[str], Any]:
    """Preconditioner mode under torch's SGD: per step the parameters, reads, clip, count."""
    model = _model()
    loss_fn = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        precond = NaturalGradientPreconditioner(
            model, KFAC(), loss_fn=loss_fn, kl_clip=1e-3, lr=0.1, deferred_checks=deferred
        )
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    rows = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        for k in range(STEPS):
            sgd.zero_grad()
            with precond.record():
                loss_fn(model(X), Y).backward()
            if k == nan_at:
                model[3].weight.grad[0, 0] = math.nan
            with host_reads() as counted:
                precond.step()
            grads = [p.grad.clone() for p in model.parameters()]
            stats = precond.last_stats
            rows.append((grads, counted.count, stats["kl_clip_factor"], stats["skipped_steps"]))
            if k != nan_at:
                sgd.step()
        messages = [str(w.message) for w in caught if "NaN/Inf" in str(w.message)]
    return rows, messages, precond


def test_preconditioner_mode_defers_its_check_and_clip_too() -> None:
    host, host_messages, _ = _preconditioned(False)
    deferred, messages, precond = _preconditioned(True)
    assert host_messages == messages == []
    for k, (ref, got) in enumerate(zip(host, deferred, strict=True)):
        assert all(map(_close, ref[0], got[0])), k
        assert got[2] == pytest.approx(ref[2], rel=1e-10) and got[3] == ref[3] == 0, k
    assert deferred[REGULAR][1] == 0 and host[REGULAR][1] >= 1
    # A statistics step: the gradients' and statistics' check in one read, the new
    # inverse's checks in another (its clip stays on the device).
    assert [deferred[k][1] for k in (10, 20)] == [2, 2]
    assert all(host[k][1] > 2 for k in (10, 20))
    assert precond.skipped_steps == 0


@pytest.mark.parametrize("nan_at", [REGULAR, 20], ids=["regular", "statistics"])
def test_preconditioner_mode_leaves_a_bad_gradient_alone_and_says_so_when_read(
    nan_at: int,
) -> None:
    host, host_messages, _ = _preconditioned(False, nan_at=nan_at)
    deferred, messages, precond = _preconditioned(True, nan_at=nan_at)
    for k, (ref, got) in enumerate(zip(host, deferred, strict=True)):
        assert all(
            torch.equal(a.isnan(), b.isnan()) for a, b in zip(ref[0], got[0], strict=True)
        ), k
        assert all(map(_close, ref[0], got[0])) or k == nan_at, k
        assert (got[2] is None) == (ref[2] is None) and got[3] == ref[3], k
    assert deferred[nan_at][2] is None and deferred[nan_at][3] == 1
    assert len(host_messages) == len(messages) == 1
    if nan_at == REGULAR:
        assert deferred[nan_at][1] == 0  # the check ran on the device
        assert f"step {nan_at} contained NaN/Inf" in messages[0]
    else:  # a statistics step reads its check first, as the host does
        assert deferred[nan_at][1] == 1 and messages == host_messages
    assert precond.skipped_steps == 1


def test_segment_dots_are_the_float64_dots_of_each_pair() -> None:
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 5), (0, 3), (7,), (2, 3)]
    a = [torch.randn(*s, generator=gen) for s in shapes]
    b = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]
    a[3] = torch.full((2, 3), 3e38)  # float32 products would overflow
    b[3] = torch.full((2, 3), 3e38, dtype=torch.float64)
    got = deferred_module.segment_dots(a, b)
    pairs = zip(a, b, strict=True)
    expected = torch.stack([torch.dot(x.reshape(-1).double(), y.reshape(-1)) for x, y in pairs])
    assert got.dtype == torch.float64 and got[1] == 0.0 and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)
    assert deferred_module.segment_dots([], []).numel() == 0


def test_segment_dots_keep_a_bounded_number_of_layouts() -> None:
    for n in range(1, 2 * deferred_module._MAX_LAYOUTS):
        deferred_module.segment_dots([torch.ones(n)], [torch.ones(n)])
    assert 0 < len(deferred_module._LENGTHS) <= deferred_module._MAX_LAYOUTS
    assert float(deferred_module.segment_dots([torch.ones(3)], [torch.ones(3)])[0]) == 3.0
