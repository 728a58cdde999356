"""What wrote a checkpoint, and the check that refuses a mismatch before anything changes.

Every curvlib ``state_dict`` (approximations, curvature engines, the optimizer
and the preconditioner mode) carries a record under the key ``"written_by"``:

* ``format``: the layout of curvlib's state dicts (an integer raised when it
  changes incompatibly);
* ``curvlib``: the version that wrote it (named in messages, not compared);
* ``class``: the class of the object that wrote it;
* whatever else the object needs to match (its approximation, the names and
  parameter shapes of its layers, its parameter groups).

``load_state_dict`` compares the saved record with the one the loading object
would write, before it changes anything, and raises a ``ValueError`` that lists
every difference. A state dict without a record (written before curvlib kept
one) is refused too: nothing in it tells a KFAC estimate from a KPSVD estimate
of the same layers, which is exactly the silent mistake the record prevents.

The record holds strings, integers, lists and dictionaries only, so a
checkpoint still loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from importlib import metadata
from typing import Any

from curvlib.core.layout import CurvatureLayer

RECORD_KEY = "written_by"
"""The key of the record in every curvlib ``state_dict``."""

FORMAT = 1
"""The version of the layout of curvlib's state dicts."""

NOT_COMPARED = frozenset({"curvlib"})
"""Record entries that are informative only."""


def curvlib_version() -> str:
    """The installed curvlib version (``"unknown"`` when run from an uninstalled tree)."""
    try:
        return metadata.version("curvlib")
    except metadata.PackageNotFoundError:
        return "unknown"


def writer_record(writer: object, **fields: Any) -> dict[str, Any]:
    """The record of a state dict written by ``writer``, with extra ``fields`` to match."""
    return {
        "format": FORMAT,
        "curvlib": curvlib_version(),
        "class": type(writer).__name__,
        **fields,
    }


def layer_record(layers: Iterable[CurvatureLayer]) -> dict[str, dict[str, list[int]]]:
    """Layer name to its parameter shapes, e.g. ``{"fc": {"weight": [3, 5], "bias": [3]}}``."""
    out: dict[str, dict[str, list[int]]] = {}
    for layer in layers:
        shapes = {"weight": list(layer.weight.shape)}
        if layer.bias is not None:
            shapes["bias"] = list(layer.bias.shape)
        out[layer.name] = shapes
    return out


def check_record(
    state: Mapping[str, Any],
    expected: Mapping[str, Any],
    what: str,
    ignore: Collection[str] = (),
) -> None:
    """Refuse ``state`` unless its record matches ``expected`` (``writer_record`` of the loader).

    Args:
        state: The state dict being loaded.
        expected: The record the loading object would write now.
        what: Names the loading object in the message (e.g. ``"this KPSVD"``).
        ignore: Top-level entries not compared besides ``curvlib`` (e.g. ``"class"``
            for objects that accept the checkpoints of their subclasses).

    Raises:
        ValueError: Naming every difference, or the missing record.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"A state dict must be a dictionary, got {type(state).__name__}.")
    saved = state.get(RECORD_KEY)
    if not isinstance(saved, Mapping):
        raise ValueError(
            f"Cannot load into {what}: the state dict has no {RECORD_KEY!r} record of what "
            "wrote it (it is not a curvlib state dict, or an older curvlib wrote it). Without "
            "the record curvlib cannot tell whether it fits (a KFAC estimate and a KPSVD "
            "estimate of the same layers look alike), so it refuses it: resume with the "
            "curvlib version that wrote it, or start a new run."
        )
    version = saved.get("curvlib", "unknown")
    if saved.get("format") != expected["format"]:
        raise ValueError(
            f"Cannot load into {what}: the state dict was written by curvlib {version} in "
            f"checkpoint format {saved.get('format')!r}; curvlib {expected['curvlib']} reads "
            f"format {expected['format']!r}. Load it with the curvlib version that wrote it."
        )
    skip = NOT_COMPARED | set(ignore) | {"format"}
    differences = record_differences(
        {k: v for k, v in saved.items() if k not in skip},
        {k: v for k, v in expected.items() if k not in skip},
    )
    if differences:
        listed = "\n".join(f"  - {d}" for d in differences)
        raise ValueError(
            f"Cannot load into {what}: the state dict (written by curvlib {version}) does not "
            f"match it; nothing was changed.\n{listed}\nBuild the object exactly as the one "
            "that wrote the checkpoint (same model, approximation, groups= and params=) and "
            "load again."
        )


def record_differences(saved: Any, expected: Any, path: str = "") -> list[str]:
    """Every difference between two records, one line each, ``path`` naming where."""
    if isinstance(saved, Mapping) and isinstance(expected, Mapping):
        lines = []
        where = f"{path}: " if path else ""
        only_saved = [k for k in saved if k not in expected]
        only_here = [k for k in expected if k not in saved]
        if only_saved:
            lines.append(f"{where}{_names(only_saved)} only in the checkpoint")
        if only_here:
            lines.append(f"{where}{_names(only_here)} only here")
        for key in saved:
            if key in expected:
                inner = f"{path}[{key!r}]" if path else str(key)
                lines.extend(record_differences(saved[key], expected[key], inner))
        return lines
    if saved != expected:
        return [f"{path}: {saved!r} in the checkpoint, {expected!r} here"]
    return []


def _names(keys: list[Any]) -> str:
    return ", ".join(repr(k) for k in keys)
