"""EKFAC's damped inverse applied in bfloat16 against float64, layer by layer.

Trains a task of the convergence benchmark with EKFAC at its defaults for STEPS
steps (seed 0), then applies every layer's damped inverse to that step's
gradient three ways: in float64 (the reference), and as ``EigenbasisInverse``
applies it in bfloat16 (bases, gradient and rotated matrix rounded). Prints the
condition number of the damped operator, the relative error of the bfloat16
direction in the Euclidean norm and in the norm of the damped operator
(``||x||_{P^-1}``), the bound ``2^-8 sqrt(kappa)`` of the latter, and the
cosines of both directions with the gradient.

    python errors.py TASK STEPS      (from this folder or by path)
    python errors.py curves 100
"""

import math
import sys
import warnings
from pathlib import Path

root = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(root / "benchmarks"), str(root / "examples")]
import torch  # noqa: E402

torch.set_num_threads(1)
import convergence as cv  # noqa: E402

from curvlib import EKFAC, PreconditionedOptimizer  # noqa: E402
from curvlib.linalg.kron import eigenbasis_apply  # noqa: E402

warnings.simplefilter("ignore")
task, steps = cv.TASKS[sys.argv[1]](False), int(sys.argv[2])
torch.manual_seed(0)
model = task.make_model()
opt = PreconditionedOptimizer(model, EKFAC(), loss_fn=task.loss_fn)
order = torch.Generator().manual_seed(0)
for step in range(steps):
    if step % task.steps_per_epoch == 0:
        perm = torch.randperm(len(task.inputs), generator=order)
    b = step % task.steps_per_epoch
    idx = perm[b * task.batch_size : (b + 1) * task.batch_size]
    opt.zero_grad()
    with opt.record():
        task.loss_fn(model(task.inputs[idx]), task.targets[idx]).backward()
    if step < steps - 1:
        opt.step()

modules = dict(model.named_modules())
damping = float(opt.engine.precond_damping)
print(f"{task.name}, EKFAC at its defaults, gradient of step {steps - 1}, damping {damping:.3g}")


def p_norm(x: torch.Tensor, q_g: torch.Tensor, q_a: torch.Tensor, d: torch.Tensor) -> float:
    """``||x||_{P^-1}`` for ``P^-1 = Q diag(d) Q^T``."""
    return float(((q_g.T @ x @ q_a).square() * d).sum().sqrt())


def cosine(x: torch.Tensor, g: torch.Tensor) -> float:
    return float((x * g).sum() / x.norm() / g.norm())


for name, block in opt.engine.approx.blocks.items():
    module = modules[name]
    grad = module.weight.grad.reshape(module.weight.shape[0], -1)
    if module.bias is not None:
        grad = torch.cat([grad, module.bias.grad[:, None]], 1)
    if not grad.any():
        print(f"{name:>4} {tuple(grad.shape)}: zero gradient (dead units)")
        continue
    basis_a, basis_g, _ = block._estimate()
    damped = block._damped(damping)
    q_g, q_a, d, g = basis_g.double(), basis_a.double(), damped.double(), grad.double()
    exact = q_g @ ((q_g.T @ g @ q_a) / d) @ q_a.T
    low = torch.bfloat16
    rounded = eigenbasis_apply(basis_g.to(low), basis_a.to(low), 1.0 / damped, grad).double()

    kappa = float(d.max() / d.min())
    err = rounded - exact
    print(
        f"{name:>4} {tuple(grad.shape)!s:12} kappa {kappa:9.3g}  "
        f"error {float(err.norm() / exact.norm()):.3g}, in P^-1-norm "
        f"{p_norm(err, q_g, q_a, d) / p_norm(exact, q_g, q_a, d):.3g} "
        f"(bound {2**-8 * math.sqrt(kappa):.3g})  "
        f"cosine with the gradient {cosine(exact, g):.4f} (float64), "
        f"{cosine(rounded, g):.4f} (bfloat16)"
    )
