"""Every message quoted on the troubleshooting page is the one curvlib raises.

Each entry of ``docs/troubleshooting.md`` has a heading with an anchor
``{#name}`` and quotes the message in a block quote; ``SCENARIOS[name]`` makes
curvlib raise (or warn) it, and the test checks that the quoted text is part
of the actual message. Entries and scenarios correspond one to one.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from curvlib import (
    KFAC,
    Backend,
    CurvatureExtractor,
    Diagonal,
    LevenbergMarquardt,
    PreconditionedOptimizer,
)

PAGE = Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md"
LOSS = nn.CrossEntropyLoss()


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _data(n: int = 8) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _opt(model: nn.Module | None = None, **kwargs: object) -> PreconditionedOptimizer:
    return PreconditionedOptimizer(model or _net(), KFAC(), loss_fn=LOSS, **kwargs)  # type: ignore[arg-type]


def _step(opt: PreconditionedOptimizer, x: Tensor | None = None, y: Tensor | None = None) -> None:
    if x is None or y is None:
        x, y = _data()
    opt.zero_grad()
    with opt.record():
        LOSS(opt.extractor._model(x), y).backward()
    opt.step()


def _raised(fn: Callable[[], object]) -> str:
    try:
        fn()
    except Exception as err:  # the message is what is checked
        return f"{type(err).__name__}: {err}"
    raise AssertionError("the scenario raised nothing")


def _warned(fn: Callable[[], object]) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    assert caught, "the scenario warned nothing"
    return "\n".join(f"{w.category.__name__}: {w.message}" for w in caught)


# -- the scenarios ------------------------------------------------------------------


def approx_class() -> str:
    return _raised(lambda: PreconditionedOptimizer(_net(), KFAC, loss_fn=LOSS))  # type: ignore[arg-type]


def functional_loss() -> str:
    return _raised(lambda: CurvatureExtractor(_net(), F.cross_entropy))  # type: ignore[arg-type]


def unsupported_loss() -> str:
    return _raised(lambda: CurvatureExtractor(_net(), nn.L1Loss()))


def loss_option() -> str:
    return _raised(lambda: CurvatureExtractor(_net(), nn.CrossEntropyLoss(label_smoothing=0.1)))


def another_loss_instance() -> str:
    opt = _opt()
    x, y = _data()

    def run() -> None:
        with opt.record():
            nn.CrossEntropyLoss()(opt.extractor._model(x), y).backward()

    return _raised(run)


def step_without_record() -> str:
    opt = _opt()
    x, y = _data()
    LOSS(opt.extractor._model(x), y).backward()
    return _raised(opt.step)


def nested_record() -> str:
    opt = _opt()

    def run() -> None:
        with opt.record(), opt.record():
            pass

    return _raised(run)


def module_twice() -> str:
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 5), relu, nn.Linear(5, 5), relu, nn.Linear(5, 3))
    return _raised(lambda: _step(_opt(model, backend=Backend.BACKPACK)))


def loss_twice() -> str:
    opt = _opt()
    x, y = _data()

    def run() -> None:
        with opt.record():
            out = opt.extractor._model(x)
            LOSS(out, y)
            LOSS(out, y).backward()

    return _raised(run)


def no_backward() -> str:
    opt = _opt()
    x, y = _data()

    def run() -> None:
        with opt.record():
            LOSS(opt.extractor._model(x), y)

    return _raised(run)


def train_mode_batchnorm() -> str:
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    opt = PreconditionedOptimizer(model, Diagonal(), loss_fn=LOSS)
    return _raised(lambda: _step(opt))


def functional_op_in_forward() -> str:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(torch.relu(self.a(x)) + x)

    torch.manual_seed(0)
    return _raised(lambda: _step(_opt(Residual(), backend=Backend.BACKPACK)))


def unsupported_module() -> str:
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    return _warned(lambda: _opt(model))


def frozen_layer() -> str:
    model = _net()
    opt = _opt(model)
    model[0].requires_grad_(False)
    return _raised(lambda: _step(opt))


def step_twice() -> str:
    opt = _opt(t_cov=1, t_inv=1)
    _step(opt)
    return _raised(opt.step)


def bad_runtime_hyper() -> str:
    opt = _opt()
    opt.param_groups[0]["lr"] = float("nan")
    return _raised(lambda: _step(opt))


def infinite_hyper() -> str:
    return _raised(lambda: _opt(lr=float("inf")))


def torch_style_groups() -> str:
    model = _net()
    return _raised(lambda: _opt(model, params=[{"params": model[0].parameters(), "lr": 0.1}]))


def add_param_group() -> str:
    opt = _opt()
    return _raised(lambda: opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]}))


def empty_batch() -> str:
    x, y = _data()
    return _raised(lambda: _step(_opt(), x[:0], y[:0]))


def meta_device() -> str:
    with torch.device("meta"):
        model = _net()
    return _raised(lambda: _opt(model))


def checkpoint_mismatch() -> str:
    from curvlib import KPSVD

    model = _net()
    kfac = _opt(model)
    _step(kfac)
    kpsvd = PreconditionedOptimizer(model, KPSVD(), loss_fn=LOSS)
    return _raised(lambda: kpsvd.load_state_dict(kfac.state_dict()))


def checkpoint_without_record() -> str:
    opt = _opt()
    _step(opt)
    state = opt.state_dict()
    state.pop("written_by", None)
    return _raised(lambda: opt.load_state_dict(state))


def nonfinite_loss() -> str:
    opt = _opt()
    x, y = _data()
    x[0, 0] = float("nan")
    return _warned(lambda: _step(opt, x, y))


def nonfinite_statistics() -> str:
    opt = _opt()
    record = opt.extractor.statistics
    _step(opt)
    opt.extractor.statistics = lambda: record().scaled(float("nan"))  # type: ignore[method-assign]
    for _ in range(9):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _step(opt)  # the steps up to the next statistics step
    return _warned(lambda: _step(opt))


def tiny_damping() -> str:
    torch.manual_seed(0)
    opt = _opt(damping=1e-12, kl_clip=None, t_cov=1, t_inv=1, stats_fraction=0.25)
    return _warned(lambda: [_step(opt) for _ in range(3)])


def auto_with_fallback() -> str:
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _raised(lambda: _opt(model, lr="auto"))


def lm_without_closure() -> str:
    opt = _opt(damping=LevenbergMarquardt(1e-2), t_cov=1, t_inv=1)
    return _raised(lambda: _step(opt))


def tselepidis_krylov() -> str:
    from curvlib import Tselepidis

    return _raised(lambda: Tselepidis(krylov=True))


SCENARIOS: dict[str, Callable[[], str]] = {
    fn.__name__.replace("_", "-"): fn
    for fn in (
        approx_class, functional_loss, unsupported_loss, loss_option, another_loss_instance,
        step_without_record, nested_record, module_twice, loss_twice, no_backward,
        train_mode_batchnorm, functional_op_in_forward, unsupported_module, frozen_layer,
        step_twice, bad_runtime_hyper, infinite_hyper, torch_style_groups, add_param_group,
        empty_batch, meta_device, checkpoint_mismatch, checkpoint_without_record,
        nonfinite_loss, nonfinite_statistics, tiny_damping, auto_with_fallback,
        lm_without_closure, tselepidis_krylov,
    )
}  # fmt: skip


def _entries() -> dict[str, list[str]]:
    """``{anchor: [quoted lines]}`` of the page."""
    entries: dict[str, list[str]] = {}
    current: str | None = None
    for line in PAGE.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^#{2,4} .*\{#([a-z0-9-]+)\}\s*$", line)
        if heading:
            current = heading.group(1)
            entries[current] = []
        elif current is not None and line.startswith("> "):
            entries[current].append(line[2:].strip())
    return entries


def test_every_scenario_has_an_entry_and_every_entry_a_scenario() -> None:
    assert set(_entries()) == set(SCENARIOS)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_the_quoted_message_is_the_one_raised(name: str) -> None:
    quoted = _entries().get(name)
    assert quoted, f"{name}: the page quotes no message"
    message = " ".join(SCENARIOS[name]().split())
    for fragment in quoted:
        text = fragment.strip("`").replace("…", "").strip()
        assert " ".join(text.split()) in message, f"{name}: {text!r} not in {message!r}"
