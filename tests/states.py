"""Exact comparison of nested states (``state_dict`` trees of tensors and plain values)."""

from __future__ import annotations

from typing import Any

import torch


def equal_states(first: Any, second: Any) -> bool:
    """Whether two nested states hold the same structure, values and tensors, bit for bit."""
    if isinstance(first, torch.Tensor):
        return isinstance(second, torch.Tensor) and torch.equal(first, second)
    if isinstance(first, dict):
        return (
            isinstance(second, dict)
            and first.keys() == second.keys()
            and all(equal_states(first[k], second[k]) for k in first)
        )
    if isinstance(first, list | tuple):
        return (
            isinstance(second, list | tuple)
            and len(first) == len(second)
            and all(equal_states(a, b) for a, b in zip(first, second, strict=True))
        )
    return bool(first == second)
