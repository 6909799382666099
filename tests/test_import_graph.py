"""The project's modules import one another in one direction: layers, no cycles, no CLI imports.

The graph is read from the source with ``ast`` and counts every import: module-level ones, those
inside functions (a function-level import that closes a cycle is still a cycle; it only hides
it) and those under ``if TYPE_CHECKING:`` (a type-only import is still a dependency: the types
of one module are part of the other's meaning).

The layers (issue 26): ``common`` imports nothing else of the project; the Flower adapter
(``flower_adapter``) only ``common``; ``client`` never ``server`` nor ``simulation``; ``server``
never ``client`` nor ``simulation``; no installed package imports ``benchmarks``.
"""

from __future__ import annotations

import ast
import functools
import tomllib
from pathlib import Path

from tests.helpers import PACKAGES, PROJECT_ROOT

ALLOWED = {
    "common": {"common"},
    "flower_adapter": {"common", "flower_adapter"},
    "client": {"common", "flower_adapter", "client"},
    "server": {"common", "flower_adapter", "server"},
    "simulation": {"common", "flower_adapter", "client", "server", "simulation"},
    "benchmarks": set(PACKAGES),
}
"""The project packages that the modules of each package may import."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((PROJECT_ROOT / package).rglob("*.py"))
    }


def _imported_names(tree: ast.AST, package: str) -> list[str]:
    """Dotted names of every module an import statement anywhere in ``tree`` may load."""
    names: list[str] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            names.append(module)
            names.extend(f"{module}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return names


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """``{module: project modules it imports}`` for every module of the project's packages."""
    modules = _project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for imported in _imported_names(ast.parse(path.read_text(encoding="utf-8")), package):
            if imported in modules and imported != name:
                edges.add(imported)
            elif imported.rpartition(".")[0] in modules and imported.rpartition(".")[0] != name:
                edges.add(imported.rpartition(".")[0])  # ``from pkg import function``
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_function_level_and_type_only_imports_are_edges() -> None:
    source = (
        "from . import sibling\n"
        "from .other import thing\n"
        "def f():\n    import common.errors\n"
        "if TYPE_CHECKING:\n    import common.typed\n"
    )
    names = _imported_names(ast.parse(source), "common.data")
    assert {"common.data.sibling", "common.data.other", "common.errors", "common.typed"} <= set(names)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """``importer -> imported`` for every edge that :data:`ALLOWED` forbids."""
    return sorted(
        f"{name} -> {imported}"
        for name, edges in graph.items()
        for imported in edges
        if imported.split(".")[0] not in ALLOWED[name.split(".")[0]]
    )


def test_the_layer_check_finds_a_forbidden_import() -> None:
    graph = {"server.grid": {"client.packed_arrays", "common.packing"}, "common.config": {"common.models"}}
    assert layer_violations(graph) == ["server.grid -> client.packed_arrays"]
    assert layer_violations({"flower_adapter.grid": {"server.rounds"}}) == [
        "flower_adapter.grid -> server.rounds"
    ]


def test_every_import_keeps_to_the_layers() -> None:
    assert layer_violations(import_graph()) == []


def test_every_package_is_seen() -> None:
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as handle:
        installed = tomllib.load(handle)["tool"]["setuptools"]["packages"]
    assert {name.split(".")[0] for name in installed} <= set(PACKAGES)
    graph = import_graph()
    assert "flower_adapter.grid" in graph["server.rounds"]  # a module-level import
    assert "common.models" in graph["common.config"]  # a function-level one


def test_no_import_cycles_between_project_modules() -> None:
    assert cycles(import_graph()) == []


def test_no_simulation_module_imports_the_simulation_cli() -> None:
    graph = import_graph()
    importers = sorted(
        name
        for name, edges in graph.items()
        if name.startswith("simulation.") and "simulation.cli" in edges and name != "simulation.__main__"
    )
    assert importers == []
