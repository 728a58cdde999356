"""Decoupling dead coordinates at any size, for tests on small matrices."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

from curvlib.linalg import factors


@contextmanager
def decoupled_from_the_first_dead_row() -> Iterator[None]:
    """``cpu_live_coordinates`` decouples any dead row, whatever the size and count.

    Its thresholds (``MIN_DECOUPLED_SIZE`` and the others) keep small
    matrices whole, and the tests' matrices are small.
    """
    with (
        mock.patch.object(factors, "MIN_DECOUPLED_SIZE", 1),
        mock.patch.object(factors, "MIN_DECOUPLED_EIGH_SIZE", 1),
        mock.patch.object(factors, "MIN_DEAD_FRACTION", 0.0),
    ):
        yield
