r"""Which rank inverts which layer: greedy by estimated cost.

With ``DataParallel(split_inverses=True)`` every layer's damped inverse is
built by one rank, its *owner*, which also preconditions that layer's
gradient and broadcasts the direction; the other ranks skip the factorisation.
The owners are chosen by the longest-processing-time rule: layers in
decreasing order of cost, each to the rank with the least work so far, so the
busiest rank does at most $\frac43$ of the optimum (Graham 1969). Each
approximation estimates its layers' costs (``work_cost``): that of a
Kronecker-factored block is its two factorisations, $d_\text{out}^3 +
d_\text{in}^3$ ([`inverse_cost`][curvlib.distributed.inverse_cost], the
default); exact natural gradient's is its kernel block's, the diagonal's the
number of parameters ([Distributed training](../distributed.md#splitting-the-inverses)).
"""

from __future__ import annotations

from collections.abc import Mapping

from curvlib.core.layout import kronecker_cost


def inverse_cost(out_dim: int, in_dim: int) -> float:
    r"""$d_\text{out}^3 + d_\text{in}^3$: [`kronecker_cost`][curvlib.core.kronecker_cost]."""
    return kronecker_cost(out_dim, in_dim)


def assign_owners(costs: Mapping[str, float], world_size: int) -> dict[str, int]:
    """The rank that inverts each layer, balancing the summed cost per rank.

    Deterministic (ties go to the layer listed first and the lowest rank), so
    every rank computes the same assignment without a message.

    Args:
        costs: Each layer's estimated cost.
        world_size: The number of ranks.

    Returns:
        Layer name to owning rank, in the order of ``costs``; every layer has
        exactly one owner.

    Raises:
        ValueError: For a ``world_size`` below 1.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size!r}.")
    load = [0.0] * world_size
    owner: dict[str, int] = {}
    names = list(costs)
    order = sorted(range(len(names)), key=lambda i: -costs[names[i]])
    for i in order:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[names[i]] = rank
        load[rank] += costs[names[i]]
    return {name: owner[name] for name in names}
