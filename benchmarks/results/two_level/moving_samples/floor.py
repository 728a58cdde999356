r"""ResidualSpace's step against its floor: KFAC's plain step plus what the space must add.

Run (one thread, an otherwise idle machine):

    python floor.py [ROUNDS]

On the step-time benchmark's MNIST-sized autoencoder at a batch of 1000 and its
hyper-parameters (``benchmarks/step_time.py``, ``t_cov = t_inv = 10``), after 12
steps: KFAC's plain step and ``TwoLevel(KFAC(), ResidualSpace())``'s, interleaved
with the parts the space cannot do without on each step, timed on the live
two-level preconditioner: the second fine apply (the space's vector *is* the fine
inverse applied to the residual), $F\zeta$ from the stored statistics samples (two
passes, $U\zeta$ and $U^\top(U\zeta)$) and the projections of the new vectors on
them (one pass). The floor is KFAC's plain step plus those parts; what is left
is the coarse solve and $O(P)$ work. Medians over ``ROUNDS`` rounds (default 20).
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import step_time as st

from curvlib import KFAC, PreconditionedOptimizer
from curvlib.approx.coarse import ResidualSpace
from curvlib.approx.two_level import TwoLevel
from curvlib.optim.engine import layer_grads


def optimizer(two_level: bool) -> tuple[PreconditionedOptimizer, torch.nn.Module, object]:
    model, loss_fn, x, y = st.autoencoder_problem(1000)
    approx = KFAC(damping_mode="pi")
    if two_level:
        approx = TwoLevel(approx, ResidualSpace())
    opt = PreconditionedOptimizer(
        model, approx, loss_fn=loss_fn, lr=st.LR, damping=st.DAMPING, kl_clip=st.KL_CLIP,
        momentum=st.MOMENTUM, t_cov=10, t_inv=10, refresh_on_move=0,
    )  # fmt: skip

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with opt.record():
            loss_fn(model(x), y).backward()
        opt.step()

    return opt, model, step


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(1)
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    _, _, kfac_step = optimizer(False)
    tl, _, tl_step = optimizer(True)
    for _ in range(12):
        kfac_step()
        tl_step()
    pre = tl.engines[0]._precond
    fisher = tl.engines[0].approx._fisher()
    grads = layer_grads(tl.layers)
    zeta = pre.fine.apply(grads)
    vectors = {name: z.unsqueeze(0) for name, z in zeta.items()}
    parts = {
        "KFAC plain step": kfac_step,
        "ResidualSpace plain step": tl_step,
        "fine apply": lambda: pre.fine.apply(grads),
        "F zeta (U zeta, U^T(U zeta))": lambda: fisher.matvec(dict(zeta)),
        "projections": lambda: fisher.projection(vectors),
    }
    times: dict[str, list[float]] = {name: [] for name in parts}
    done = 12
    while len(times["KFAC plain step"]) < rounds:
        if done % 10 == 0:  # a statistics step for both: not timed
            kfac_step()
            tl_step()
        else:
            for name, fn in parts.items():
                times[name].append(timed(fn))
        done += 1
    med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    floor = sum(v for k, v in med.items() if k != "ResidualSpace plain step")
    samples = next(iter(fisher.rows.values())).num_rows
    print(f"# {rounds} rounds, one thread, batch 1000, {samples} samples stored")
    for name, value in med.items():
        print(f"{name}: {value:.1f} ms")
    print(
        f"floor (KFAC plain + the three parts): {floor:.1f} ms, "
        f"ResidualSpace plain / floor {med['ResidualSpace plain step'] / floor:.3f}, "
        f"floor / KFAC plain {floor / med['KFAC plain step']:.3f}"
    )


if __name__ == "__main__":
    main()
