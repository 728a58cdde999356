"""Data-parallel training on ``torch.distributed``: the same curvature on every rank.

Imports [`curvlib.core`][curvlib.core] and ``torch.distributed`` only (checked
by ``lint-imports``); the optimizer reaches it through the
[`ReplicaSync`][curvlib.core.ReplicaSync] protocol. What is communicated, how
often and at what size: [Distributed training](../distributed.md).
"""

from curvlib.distributed.buckets import DEFAULT_BUCKET_BYTES
from curvlib.distributed.data_parallel import DataParallel, Traffic, data_parallel_for, unwrap
from curvlib.distributed.ownership import assign_owners, inverse_cost
from curvlib.distributed.statistics import join_statistics, split_statistics

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "DataParallel",
    "Traffic",
    "assign_owners",
    "data_parallel_for",
    "inverse_cost",
    "join_statistics",
    "split_statistics",
    "unwrap",
]
