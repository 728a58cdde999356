"""The documentation site is checked against the code it describes.

* Every name in ``__all__`` of ``curvlib`` and of its sub-packages has an entry
  in the API reference (``docs/api/*.md``), and every ``:::`` entry of the site
  resolves to an object.
* The tables of ``docs/concepts/supported.md`` equal the code's own capability
  lists: ``curvlib.core.layout._KINDS``, ``curvlib.extract.losses.SUPPORTED_LOSSES``
  (and the reductions that ``check_loss_module`` accepts),
  ``curvlib.extract._backpack.BACKPACK_MODULES`` and ``FisherType``.
* The ```` ```python ```` blocks of the quick start (``docs/index.md``) and of the
  other narrative pages run, in order, one namespace per page, with a tiny
  ``model``, ``loss_fn`` and ``loader`` defined first (``SETUP``). Fragments that
  are not meant to run on their own are fenced as ```` ```py ````.
* Snippet includes (``--8<--``) name existing files.
* Docstring math is written so that ``pymdownx.arithmatex`` and MathJax render it
  (a strict ``mkdocs build`` cannot see these mistakes).

None of this needs MkDocs: the checks parse the Markdown sources.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import re
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import curvlib
from curvlib.core import FisherType, LayerKind
from curvlib.core.layout import _KINDS
from curvlib.extract._backpack import BACKPACK_MODULES
from curvlib.extract.losses import SUPPORTED_LOSSES, check_loss_module

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
API = DOCS / "api"
SUPPORTED = DOCS / "concepts" / "supported.md"
QUICK_START = DOCS / "index.md"

PACKAGES = (
    "curvlib",
    "curvlib.core",
    "curvlib.extract",
    "curvlib.approx",
    "curvlib.optim",
    "curvlib.distributed",
    "curvlib.linalg",
    "curvlib.data",
)

SETUP = """
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
loss_fn = nn.CrossEntropyLoss()
_x, _y = torch.randn(24, 4), torch.randint(0, 3, (24,))
loader = [(_x[i : i + 8], _y[i : i + 8]) for i in range(0, 24, 8)]
"""
"""Stand-ins for the objects the narrative pages assume: a model, a loss module, a loader."""


# -- mkdocstrings entries -------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One ``::: identifier`` line of a page and the ``members`` option below it."""

    page: Path
    identifier: str
    members: bool | tuple[str, ...] | None = None


_ENTRY = re.compile(r"^:::[ \t]+(\S+)[ \t]*$")


def _entries(page: Path) -> Iterator[Entry]:
    lines = page.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        match = _ENTRY.match(line)
        if match is None:
            continue
        block: list[str] = []
        for nxt in lines[i + 1 :]:
            if nxt.strip() and not nxt.startswith((" ", "\t")):
                break
            block.append(nxt)
        yield Entry(page, match.group(1), _members_option(block))


def _members_option(block: list[str]) -> bool | tuple[str, ...] | None:
    """The ``members:`` option of an entry: ``False``, a list of names, or ``None`` (unset)."""
    for i, line in enumerate(block):
        match = re.match(r"^\s+members:\s*(.*?)\s*$", line)
        if match is None:
            continue
        value = match.group(1)
        if value in ("false", "False", "no"):
            return False
        if value in ("true", "True", "yes"):
            return True
        if value.startswith("["):
            return tuple(v.strip().strip("'\"") for v in value.strip("[]").split(",") if v.strip())
        names = []
        for item in block[i + 1 :]:
            item_match = re.match(r"^\s+-\s*(\S+)\s*$", item)
            if item_match is None:
                break
            names.append(item_match.group(1).strip("'\""))
        return tuple(names)
    return None


def _resolve(identifier: str) -> Any:
    """Import the longest module prefix of ``identifier`` and walk the rest as attributes."""
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(identifier)


def _rendered(entry: Entry) -> dict[str, list[Any]]:
    """The objects an entry renders, by name: itself and, for a module, its members.

    Module members follow mkdocstrings-python's defaults: ``members: false``
    renders none, an explicit list renders those, otherwise the names of the
    module's ``__all__`` or, without one, its public names defined in it.
    """
    obj = _resolve(entry.identifier)
    out: dict[str, list[Any]] = {entry.identifier.rsplit(".", 1)[-1]: [obj]}
    if not isinstance(obj, types.ModuleType) or entry.members is False:
        return out
    if isinstance(entry.members, tuple):
        names: list[str] = list(entry.members)
    elif hasattr(obj, "__all__"):
        names = list(obj.__all__)
    else:
        names = [
            n
            for n, v in vars(obj).items()
            if not n.startswith("_") and getattr(v, "__module__", None) == obj.__name__
        ]
    for name in names:
        out.setdefault(name, []).append(getattr(obj, name))
    return out


