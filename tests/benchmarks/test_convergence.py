"""``benchmarks/convergence.py``: its bookkeeping on hand-made curves, and a small real run."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

from tests.benchmarks.loader import benchmark_script

KEYS = {"task", "method", "config", "seed", "final_loss", "adam_final_loss", "time_to_adam_ratio",
        "diverged"}  # fmt: skip


@pytest.fixture(scope="module")
def cv() -> Iterator[ModuleType]:
    with benchmark_script("convergence") as module:
        yield module


def curve(cv: ModuleType, points: list[tuple[float, float]]) -> object:
    c = cv.Curve()
    for i, (t, loss) in enumerate(points):
        c.add(t, float(i), loss)
    return c


def test_time_to_interpolates_between_evaluations(cv: ModuleType) -> None:
    c = curve(cv, [(0.0, 10.0), (1.0, 6.0), (3.0, 2.0)])
    assert c.time_to(10.0) == 0.0
    assert c.time_to(6.0) == pytest.approx(1.0)
    assert c.time_to(4.0) == pytest.approx(2.0)  # halfway from 6 to 2, halfway from 1 s to 3 s
    assert c.time_to(1.9) is None
    assert c.epochs_to(4.0) == pytest.approx(1.5)  # epochs 0, 1, 2 at the three evaluations
    assert c.epochs_to(1.9) is None
    assert c.loss_at(2.5) == 6.0
    assert c.loss_at(99.0) == 2.0


def run(cv: ModuleType, config: str, seed: int, final: float, diverged: bool = False) -> object:
    c = curve(cv, [(0.0, 10.0), (1.0, final)])
    return cv.Run("t", "adam", config, seed, c, 1.0, 10, diverged, False, 0, 0)


def test_best_of_takes_the_median_and_counts_a_divergence_as_worst(cv: ModuleType) -> None:
    runs = [
        run(cv, "lr=1", 0, 1.0), run(cv, "lr=1", 1, 9.0), run(cv, "lr=1", 2, 9.0),
        run(cv, "lr=2", 0, 3.0), run(cv, "lr=2", 1, 3.0), run(cv, "lr=2", 2, 0.5, diverged=True),
    ]  # fmt: skip
    assert cv.best_of(runs) == "lr=2"  # median 3 (inf, 3, 3) beats median 9
    assert cv.best_of(runs[:3]) == "lr=1"


def test_record_measures_against_adam_of_the_same_seed(cv: ModuleType) -> None:
    adam = cv.Run("t", "adam", "lr=1", 0, curve(cv, [(0.0, 10.0), (2.0, 4.0)]), 2.0, 10,
                  False, False, 0, 0)  # fmt: skip
    fast = cv.Run("t", "kfac", "default", 0, curve(cv, [(0.0, 10.0), (0.5, 4.0), (1.0, 3.0)]),
                  1.0, 5, False, False, 0, 0)  # fmt: skip
    entry = cv.record(fast, adam, False)
    assert entry["adam_final_loss"] == 4.0
    assert entry["time_to_adam_ratio"] == pytest.approx(0.25)
    assert entry["epochs_to_adam_ratio"] == pytest.approx(1.0)  # epoch 1 of Adam's 1
    assert entry["step_time_ratio"] == pytest.approx((1.0 / 5) / (2.0 / 10))
    assert entry["final_loss"] == 3.0 and entry["loss_at_adam_time"] == 3.0
    never = cv.Run("t", "kfac", "default", 0, curve(cv, [(0.0, 10.0), (9.0, 5.0)]), 9.0, 5,
                   False, False, 0, 0)  # fmt: skip
    assert cv.record(never, adam, False)["time_to_adam_ratio"] is None
    assert cv.record(never, adam, False)["epochs_to_adam_ratio"] is None


def test_a_paired_run_is_measured_against_the_adam_clock_timed_alongside(cv: ModuleType) -> None:
    adam = cv.Run("t", "adam", "lr=1", 0, curve(cv, [(0.0, 10.0), (2.0, 4.0)]), 2.0, 10,
                  False, False, 0, 0)  # fmt: skip
    fast = cv.Run("t", "kfac", "default", 0, curve(cv, [(0.0, 10.0), (0.5, 4.0), (1.0, 3.0)]),
                  1.0, 5, False, False, 0, 0, 4.0)  # Adam took 4 s alongside, not 2  # fmt: skip
    entry = cv.record(fast, adam, False)
    assert entry["paired"] and entry["adam_time_s"] == 4.0
    assert entry["time_to_adam_ratio"] == pytest.approx(0.5 / 4.0)
    assert entry["step_time_ratio"] == pytest.approx((1.0 / 5) / (4.0 / 10))
    assert entry["adam_final_loss"] == 4.0  # the target is still tuned Adam's own run's
    assert not cv.record(adam, adam, True)["paired"]


def test_adam_alongside_leaves_the_run_as_it_was(cv: ModuleType) -> None:
    task = cv.digits_mlp_task(quick=True)
    kfac = cv.curvature("kfac")
    alone = cv.train(task, kfac, 0, None)
    paired = cv.train(task, kfac, 0, None, alongside=cv.adam(3e-3))
    assert paired.curve.losses == alone.curve.losses  # the same run to the bit
    assert paired.curve.epochs == alone.curve.epochs and paired.steps == alone.steps
    assert alone.adam_time is None and paired.adam_time is not None and paired.adam_time > 0.0
    capped = cv.train(task, kfac, 0, 0.0, alongside=cv.adam(3e-3))  # stops at its first check
    assert capped.stopped and capped.steps < task.epochs * task.steps_per_epoch
    assert capped.adam_time is not None and capped.adam_time > 0.0  # scaled to the whole run


def test_a_diverging_run_stops_and_is_flagged(cv: ModuleType) -> None:
    task = cv.digits_mlp_task(quick=True)
    blowup = cv.Method("sgd", "lr=1e3", lambda m, _: torch.optim.SGD(m.parameters(), lr=1e3), False)
    result = cv.train(task, blowup, 0, None)
    assert result.diverged and result.final_loss is None
    assert result.steps < task.epochs * task.steps_per_epoch


def test_small_run_writes_json_markdown_and_plots(cv: ModuleType, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    cv.main(["--quick", "--tasks", "digits-mlp", "--methods", "adam,kfac", "--seeds", "0,1",
             "--no-progress", "--out", str(tmp_path)])  # fmt: skip
    assert torch.get_num_threads() == threads
    payload = json.loads((tmp_path / "convergence.json").read_text())
    runs = payload["runs"]
    assert len(runs) == 2 * (len(cv.ADAM_LRS) + 1)
    assert all(set(r) >= KEYS for r in runs)
    kfac = [r for r in runs if r["method"] == "kfac"]
    assert [r["config"] for r in kfac] == ["default", "default"]
    assert all(r["paired"] for r in kfac) and not any(r["paired"] for r in runs if r not in kfac)
    for r in kfac:
        tuned = next(a for a in runs if a["method"] == "adam" and a["tuned_choice"]
                     and a["seed"] == r["seed"])  # fmt: skip
        assert r["adam_final_loss"] == tuned["final_loss"]
        assert not r["diverged"]
        # A run past the time cap has no final loss; one that finished has a finite one.
        assert r["stopped_at_time_cap"] == (r["final_loss"] is None)
        assert r["final_loss"] is None or math.isfinite(r["final_loss"])
    assert payload["bar"]["kfac"]["tasks"] == 1
    machine = payload["machine"]
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(machine["bfloat16_products"], bool)
    report = (tmp_path / "convergence.md").read_text()
    assert f"{machine['cpu_capability']}; bfloat16 products " in report.splitlines()[0]
    assert "### digits-mlp" in report
    assert (tmp_path / "convergence_digits-mlp.png").stat().st_size > 0


def test_data_root_adds_the_image_autoencoders_whose_files_are_there(
    cv: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.examples.test_image_data import write_fashion

    write_fashion(tmp_path / "fashion")
    args = cv.parse_args(["--quick", "--methods", "adam", "--data-root", str(tmp_path / "fashion")])
    tasks, baselines, methods, seeds = cv.plan(args)
    names = [t.name for t in tasks]
    assert names == [*cv.TASKS, "fashion-mnist-ae"]
    fashion = tasks[-1]
    assert fashion.inputs.shape == (12, 784) and torch.equal(fashion.inputs, fashion.targets)
    assert fashion.report_scale == 784.0
    assert "skipping mnist" in capsys.readouterr().err  # its files are not there
    assert [m.config for m in baselines] == [f"lr={lr:g}" for lr in cv.ADAM_LRS]
    assert methods == [] and seeds == [0]


def test_two_level_methods_are_selectable_but_not_run_by_default(cv: ModuleType) -> None:
    from curvlib.approx.two_level import TwoLevel

    for name in cv.TWO_LEVEL:
        approx = cv.approximation(name)()
        assert isinstance(approx, TwoLevel), name
    args = cv.parse_args(["--quick", "--methods", "adam,kfac+nicolaides", "--tasks", "digits-mlp"])
    _, _, methods, _ = cv.plan(args)
    assert [m.name for m in methods] == ["kfac+nicolaides"]


def _planned(cv: ModuleType, *flags: str, methods: str = "adam") -> list[Any]:
    """The methods ``--quick --methods methods --tasks digits-mlp *flags`` would run."""
    args = cv.parse_args(["--quick", "--methods", methods, "--tasks", "digits-mlp", *flags])
    return list(cv.plan(args)[2])


def test_kfac_configs_from_the_command_line_change_those_arguments(cv: ModuleType) -> None:
    methods = _planned(
        cv, "--kfac", "kl_clip=1e-2,momentum=0.9,t_cov=5", "--kfac", "lr=auto,kl_clip=None"
    )
    assert [(m.name, m.config) for m in methods] == [
        ("kfac", "kl_clip=1e-2,momentum=0.9,t_cov=5"), ("kfac", "lr=auto,kl_clip=None"),
    ]  # fmt: skip
    model = nn.Sequential(nn.Linear(4, 3))
    opt = methods[0].build(model, nn.CrossEntropyLoss())
    assert opt.kl_clip == 1e-2 and opt.engine.t_cov == 5
    assert opt.param_groups[0]["momentum"] == 0.9
    opt = methods[1].build(model, nn.CrossEntropyLoss())
    assert opt.kl_clip is None and opt.param_groups[0]["lr"] == "auto"
    with pytest.raises(SystemExit, match="key=value"):
        cv.plan(cv.parse_args(["--quick", "--methods", "adam", "--kfac", "momentum"]))


def test_ekfac_and_kpsvd_configs_from_the_command_line_are_timed_alongside_adam(
    cv: ModuleType,
) -> None:
    methods = _planned(
        cv, "--ekfac", "kl_clip=1e-3,t_inv=30", "--kpsvd", "momentum=0", methods="adam,ekfac"
    )
    assert [(m.name, m.config, cv.paired_run(m)) for m in methods] == [
        ("ekfac", "default", True), ("ekfac", "kl_clip=1e-3,t_inv=30", True),
        ("kpsvd", "momentum=0", True),
    ]  # fmt: skip
    opt = methods[1].build(nn.Sequential(nn.Linear(4, 3)), nn.CrossEntropyLoss())
    assert type(opt.engine.approx).__name__ == "EKFAC"
    assert opt.kl_clip == 1e-3 and opt.engine.t_inv == 30
    assert not cv.paired_run(cv.adam(1e-3))
    assert not cv.paired_run(cv.kfac_grid()[0])
    with pytest.raises(SystemExit, match="--kpsvd takes key=value"):
        cv.plan(cv.parse_args(["--quick", "--methods", "adam", "--kpsvd", "t_inv"]))


def test_approximation_arguments_from_the_command_line_reach_its_constructor(
    cv: ModuleType,
) -> None:
    methods = _planned(cv, "--kpsvd", "approx.tol=1e-3,momentum=0", "--kfac", "approx.decay=0.9")
    assert [(m.name, m.config) for m in methods] == [
        ("kfac", "approx.decay=0.9"), ("kpsvd", "approx.tol=1e-3,momentum=0"),
    ]  # fmt: skip
    model = nn.Sequential(nn.Linear(4, 3))
    kfac = methods[0].build(model, nn.CrossEntropyLoss())
    assert kfac.engine.approx.decay == 0.9
    kpsvd = methods[1].build(model, nn.CrossEntropyLoss())
    assert kpsvd.engine.approx.tol == 1e-3 and kpsvd.param_groups[0]["momentum"] == 0.0
    for bad, match in [("approx.tolerance=1e-3", "takes no argument 'tolerance'; it takes"),
                       ("approx.=1", "takes key=value")]:  # fmt: skip
        with pytest.raises(SystemExit, match=match):
            cv.plan(cv.parse_args(["--quick", "--methods", "adam", "--kpsvd", bad]))


def test_the_report_names_what_sets_the_speed_of_the_cpu(cv: ModuleType) -> None:
    m = {"cpu": "AMD EPYC", "cpu_model": "family 25, model 17", "cpu_capability": "AVX512",
         "bfloat16_products": True}  # fmt: skip
    assert cv.cpu_line(m) == "AMD EPYC [family 25, model 17; AVX512; bfloat16 products on]"
    no_model = {**m, "cpu_model": None, "bfloat16_products": False}
    assert cv.cpu_line(no_model) == "AMD EPYC [AVX512; bfloat16 products off]"
    assert cv.cpu_line({"cpu": "AMD EPYC"}) == "AMD EPYC"  # a run recorded before these keys
