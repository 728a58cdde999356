r"""Choosing what is preconditioned: parameter selection and per-group settings.

Two independent choices, both made at construction:

* **which parameters the optimizer steps** (``params=``): by default every
  trainable parameter of the model; a subset leaves the others untouched (no
  fallback step, no state). Every curvature layer must then lie inside the
  subset; the layers outside it are an error that names them (leave them out
  of the curvature layers with the extractor's ``include``/``exclude``).
* **which curvature layers share which settings** (``groups=``): a list of
  dictionaries such as ``{"layers": ["dec.*", nn.Conv2d], "damping": 1e-2,
  "t_inv": 20, "approx": KPSVD()}``. The patterns are glob patterns on the
  layer's qualified name (``fnmatch``, case-sensitive) or module types (a
  layer matches a type when its module is an instance of it). The layers a
  group's patterns match form that group; the layers no group matches form
  the default group ``"default"``. A layer matched by two groups, or a group
  that matches no layer, is a ``ValueError``.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from curvlib.core.layout import KRONECKER_KINDS, CurvatureLayer, LayerKind
from curvlib.core.protocols import CurvatureApprox, check_approx
from curvlib.optim.adaptive import AUTO, is_auto
from curvlib.optim.hyper import check_damping, check_positive

DEFAULT_GROUP = "default"
"""Name of the group of the curvature layers that no entry of ``groups`` claims."""

HYPER_KEYS = (
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "decoupled_weight_decay",
    "damping",
    "t_cov",
    "t_inv",
)
"""The hyper-parameters a group may set; they live in its torch ``param_group``."""

GROUP_KEYS = frozenset({"layers", "name", "approx", *HYPER_KEYS})
"""Every key a ``groups`` entry may have."""

Pattern = str | type[nn.Module]


@dataclass(frozen=True)
class LayerGroup:
    """A resolved group of curvature layers.

    Attributes:
        name: The group's name (``"default"`` for the unclaimed layers).
        layers: Its curvature layers, in model order.
        approx: The approximation of these layers (one object per group).
        settings: The hyper-parameters the group overrides.
    """

    name: str
    layers: tuple[CurvatureLayer, ...]
    approx: CurvatureApprox = field(repr=False)
    settings: Mapping[str, Any] = field(default_factory=dict)


def layer_matches(layer: CurvatureLayer, patterns: Sequence[Pattern]) -> bool:
    """Whether a layer's qualified name matches a glob pattern or its module a type."""
    for pattern in patterns:
        if isinstance(pattern, str):
            if fnmatch.fnmatchcase(layer.name, pattern):
                return True
        elif isinstance(layer.module, pattern):
            return True
    return False