def _api_rendered() -> dict[str, list[Any]]:
    rendered: dict[str, list[Any]] = {}
    for page in sorted(API.glob("*.md")):
        for entry in _entries(page):
            for name, objs in _rendered(entry).items():
                rendered.setdefault(name, []).extend(objs)
    return rendered


def test_api_pages_exist() -> None:
    pages = {p.stem for p in API.glob("*.md")}
    assert {"index", "core", "extract", "approx", "optim", "linalg", "data"} <= pages


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_has_an_api_entry(package: str) -> None:
    module = importlib.import_module(package)
    rendered = _api_rendered()
    missing = [
        name
        for name in module.__all__
        if not any(obj is getattr(module, name) for obj in rendered.get(name, []))
    ]
    assert not missing, (
        f"{package}.__all__ names without an entry in docs/api/*.md: {missing}. Add "
        f"'::: {package}.<name>' to the page of the sub-package that defines each."
    )


def test_every_entry_of_the_site_resolves() -> None:
    pages = sorted(DOCS.rglob("*.md"))
    entries = [entry for page in pages for entry in _entries(page)]
    assert len(entries) > 50, "the API reference looks empty"
    broken = []
    for entry in entries:
        try:
            _resolve(entry.identifier)
        except (ImportError, AttributeError) as err:
            broken.append(f"{entry.page.relative_to(ROOT)}: {entry.identifier} ({err})")
    assert not broken, broken


def test_the_top_level_page_lists_every_top_level_name() -> None:
    text = (API / "index.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"\[`(\w+)`\]\[curvlib\.[\w.]+\]", text))
    assert listed == set(curvlib.__all__), (
        f"missing from the table of docs/api/index.md: {set(curvlib.__all__) - listed}; "
        f"not public: {listed - set(curvlib.__all__)}"
    )


# -- the supported-layers tables ----------------------------------------------------


def _table(name: str) -> list[list[str]]:
    """The body rows of the Markdown table after ``<!-- table: name -->``."""
    lines = SUPPORTED.read_text(encoding="utf-8").splitlines()
    marker = f"<!-- table: {name} -->"
    assert marker in lines, f"{SUPPORTED.relative_to(ROOT)} lost its marker {marker!r}"
    rows: list[list[str]] = []
    for line in lines[lines.index(marker) + 1 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert len(rows) >= 3, f"table {name!r} has no rows"
    _header, rule, *body = rows
    assert set("".join(rule)) <= set("-: "), f"table {name!r} has no header rule"
    return body


def _torch_module(cell: str) -> type[nn.Module]:
    match = re.fullmatch(r"`torch\.nn\.(\w+)`", cell)
    assert match is not None, f"expected `torch.nn.<Module>`, got {cell!r}"
    cls = getattr(nn, match.group(1))
    assert isinstance(cls, type) and issubclass(cls, nn.Module)
    return cls


def _code(cell: str) -> str:
    match = re.fullmatch(r"`(\w+)`", cell)
    assert match is not None, f"expected one `code` name, got {cell!r}"
    return match.group(1)


def test_curvature_layer_table_equals_the_layout_kinds() -> None:
    rows = _table("curvature-layers")
    documented = {_torch_module(row[0]): LayerKind[_code(row[1])] for row in rows}
    assert len(documented) == len(rows), "a layer is listed twice"
    assert documented == _KINDS


def test_loss_table_equals_the_supported_losses() -> None:
    rows = _table("losses")
    documented = [_torch_module(row[0]) for row in rows]
    assert len(set(documented)) == len(documented), "a loss is listed twice"
    assert set(documented) == set(SUPPORTED_LOSSES)
    for row, cls in zip(rows, documented, strict=True):
        reductions = set(re.findall(r"`(\w+)`", row[1]))
        assert reductions, f"no reductions listed for {cls.__name__}"
        for reduction in ("mean", "sum", "none"):
            if reduction in reductions:
                check_loss_module(cls(reduction=reduction))
            else:
                with pytest.raises(ValueError, match="reduction"):
                    check_loss_module(cls(reduction=reduction))


def test_backpack_table_equals_the_backpack_modules() -> None:
    rows = _table("backpack-modules")
    documented = {_torch_module(row[0]): row[1] for row in rows}
    assert len(documented) == len(rows), "a module is listed twice"
    handled = {cls for cls, cell in documented.items() if cell in ("yes", "eval mode only")}
    assert handled == set(BACKPACK_MODULES), (
        f"documented but not handled: {handled - set(BACKPACK_MODULES)}; handled but not "
        f"documented: {set(BACKPACK_MODULES) - handled}"
    )
    assert set(documented.values()) <= {"yes", "eval mode only", "no"}
    eval_only = {cls for cls, cell in documented.items() if cell == "eval mode only"}
    batchnorms = {
        cls for cls in BACKPACK_MODULES if issubclass(cls, nn.modules.batchnorm._BatchNorm)
    }
    assert eval_only == batchnorms


def test_fisher_table_equals_the_flavours() -> None:
    documented = [_code(row[0]) for row in _table("fisher-types")]
    assert sorted(documented) == sorted(member.name for member in FisherType)


# -- runnable code blocks -----------------------------------------------------------


def _python_blocks(page: Path) -> list[str]:
    """The ```` ```python ```` blocks of a page (not ```` ```py ```` fragments), dedented."""
    text = page.read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.M | re.S)


def _run_page(page: Path) -> None:
    namespace: dict[str, Any] = {"__name__": f"docs_{page.stem}"}
    exec(compile(SETUP, "SETUP", "exec"), namespace)
    for i, block in enumerate(_python_blocks(page)):
        code = compile(block, f"{page.relative_to(ROOT)}[python block {i}]", "exec")
        with contextlib.redirect_stdout(io.StringIO()):
            exec(code, namespace)


def test_quick_start_runs() -> None:
    blocks = _python_blocks(QUICK_START)
    assert len(blocks) >= 4, "the quick start lost its code blocks"
    _run_page(QUICK_START)


RUNNABLE = sorted(
    page for page in DOCS.rglob("*.md") if page != QUICK_START and _python_blocks(page)
)


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(DOCS)))
def test_code_blocks_run(page: Path) -> None:
    torch.manual_seed(0)
    _run_page(page)


