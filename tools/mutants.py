"""Mutation check: plant small, plausible defects in a scratch copy and run the tests.

Each mutant replaces one exact piece of library source (it must occur exactly
once, so a mutant that no longer applies fails loudly instead of passing) in a
copy of the source tree in a temporary directory, and runs the tests that should
notice. A mutant is *killed* when those tests fail, and *survives* when they pass:
a surviving mutant is a defect the test suite cannot see.

Run it by hand from the repository root (it is not part of CI, and pytest does
not collect it)::

    python tools/mutants.py            # every mutant
    python tools/mutants.py --list     # their names
    python tools/mutants.py pi_one mc_scale_0.98

The outcome of the last run is in the testing notes of ``docs/contributing.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("curvlib", "tests", "examples", "benchmarks", "docs", "pyproject.toml", "mkdocs.yml")
"""What the scratch copy holds: the package, its tests and what the tests read."""


@dataclass(frozen=True)
class Mutant:
    """One planted defect.

    Attributes:
        name: Short identifier.
        what: The defect in words.
        path: Source file, relative to the repository root.
        old: Exact source text, present exactly once.
        new: Its replacement.
        tests: The test files or node ids that should kill it.
    """

    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


_LOSSES = "curvlib/extract/losses.py"
_MC_FACTOR = "        factor = math.sqrt(scale / mc_samples)\n"
_EXTRACT_TESTS = ("tests/extract/test_monte_carlo.py", "tests/extract/test_oracle.py")
_OPERATOR_TESTS = ("tests/approx/test_operator.py",)
_PI = "    pi = torch.where((mean_a <= 0.0) | (mean_g <= 0.0), 1.0, (mean_a / mean_g).sqrt())\n"
_PI_TESTS = ("tests/approx/test_operator.py", "tests/approx/test_rearranged.py")

MUTANTS = (
    Mutant(
        "mc_scale_0.95",
        "every Monte-Carlo statistic scaled by 0.95",
        _LOSSES,
        _MC_FACTOR,
        "        factor = math.sqrt(0.95 * scale / mc_samples)\n",
        _EXTRACT_TESTS,
    ),
    Mutant(
        "mc_scale_0.98",
        "every Monte-Carlo statistic scaled by 0.98",
        _LOSSES,
        _MC_FACTOR,
        "        factor = math.sqrt(0.98 * scale / mc_samples)\n",
        _EXTRACT_TESTS,
    ),
    Mutant(
        "mc_bce_0.97",
        "the Monte-Carlo statistics of BCEWithLogitsLoss alone scaled by 0.97",
        _LOSSES,
        "            return factor * (probs - (uniform < probs).to(output.dtype))\n",
        "            return 0.97**0.5 * factor * (probs - (uniform < probs).to(output.dtype))\n",
        _EXTRACT_TESTS,
    ),
    Mutant(
        "no_layers",
        "the extractor returns no layers",
        "curvlib/extract/_session.py",
        "            layers=layers, fisher_type=ex._fisher_type,",
        "            layers={}, fisher_type=ex._fisher_type,",
        ("tests/extract/test_oracle.py",),
    ),
    Mutant(
        "diagonal_condition_1",
        "Diagonal's condition number always 1.0",
        "curvlib/approx/diagonal.py",
        "        return (diag.max() + damping) / (diag.min() + damping)\n",
        "        return torch.ones((), dtype=diag.dtype)\n",
        _OPERATOR_TESTS,
    ),
    Mutant(
        "ekfac_condition_mean",
        "EKFAC's condition number from the mean scaling instead of the smallest",
        "curvlib/approx/ekfac.py",
        "    return damped.max() / damped.min()\n",
        "    return damped.max() / damped.mean()\n",
        _OPERATOR_TESTS,
    ),
    Mutant(
        "pi_one",
        "the factored damping's pi fixed at 1",
        "curvlib/linalg/factors.py",
        _PI,
        "    pi = torch.ones_like(mean_a)\n",
        _PI_TESTS,
    ),
    Mutant(
        "pi_inverted",
        "the factored damping's pi inverted",
        "curvlib/linalg/factors.py",
        _PI,
        "    pi = torch.where((mean_a <= 0.0) | (mean_g <= 0.0), 1.0, (mean_g / mean_a).sqrt())\n",
        _PI_TESTS,
    ),
    Mutant(
        "ekfac_sample_var_1.05",
        "EKFAC's draws with 5% more variance",
        "curvlib/approx/ekfac.py",
        "        return basis_g @ (z * torch.rsqrt(scalings)) @ basis_a.T\n",
        "        return basis_g @ (z * torch.rsqrt(scalings / 1.05)) @ basis_a.T\n",
        _OPERATOR_TESTS,
    ),
    Mutant(
        "diagonal_sample_var_1.05",
        "Diagonal's draws with 5% more variance",
        "curvlib/approx/diagonal.py",
        "        return z * torch.rsqrt(diag + damping)\n",
        "        return z * torch.rsqrt((diag + damping) / 1.05)\n",
        _OPERATOR_TESTS,
    ),
    Mutant(
        "split_fit_rho",
        "a split update folds the owner's fit with a running-average weight 0.1% off",
        "curvlib/approx/kpsvd.py",
        "        self._fold(tuple(factors), rho)\n",
        "        self._fold(tuple(factors), rho * 0.999)\n",
        ("tests/approx/test_split_update.py",),
    ),
    Mutant(
        "split_ekfac_scalings_transposed",
        "EKFAC's split update reads the owner's scalings in the wrong order",
        "curvlib/approx/ekfac.py",
        "        scalings = packed[-g * a :].reshape(g, a).clone()\n",
        "        scalings = packed[-g * a :].reshape(a, g).T.clone()\n",
        ("tests/approx/test_split_update.py",),
    ),
    Mutant(
        "sent_inverse_condition",
        "a KFAC inverse rebuilt from its packed form carries twice its condition number",
        "curvlib/approx/kfac.py",
        "        condition = float(last)\n",
        "        condition = 2.0 * float(last)\n",
        ("tests/approx/test_split_update.py",),
    ),
    Mutant(
        "autocast_not_widened",
        "statistics of an autocast forward formed in float16/bfloat16 and cast afterwards",
        "curvlib/extract/statistics.py",
        "    return tensor.to(dtype) if wider else tensor\n",
        "    return tensor\n",
        ("tests/extract/test_autocast.py",),
    ),
    Mutant(
        "deferred_gradient_check_ignored",
        "a regular step reads the gradients' finiteness with the measurements and ignores it",
        "curvlib/optim/guards.py",
        "    if gradients_finite is not None and not flat.pop():\n",
        "    if gradients_finite is not None and not (flat.pop() or True):\n",
        ("tests/robustness/test_faults.py",),
    ),
    Mutant(
        "draft_ignores_cholesky_info",
        "a drafted KFAC inverse is finished although its first Cholesky failed",
        "curvlib/approx/kfac.py",
        "            if v[0] or v[1]:\n                return None\n",
        "            if False:\n                return None\n",
        ("tests/approx/test_inverse_drafts.py",),
    ),
    Mutant(
        "draft_flush_limits_swapped",
        "a drafted KFAC inverse flushes G's inverse at A's limit",
        "curvlib/approx/kfac.py",
        "            g = flush_below(g_inv, negligible_limit(v[10], v[11], g_inv.dtype))\n",
        "            g = flush_below(g_inv, negligible_limit(v[12], v[13], g_inv.dtype))\n",
        ("tests/approx/test_inverse_drafts.py",),
    ),
    Mutant(
        "draft_eigenbasis_unchecked",
        "a drafted EKFAC eigenbasis is adopted with non-finite eigenvalues",
        "curvlib/approx/ekfac.py",
        "        if not (v[0] and v[1]):\n",
        "        if False:\n",
        ("tests/approx/test_inverse_drafts.py",),
    ),
    Mutant(
        "ahead_flush_limits_swapped",
        "a KFAC inverse built ahead of its checks flushes G's inverse at A's limit",
        "curvlib/approx/kfac.py",
        "device_negligible_limit(extremes[0], extremes[1], g_inv.dtype)",
        "device_negligible_limit(extremes[2], extremes[3], g_inv.dtype)",
        ("tests/approx/test_inverse_drafts.py",),
    ),
    Mutant(
        "ahead_failed_directions_kept",
        "the directions of an inverse that failed its late check are used after its rebuild",
        "curvlib/optim/optimizer.py",
        "        if not rebuilt:\n            return checks\n",
        "        if True:\n            return checks\n",
        ("tests/optim/test_inverse_ahead.py",),
    ),
    Mutant(
        "overlap_installs_fresh",
        "an overlapped rebuild installs the current estimate's inverse, not the one started before",
        "curvlib/optim/engine.py",
        "        build, self._building = self._building, None\n",
        "        device = self._own_layers[0].weight.device\n"
        "        build = InverseBuild.start(self.approx, self.damping, self.step_count, device)\n",
        ("tests/optim/test_overlap_inverse.py",),
    ),
    Mutant(
        "overlap_checkpoint_drops_build",
        "a checkpoint taken while an inverse is being built resumes without it",
        "curvlib/optim/engine.py",
        "        if saved is not None and self.overlap_inverse:\n",
        "        if False:\n",
        ("tests/optim/test_overlap_inverse.py",),
    ),
    Mutant(
        "lanczos_device_breakdown_kept",
        "a Lanczos sweep with its norms on the device keeps the steps after a breakdown",
        "curvlib/linalg/rearrange/svd.py",
        "            del Us[j:], MUs[j:], Vs[j + 1 :], MVs[j + 1 :]\n",
        "            pass\n",
        ("tests/linalg/test_sample_space.py",),
    ),
    Mutant(
        "power_device_zero_unseen",
        "a power iteration with its norms on the device takes a zero operator's NaN pair",
        "curvlib/linalg/rearrange/svd.py",
        "            if not (alpha > tiny and beta > tiny):\n",
        "            if False:\n",
        ("tests/linalg/test_sample_space.py",),
    ),
    Mutant(
        "given_grams_ignored",
        "an exact natural-gradient inverse from given kernel blocks recomputes its own",
        "curvlib/approx/natural_gradient.py",
        "            blocks = [RowsWithGram(rows[name], grams[name]) for name in rows]\n",
        "            pass\n",
        ("tests/approx/test_natural_gradient.py",),
    ),
    Mutant(
        "owner_gram_failure_unsent",
        "a kernel block that failed on its owner is sent as zeros, not NaN",
        "curvlib/optim/engine.py",
        "            owned = {name: torch.full_like(like[name], math.nan) for name in mine}\n",
        "            owned = {name: torch.zeros_like(like[name]) for name in mine}\n",
        ("tests/distributed/test_data_parallel.py",),
    ),
    Mutant(
        "work_cost_ignored",
        "the owners are balanced by the Kronecker factorisations whatever the approximation",
        "curvlib/optim/engine.py",
        '                cost = getattr(self.approx, "work_cost", None)\n',
        "                cost = None\n",
        ("tests/distributed/test_data_parallel.py",),
    ),
    Mutant(
        "statistics_check_ignored",
        "the statistics' finiteness, read with the gradients' check, is taken as finite",
        "curvlib/optim/optimizer.py",
        "            engine.statistics_checked(bool(value))\n",
        "            engine.statistics_checked(True)\n",
        ("tests/robustness/test_faults.py", "tests/optim/test_optimizer.py"),
    ),
    Mutant(
        "autocast_keeps_backpack",
        "Backend.AUTO keeps BackPACK for a forward under autocast",
        "curvlib/extract/_session.py",
        "            self.use_backpack = False\n",
        "            pass\n",
        ("tests/extract/test_autocast.py",),
    ),
    Mutant(
        "deferred_skip_moves_buffers",
        "a step refused on the device still decays the momentum buffers",
        "curvlib/optim/kernels.py",
        "        keep = torch.where(ok, momentum * clip, 1.0)  # the old buffer's factor\n",
        "        keep = momentum * clip\n",
        ("tests/optim/test_deferred_checks.py",),
    ),
    Mutant(
        "deferred_nan_direction_kept",
        "a refused step's direction is not selected away (its NaN reaches the parameters)",
        "curvlib/optim/kernels.py",
        "torch.where(ok, directions[layer.name], 0.0) for layer in layers}",
        "directions[layer.name] for layer in layers}",
        ("tests/optim/test_deferred_checks.py",),
    ),
    Mutant(
        "deferred_uphill_ignored",
        "the device-side guards do not look for uphill directions",
        "curvlib/optim/deferred.py",
        "        bad.append((i < -math.sqrt(eps) * g * d).any())\n",
        "",
        ("tests/optim/test_deferred_checks.py",),
    ),
    Mutant(
        "deferred_norm_clip_unsquared",
        "the tracked buffer norm is scaled by the clip, not its square",
        "curvlib/optim/deferred.py",
        "    square = clip * clip",
        "    square = clip",
        ("tests/optim/test_deferred_checks.py",),
    ),
    Mutant(
        "precond_deferred_unselected",
        "preconditioner mode with deferred checks rewrites a NaN gradient anyway",
        "curvlib/optim/preconditioner.py",
        "p.grad.copy_(torch.where(finite, d * nu.to(d.dtype), p.grad))",
        "p.grad.copy_(d * nu.to(d.dtype))",
        ("tests/optim/test_deferred_checks.py",),
    ),
)


def _scratch_copy(target: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "site")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, target / name)


def _apply(mutant: Mutant, tree: Path) -> None:
    path = tree / mutant.path
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(
            f"mutant {mutant.name!r}: the text to replace occurs {count} times in "
            f"{mutant.path}, not once; update the mutant in tools/mutants.py."
        )
    path.write_text(text.replace(mutant.old, mutant.new))


def _run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import curvlib; print(curvlib.__file__)"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(where).is_relative_to(tree.resolve()) and not Path(where).is_relative_to(tree):
        raise SystemExit(f"the scratch copy imports curvlib from {where}, not from {tree}")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else done.stderr.strip()[-200:]
    failed = [
        line.split(" - ")[0][len("FAILED ") :] for line in lines if line.startswith("FAILED ")
    ]
    return done.returncode, f"{summary}; first failure: {failed[0]}" if failed else summary


def run(mutant: Mutant | None, tests: tuple[str, ...]) -> tuple[str, str, float]:
    """Run ``tests`` on a scratch copy with ``mutant`` applied (none: the baseline)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="curvlib-mutant-") as scratch:
        tree = Path(scratch)
        _scratch_copy(tree)
        if mutant is not None:
            _apply(mutant, tree)
        code, summary = _run_tests(tree, tests)
    if code == 0:
        outcome = "passed" if mutant is None else "SURVIVED"
    elif code == 1:
        outcome = "FAILED" if mutant is None else "killed"
    else:
        outcome = f"error (pytest exit code {code})"
    return outcome, summary, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Apply the chosen mutants one at a time; exit 1 if any survives or a baseline fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the run of the unmutated tests"
    )
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTANTS}
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:26s} {m.what}  [{m.path}]")
        return 0
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutants {unknown}; choose from {sorted(by_name)}")
    chosen = [by_name[n] for n in args.names] if args.names else list(MUTANTS)
    bad = False
    if not args.no_baseline:
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        outcome, summary, seconds = run(None, tests)
        print(f"{'(baseline)':26s} {outcome:9s} {seconds:6.1f}s  {summary}", flush=True)
        bad = outcome != "passed"
    for mutant in chosen:
        outcome, summary, seconds = run(mutant, mutant.tests)
        print(f"{mutant.name:26s} {outcome:9s} {seconds:6.1f}s  {summary}", flush=True)
        bad = bad or outcome != "killed"
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
