"""Optimizer settings that tests rely on, stated instead of taken from the library defaults.

The library defaults (``curvlib.optim.defaults.DEFAULTS``, ``DEFAULT_DECAY``) are
chosen for speed on the convergence benchmark and may change; a test whose
assertions hold only for a particular setting passes it explicitly.
"""

from __future__ import annotations

from typing import Any

FRESH: dict[str, Any] = {"t_cov": 1, "t_inv": 1, "stats_fraction": 1.0}
"""Statistics of the whole batch and a new inverse on every step."""

PER_STEP: dict[str, Any] = {**FRESH, "momentum": 0.0}
"""``FRESH`` without momentum: every step is the plain preconditioned step of its batch."""
