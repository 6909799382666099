"""No function of the coordinator's packages is over 80 lines (``def`` to its last line).

A long function is split into steps that each have a meaning and a name. This covers
``server/`` and ``flower_adapter/``; the other installed packages join the tuple as they are split.
"""

from __future__ import annotations

import ast
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("server", "flower_adapter")
LIMIT = 80


def long_functions(source: str, limit: int = LIMIT) -> list[tuple[str, int]]:
    """``(name, lines)`` of every function in ``source`` longer than ``limit`` lines."""
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > limit
    ]


def test_no_function_of_the_coordinator_is_over_80_lines() -> None:
    found = [
        f"{path.relative_to(PROJECT_ROOT)}: {name} ({lines} lines)"
        for package in PACKAGES
        for path in sorted((PROJECT_ROOT / package).rglob("*.py"))
        for name, lines in long_functions(path.read_text(encoding="utf-8"))
    ]
    assert found == []


def test_the_check_counts_from_def_to_the_last_line() -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(LIMIT))
    assert long_functions(f"def long():\n{body}") == [("long", LIMIT + 1)]
    assert long_functions(f"def fits():\n{body[: body.rindex('    x')]}") == []
