"""The layout rules of the house, checked: no import circles inside `fedlab/`, no module over about
600 lines unless it says in its docstring why it is one module.

Import edges come from every `import` statement of a module, wherever it stands: at module level,
inside a function (a deferred import still makes the two modules depend on each other; the circle
only hides until the call), and under `if TYPE_CHECKING:` (a design dependency all the same).
`from fedlab.a import b` is an edge to `fedlab.a.b` when that is a module, else to `fedlab.a`. The
implicit import of a parent package's `__init__` is not an edge: a package that re-exports its
submodules is how a package shows its API, not a circle between ideas.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedlab"
LINE_LIMIT = 600
# Modules over the limit, each one cohesive algorithm whose docstring says why ("Why one module:").
LONG_MODULES = {
    "fedlab/synthea/gmf/loader.py": "one validator over Synthea's module schema",
    "fedlab/synthea/gmf/runtime.py": "one interpreter: the state machine and its state types",
    "fedlab/synthea/export.py": "one mapping, a Life to Synthea's R4 shape",
    "fedlab/synthea/lifecycle.py": "one causal simulation of a person's physiology",
}
WHY_MARKER = "Why one module:"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every `.py` file under `root/fedlab` (packages by `__init__`)."""
    names = {}
    for path in sorted((root / "fedlab").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _imported(node: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    found: set[str] = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            name = alias.name
            while name and name not in modules:  # `import fedlab.a.b.c` where c is a name, not a module
                name = name.rpartition(".")[0]
            if name.startswith("fedlab"):
                found.add(name)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        if base.startswith("fedlab"):
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in modules else base)
    return {name for name in found if name in modules}


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the fedlab modules it imports anywhere in its source."""
    modules = module_names(root)
    graph = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            edges |= _imported(node, module, is_package, modules)
        edges.discard(module)
        graph[module] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a -> b -> ... -> a) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_circle(graph, set(group)) for group in groups]


def _circle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A concrete circle through the first module of a strongly connected group (breadth first)."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & group):
                if target == start:
                    return [*paths[node], start]
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    following.append(target)
        frontier = following
    return sorted(group)


def test_no_import_circles_inside_fedlab() -> None:
    cycles = import_cycles(import_graph(ROOT))
    assert not cycles, "import circles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("second", [
    "from fedlab.pkg.a import thing\n",                                              # module level
    "def use():\n    from fedlab.pkg import a\n    return a\n",                      # inside a function
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import Thing\n",  # for type checking
])
def test_the_circle_check_finds_each_kind_of_import(tmp_path: Path, second: str) -> None:
    _write(tmp_path, {"fedlab/__init__.py": "", "fedlab/pkg/__init__.py": "from fedlab.pkg.a import thing\n",
                      "fedlab/pkg/a.py": "import fedlab.pkg.b\nthing = 1\n", "fedlab/pkg/b.py": second,
                      "fedlab/pkg/c.py": "from fedlab.pkg import a, b\n"})
    graph = import_graph(tmp_path)
    assert graph["fedlab.pkg.c"] == {"fedlab.pkg.a", "fedlab.pkg.b"}
    assert import_cycles(graph) == [["fedlab.pkg.a", "fedlab.pkg.b", "fedlab.pkg.a"]]


def test_a_package_reexporting_its_modules_is_no_circle(tmp_path: Path) -> None:
    _write(tmp_path, {"fedlab/__init__.py": "", "fedlab/pkg/__init__.py": "from fedlab.pkg.a import thing\n",
                      "fedlab/pkg/a.py": "from fedlab.pkg.b import other\nthing = other\n",
                      "fedlab/pkg/b.py": "other = 1\n"})
    assert import_cycles(import_graph(tmp_path)) == []


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""


def long_modules(root: Path, limit: int = LINE_LIMIT) -> dict[str, int]:
    """Modules over `limit` lines: path relative to `root` -> line count."""
    counts = {}
    for path in sorted((root / "fedlab").rglob("*.py")):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > limit:
            counts[path.relative_to(root).as_posix()] = lines
    return counts


def test_no_module_over_the_limit_without_saying_why() -> None:
    unexplained = {}
    for name, lines in long_modules(ROOT).items():
        if name not in LONG_MODULES or WHY_MARKER not in _docstring(ROOT / name):
            unexplained[name] = lines
    assert not unexplained, (
        f"modules over {LINE_LIMIT} lines: {unexplained}. Split them by idea, or, if one is a single "
        f"cohesive algorithm, list it in LONG_MODULES and say why in its docstring ({WHY_MARKER!r})")


def test_the_listed_long_modules_say_why() -> None:
    for name in LONG_MODULES:
        path = ROOT / name
        if path.is_file():
            assert WHY_MARKER in _docstring(path), f"{name}: its docstring does not say why it is one module"


def test_the_size_check_finds_a_long_module(tmp_path: Path) -> None:
    _write(tmp_path, {"fedlab/__init__.py": "", "fedlab/short.py": "x = 1\n" * 10,
                      "fedlab/long.py": '"""Long."""\n' + "x = 1\n" * 20})
    assert long_modules(tmp_path, limit=15) == {"fedlab/long.py": 21}


def test_the_module_map_names_every_module() -> None:
    """docs/architecture.md stays true: its module map names each top-level module and package, and
    each module of the packages this layout split (fhir, flatten, views)."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    names = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    names |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    for package in ("fhir", "flatten", "views"):
        names |= {p.stem for p in (PACKAGE / package).rglob("*.py") if p.stem != "__init__"}
        names |= {p.parent.name for p in (PACKAGE / package).rglob("*/__init__.py")}
    missing = sorted(name for name in names if not re.search(rf"\b{re.escape(name)}(\.py|/)", text))
    assert not missing, f"docs/architecture.md does not name: {missing}"