def check_group_specs(specs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Check the structure of ``groups`` entries (keys, patterns, approximation types).

    Returns:
        The entries as a list.

    Raises:
        TypeError: For an entry that is not a mapping, patterns that are not a
            list of strings and module types, or an ``approx`` that is not a
            ``CurvatureApprox``.
        ValueError: For unknown keys or an entry without ``layers``.
    """
    if isinstance(specs, Mapping):
        raise TypeError("groups must be a list of dictionaries, e.g. [{'layers': ['dec.*']}].")
    out = list(specs)
    for i, spec in enumerate(out):
        where = f"groups[{i}]"
        if not isinstance(spec, Mapping):
            raise TypeError(f"{where} must be a dictionary, got {type(spec).__name__}.")
        unknown = sorted(set(spec) - GROUP_KEYS)
        if unknown:
            hint = " (kl_clip bounds the whole update: set it on the optimizer)" * (
                "kl_clip" in unknown
            )
            raise ValueError(
                f"{where} has unknown keys {unknown}{hint}; allowed: {sorted(GROUP_KEYS)}."
            )
        if "layers" not in spec:
            raise ValueError(f"{where} needs 'layers': glob patterns or module types.")
        patterns = spec["layers"]
        if isinstance(patterns, str | type) or not isinstance(patterns, Iterable):
            raise TypeError(
                f"{where}['layers'] must be a list of patterns, e.g. ['dec.*', nn.Conv2d], "
                f"got {patterns!r}."
            )
        for pattern in patterns:
            if not (
                isinstance(pattern, str)
                or (isinstance(pattern, type) and issubclass(pattern, nn.Module))
            ):
                raise TypeError(
                    f"{where}['layers'] holds {pattern!r}: use glob patterns on qualified "
                    "names or torch.nn.Module subclasses."
                )
        if "approx" in spec:
            check_approx(spec["approx"], f"{where}['approx']")
        if "name" in spec and not isinstance(spec["name"], str):
            raise TypeError(f"{where}['name'] must be a string, got {spec['name']!r}.")
    return out


def group_approximations(
    approx: CurvatureApprox, specs: Sequence[Mapping[str, Any]]
) -> list[CurvatureApprox]:
    """The default approximation and those the groups set (for building the extractor)."""
    check_approx(approx)
    return [approx, *(s["approx"] for s in check_group_specs(specs) if "approx" in s)]


def approx_kinds(approx: CurvatureApprox) -> frozenset[LayerKind]:
    """The layer kinds an approximation covers (``supported_kinds``, else the Kronecker ones)."""
    kinds = getattr(approx, "supported_kinds", None)
    return KRONECKER_KINDS if kinds is None else frozenset(kinds)


def supported_kinds(approxes: Sequence[CurvatureApprox]) -> frozenset[LayerKind] | None:
    """The union of the kinds the approximations cover; ``None`` when all use the default."""
    if all(getattr(a, "supported_kinds", None) is None for a in approxes):
        return None
    return frozenset().union(*(approx_kinds(a) for a in approxes))


def resolve_groups(
    layers: Sequence[CurvatureLayer],
    specs: Sequence[Mapping[str, Any]],
    approx: CurvatureApprox,
) -> tuple[list[LayerGroup], tuple[CurvatureLayer, ...]]:
    """Assign every curvature layer to exactly one group.

    Args:
        layers: The curvature layers, in model order.
        specs: The ``groups`` entries.
        approx: The default approximation; a group without ``approx`` gets a
            fresh deep copy of it (same settings, its own estimate).

    Returns:
        The groups: the default group first (when some layer is left for it),
        then the entries in the order given; and the layers that no entry claims
        and whose kind the default approximation does not cover (they take the
        fallback step).

    Raises:
        TypeError: See [`check_group_specs`][curvlib.optim.groups.check_group_specs].
        ValueError: For a layer matched by two groups, a group matching no layer,
            duplicate names, one approximation object shared by two groups, or a
            layer that a group claims but whose kind its approximation does not
            support.
    """
    check_approx(approx)
    specs = check_group_specs(specs)
    names = [str(s.get("name", f"group{i + 1}")) for i, s in enumerate(specs)]
    if len(set(names)) != len(names) or DEFAULT_GROUP in names:
        raise ValueError(
            f"Group names must be unique and not {DEFAULT_GROUP!r}; got {names}. "
            "Give each group its own 'name'."
        )
    owner: dict[str, str] = {}
    members: list[list[CurvatureLayer]] = [[] for _ in specs]
    for layer in layers:
        for i, spec in enumerate(specs):
            if not layer_matches(layer, list(spec["layers"])):
                continue
            if layer.name in owner:
                raise ValueError(
                    f"Layer {layer.name!r} matches groups {owner[layer.name]!r} and "
                    f"{names[i]!r}; make their patterns disjoint."
                )
            owner[layer.name] = names[i]
            members[i].append(layer)
    for i, spec in enumerate(specs):
        if not members[i]:
            available = ", ".join(layer.name for layer in layers)
            raise ValueError(
                f"Group {names[i]!r} (layers={list(spec['layers'])!r}) matches no curvature "
                f"layer; the curvature layers are: {available}."
            )
    groups: list[LayerGroup] = []
    rest = tuple(layer for layer in layers if layer.name not in owner)
    # Layers no group claims, of a kind the default approximation has no block for
    # (BatchNorm when only a group's Diagonal covers that kind), take the fallback step.
    default_kinds = approx_kinds(approx)
    uncovered = tuple(layer for layer in rest if layer.kind not in default_kinds)
    rest = tuple(layer for layer in rest if layer.kind in default_kinds)
    if rest:
        groups.append(LayerGroup(DEFAULT_GROUP, rest, approx, {}))
    for i, spec in enumerate(specs):
        group_approx = spec["approx"] if "approx" in spec else copy.deepcopy(approx)
        settings = {k: spec[k] for k in HYPER_KEYS if k in spec}
        groups.append(LayerGroup(names[i], tuple(members[i]), group_approx, settings))
    seen: dict[int, str] = {}
    for group in groups:
        unsupported = [la.name for la in group.layers if la.kind not in approx_kinds(group.approx)]
        if unsupported:
            raise ValueError(
                f"Group {group.name!r} uses {type(group.approx).__name__}, which has no block "
                f"for layers {unsupported}; move them to a group whose approximation supports "
                "them, or exclude them."
            )
        if id(group.approx) in seen:
            raise ValueError(
                f"Groups {seen[id(group.approx)]!r} and {group.name!r} share one approximation "
                "object: give each group its own instance (e.g. KFAC() twice)."
            )
        seen[id(group.approx)] = group.name
    return groups, uncovered


def check_hyper(settings: Mapping[str, Any], where: str = "") -> None:
    """Raise a ``ValueError`` naming the fix for a bad hyper-parameter of a group.

    Args:
        settings: A complete set of ``HYPER_KEYS`` values.
        where: Prefix of the message (e.g. ``"group 'dec': "``).
    """
    check_auto_or_positive(f"{where}lr", settings["lr"])
    check_auto_or_positive(f"{where}momentum", settings["momentum"], allow_zero=True)
    check_positive(f"{where}weight_decay", settings["weight_decay"], allow_zero=True)
    if settings["nesterov"]:
        if is_auto(settings["lr"]) or is_auto(settings["momentum"]):
            raise ValueError(
                f"{where}nesterov=True does not combine with lr or momentum 'auto' (the "
                "quadratic model chooses the update alpha*Delta + mu*delta itself)."
            )
        if settings["momentum"] <= 0.0:
            raise ValueError(f"{where}nesterov=True needs momentum > 0.")
    check_interval(f"{where}t_cov", settings["t_cov"])
    check_interval(f"{where}t_inv", settings["t_inv"])
    check_damping(f"{where}damping", settings["damping"])


def check_auto_or_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    """Accept ``"auto"`` (see [`curvlib.optim.adaptive`][curvlib.optim.adaptive]) or a valid number.

    Raises:
        ValueError: For any other string, NaN, or a number out of range.
        TypeError: For a value that is neither a number, a callable nor a string.
    """
    if isinstance(value, str):
        if not is_auto(value):
            raise ValueError(f"{name} must be a number or the string {AUTO!r}, got {value!r}.")
        return
    if isinstance(value, float) and math.isnan(value):
        raise ValueError(f"{name} must be a number or {AUTO!r}, got nan.")
    check_positive(name, value, allow_zero=allow_zero)


def check_interval(name: str, value: Any) -> None:
    """Raise a ``ValueError`` unless ``value`` is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def parameter_list(params: Iterable[Tensor], model: nn.Module | None = None) -> list[Tensor]:
    """``params`` as a list.

    Args:
        params: The parameters to step.
        model: The network, to spell out the ``groups=`` that torch-style
            parameter groups in ``params`` describe.

    Raises:
        TypeError: If ``params`` is a single tensor (iterating it would give its
            rows) or holds torch-style parameter groups (the message gives the
            ``groups=`` to use instead).
    """
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of parameters, e.g. generator.parameters().")
    out = list(params)
    items: list[Any] = out  # torch-style groups are a common mistake despite the annotation
    dicts: list[Mapping[str, Any]] = [p for p in items if isinstance(p, Mapping)]
    if dicts:
        raise TypeError(
            "params takes parameters, not torch-style parameter groups "
            "([{'params': ..., 'lr': ...}]). curvlib sets per-layer hyper-parameters with "
            "groups=, matching layers by qualified name or module type"
            f"{_groups_hint(dicts, model)}; params= (optional) then lists every parameter "
            "to step."
        )
    return out


def _groups_hint(dicts: Sequence[Mapping[str, Any]], model: nn.Module | None) -> str:
    """The ``groups=`` that the torch-style ``dicts`` describe, when the model is known."""
    if model is None:
        return ", e.g. groups=[{'layers': ['dec.*'], 'lr': 0.01}]"
    owner = {id(p): name.rpartition(".")[0] for name, p in model.named_parameters()}
    entries = []
    for spec in dicts:
        held = spec.get("params", ())
        held = [held] if isinstance(held, Tensor) else list(held)
        layers = list(dict.fromkeys(owner.get(id(p), "?") for p in held))
        settings = "".join(f", {k!r}: {v!r}" for k, v in spec.items() if k != "params")
        entries.append(f"{{'layers': {layers}{settings}}}")
    return f": here groups=[{', '.join(entries)}]"


def select_parameters(
    model: nn.Module, layers: Sequence[CurvatureLayer], params: Iterable[Tensor] | None
) -> list[nn.Parameter]:
    """The trainable parameters the optimizer steps, in model order.

    Args:
        model: The network.
        layers: Its curvature layers.
        params: The parameters to step (``None``: every trainable parameter).
            Frozen ones (``requires_grad=False``) are skipped.

    Returns:
        The selected trainable parameters, each once.

    Raises:
        TypeError: If ``params`` is a single tensor.
        ValueError: If ``params`` holds a tensor that is not a parameter of
            ``model``, holds no trainable parameter, or leaves out a parameter of
            a curvature layer (the message names the layers).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if params is None:
        return trainable
    chosen = parameter_list(params, model)
    known = {id(p) for p in model.parameters()}
    if any(id(p) not in known for p in chosen):
        raise ValueError(
            "params holds a tensor that is not a parameter of the model the optimizer was "
            "built on; pass parameters of that model (e.g. model.generator.parameters())."
        )
    ids = {id(p) for p in chosen}
    selected = [p for p in trainable if id(p) in ids]
    if not selected:
        raise ValueError("params holds no trainable parameter: nothing to optimize.")
    outside = [layer.name for layer in layers if any(id(p) not in ids for p in layer.parameters)]
    if outside:
        raise ValueError(
            f"Curvature layers {outside} have parameters outside params=. Leave them out of "
            "the curvature layers (include=/exclude=, e.g. include=['generator.*']) or add "
            "their parameters to params."
        )
    return selected