# -- snippets -----------------------------------------------------------------------


def test_snippets_exist() -> None:
    for page in DOCS.rglob("*.md"):
        text = page.read_text(encoding="utf-8")
        for path in re.findall(r'^--8<--\s+"([^":]+)(?::\d*)*"', text, re.M):
            assert (ROOT / path).is_file(), f"{page.relative_to(ROOT)} includes missing {path}"


def test_result_figures_are_the_benchmarks_own() -> None:
    """The docs show the PNGs the benchmarks wrote, byte for byte (copies go stale)."""
    copies = sorted((DOCS / "results").rglob("*.png"))
    assert copies, "the results pages lost their figures"
    for copy in copies:
        source = ROOT / "benchmarks" / "results" / copy.relative_to(DOCS / "results")
        assert source.is_file(), f"{copy.relative_to(ROOT)} has no benchmark source"
        assert copy.read_bytes() == source.read_bytes(), f"{copy.name} differs from {source}"


# -- docstring math -----------------------------------------------------------------

_CODE_SPAN = re.compile(r"``.*?``|`[^`\n]*`", re.S)
_DISPLAY = re.compile(r"(?:\A|\n[ \t]*\n)[ \t]*\$\$.*?\$\$", re.S)

KNOWN_MATH_ISSUES: set[tuple[str, str]] = set()
"""Docstrings whose math is known to render wrongly (see ``_math_problems``); keep it empty."""


def _docstrings(path: Path) -> Iterator[tuple[str, str]]:
    """``(object name, docstring)`` of a module, its classes and functions, and attributes."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for i, stmt in enumerate(body):
            if not (
                isinstance(stmt, ast.Expr)
                and isinstance(stmt.value, ast.Constant)
                and isinstance(stmt.value.value, str)
            ):
                continue
            if i == 0 and isinstance(
                node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
            ):
                yield getattr(node, "name", "<module>"), stmt.value.value
            elif i > 0 and isinstance(body[i - 1], ast.Assign | ast.AnnAssign):
                yield "<attribute>", stmt.value.value


def _math_problems(text: str) -> list[str]:
    r"""What arithmatex and MathJax would get wrong in one docstring.

    Display math ``$$...$$`` must open a paragraph (arithmatex pairs an inline
    ``$$`` as stray dollars around inline math); inline ``$...$`` may not start or
    end with a space (arithmatex then leaves it as text); and ``\\`` before a
    command (a raw docstring written as if it were not raw) is a MathJax line break.
    """
    problems = []
    text = _DISPLAY.sub("\n\n", _CODE_SPAN.sub("", text))
    if "$$" in text:
        problems.append("$$...$$ inside a paragraph: start it on its own line after a blank one")
        text = text.replace("$$", "")
    parts = text.split("$")
    if len(parts) % 2 == 0:
        problems.append("an unpaired $")
    problems += [f"space inside ${inner}$" for inner in parts[1::2] if inner != inner.strip()]
    problems += [
        f"double backslash in {m.group(0)!r} (the docstring is raw: write one)"
        for m in re.finditer(r"\\\\[A-Za-z]+", text)
    ]
    return problems


def test_docstring_math_renders() -> None:
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted((ROOT / "curvlib").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for name, doc in _docstrings(path):
            problems = _math_problems(doc)
            if problems:
                found.setdefault((rel, name), []).extend(problems)
    new = {key: found[key] for key in sorted(set(found) - KNOWN_MATH_ISSUES)}
    fixed = sorted(KNOWN_MATH_ISSUES - set(found))
    assert not new, f"docstring math that will not render: {new}"
    assert not fixed, f"fixed, remove from KNOWN_MATH_ISSUES: {fixed}"
