"""No function of the product code is longer than 80 lines (issue 26).

A function's length is ``end_lineno - lineno + 1`` as ``ast`` reads it: from its ``def`` line to its
last line, docstring, comments and blank lines included (decorators not). Every function counts:
module-level ones, methods and nested functions. The packages are the installed ones (the top-level
names of ``[tool.setuptools] packages`` in pyproject.toml); tests, benchmarks and research scripts
are not product code. A long function is split into steps that have a meaning and a name.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80


def installed_packages() -> list[str]:
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as handle:
        packages = tomllib.load(handle)["tool"]["setuptools"]["packages"]
    return sorted({name.split(".")[0] for name in packages})


def long_functions(source: str, path: str, limit: int = MAX_LINES) -> list[str]:
    """``path:line name length`` for every function of ``source`` longer than ``limit`` lines."""
    found = []
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > limit:
                found.append(f"{path}:{node.lineno} {node.name} {length}")
    return sorted(found)


def test_the_packages_are_read_from_pyproject() -> None:
    assert {"common", "client", "server", "simulation", "flower_adapter"} <= set(installed_packages())


def test_a_function_of_81_lines_is_found_and_one_of_80_is_not() -> None:
    fits = "\n".join(f"    x{i} = {i}" for i in range(79))  # def line + 79 = 80 lines
    method = "\n".join(f"        x{i} = {i}" for i in range(80))  # def line + 80 = 81 lines
    source = f"def fits():\n{fits}\n\n\nclass C:\n    async def too_long(self):\n{method}\n"
    assert long_functions(source, "m.py") == ["m.py:84 too_long 81"]
    assert long_functions(source, "m.py", limit=81) == []


def test_nested_functions_count_on_their_own() -> None:
    inner = "\n".join(f"        y{i} = {i}" for i in range(85))
    source = f"def outer():\n    def inner():\n{inner}\n    return inner\n"
    assert [row.split()[1] for row in long_functions(source, "m.py")] == ["outer", "inner"]


@pytest.mark.parametrize("package", installed_packages())
def test_no_function_is_longer_than_80_lines(package: str) -> None:
    folder = PROJECT_ROOT / package
    assert folder.is_dir(), f"package {package} of pyproject.toml has no folder"
    too_long = [
        row
        for path in sorted(folder.rglob("*.py"))
        for row in long_functions(path.read_text(encoding="utf-8"), path.relative_to(PROJECT_ROOT).as_posix())
    ]
    assert not too_long, (
        f"{len(too_long)} function(s) of {package} are longer than {MAX_LINES} lines (path:line name "
        "length); split each into steps that have a meaning and a name:\n" + "\n".join(too_long)
    )
