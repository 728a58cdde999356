r"""Run a script with KFAC's factors of layers with several positions in the reduce form.

$A = \frac1N\sum_n \bar a_n \bar a_n^\top$ with $\bar a_n$ the mean of sample
$n$'s inputs over positions, $G = \frac1N\sum_{k,n} g_{kn} g_{kn}^\top$ with
$g_{kn}$ the sum of its output gradients over positions ("KFAC-reduce",
Eschenhagen et al. 2023), patched into the extractor from outside; layers with
one position keep their factors.

    python reduce_run.py SCRIPT ARGS...       (from the repository root)
"""

import dataclasses
import runpy
import sys

import curvlib.extract._session as session_module
import curvlib.extract.statistics as statistics_module
from curvlib.core.stats import KroneckerFactors, StatKind

layer_statistics = statistics_module.layer_statistics


def reduced(layer, inputs, grads, required, dtype=None, num_samples=None):  # type: ignore[no-untyped-def]
    n, t = inputs.shape[:2]
    if t == 1 or StatKind.KRONECKER not in required:
        return layer_statistics(layer, inputs, grads, required, dtype, num_samples)
    others = required - {StatKind.KRONECKER}
    out = layer_statistics(layer, inputs, grads, others, dtype, num_samples)
    a = inputs.detach().mean(1)
    g = grads.detach().sum(2).reshape(-1, grads.shape[-1])
    A = (a.T @ a).div_(n)
    G = (g.T @ g).div_(num_samples or n)
    dtype = dtype or inputs.dtype
    kron = KroneckerFactors(A=A.to(dtype), G=G.to(dtype), num_positions=t)
    return dataclasses.replace(out, kronecker=kron)


statistics_module.layer_statistics = reduced
session_module.layer_statistics = reduced
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
