"""What the ranks of the examples' data-parallel tests run (importable by spawned processes)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import autoencoder  # noqa: E402

LOSSES = ("epoch", "steps", "train_loss", "test_loss", "train_loss_running")
"""The metrics every rank must agree on (times differ between ranks)."""


def autoencoder_rank(rank: int, world_size: int, root: str, args: list[str]) -> dict[str, Any]:
    """``examples/autoencoder.py args`` inside the caller's process group, ``--out root/rank<r>``.

    Returns:
        The run's losses per epoch, and whether the process group outlived the run.
    """
    results = autoencoder.main([*args, "--no-progress", "--out", str(Path(root) / f"rank{rank}")])
    metrics = [{k: row[k] for k in LOSSES} for row in results[0].metrics]
    return {"group_alive": dist.is_initialized(), "metrics": metrics}
