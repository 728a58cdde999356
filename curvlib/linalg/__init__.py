"""Pure tensor maths shared by the approximations and the optimizer.

Damped Kronecker inverses, ``eigh`` with retry, two-term Kronecker inverses,
power SVD and Golub–Kahan–Lanczos on the rearranged Fisher (matrix-free or in
sample space), Woodbury solves, and per-layer factorisations run concurrently
on the CPU's threads live here. This package imports torch, NumPy (host-side masks) and
[`curvlib.core`][curvlib.core] only.
"""

from curvlib.linalg.factors import (
    Eigh,
    FactorizationError,
    cholesky_inverse,
    damped_cholesky,
    damped_inverse,
    eigh,
    first_cholesky,
    first_eigh,
    flush_negligible,
    flush_subnormals,
    flush_subnormals_,
    live_coordinates,
    pi_shifts,
    pi_shifts_of_means,
    pi_split,
    pi_split_of_means,
    symmetrize,
)
from curvlib.linalg.kron import KroneckerSumInverse, two_term_inverse
from curvlib.linalg.parallel import default_workers, run_jobs
from curvlib.linalg.rearrange import (
    Coordinates,
    Deflated,
    DeflatedCoordinates,
    RearrangedFisher,
    RearrangedOperator,
    SingularTriple,
    balanced_factors,
    deflated,
    effective_tol,
    lanczos_svd,
    power_svd,
    psd_start,
)
from curvlib.linalg.sample_space import (
    FormCosts,
    RearrangedForm,
    SampleSpaceFisher,
    SideRoute,
    choose_form,
    form_costs,
    rearranged,
    side_costs,
)
from curvlib.linalg.woodbury import WoodburyInverse, layer_rows, woodbury_solve

__all__ = [
    "Coordinates",
    "Deflated",
    "DeflatedCoordinates",
    "Eigh",
    "FactorizationError",
    "FormCosts",
    "KroneckerSumInverse",
    "RearrangedFisher",
    "RearrangedForm",
    "RearrangedOperator",
    "SampleSpaceFisher",
    "SideRoute",
    "SingularTriple",
    "WoodburyInverse",
    "balanced_factors",
    "cholesky_inverse",
    "choose_form",
    "damped_cholesky",
    "damped_inverse",
    "default_workers",
    "deflated",
    "effective_tol",
    "eigh",
    "first_cholesky",
    "first_eigh",
    "flush_negligible",
    "flush_subnormals",
    "flush_subnormals_",
    "form_costs",
    "lanczos_svd",
    "layer_rows",
    "live_coordinates",
    "pi_shifts",
    "pi_shifts_of_means",
    "pi_split",
    "pi_split_of_means",
    "power_svd",
    "psd_start",
    "rearranged",
    "run_jobs",
    "side_costs",
    "symmetrize",
    "two_term_inverse",
    "woodbury_solve",
]
