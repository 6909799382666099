"""The test suite's own rules: CI runs every test (`make test` leaves out only the tests marked
`slow`, and `.ci/run` runs `make test-slow`, exactly those, after it), and helpers are shared
through helper modules and fixtures, never by importing another test module or a conftest."""

from __future__ import annotations

import ast
import re

from tests.helpers import PROJECT_ROOT


def _recipe(target: str) -> str:
    makefile = (PROJECT_ROOT / "Makefile").read_text(encoding="utf-8")
    found = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert found, f"no '{target}' target in the Makefile"
    return found.group(1)


def test_make_test_and_make_test_slow_split_the_suite_by_the_slow_marker() -> None:
    (fast,) = [line for line in _recipe("test").splitlines() if "pytest" in line]
    (slow,) = [line for line in _recipe("test-slow").splitlines() if "pytest" in line]

    assert fast.strip().endswith('-m "not slow"')
    assert slow.strip().endswith("-m slow")


def test_ci_runs_both_halves() -> None:
    commands = [line.strip() for line in (PROJECT_ROOT / ".ci" / "run").read_text().splitlines()]

    assert commands.index("make test") < commands.index("make test-slow")


def test_no_test_module_imports_another_test_module_or_a_conftest() -> None:
    imported = []
    for path in sorted((PROJECT_ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                last = name.rsplit(".", 1)[-1]
                if name.startswith("tests.") and (last.startswith("test_") or last == "conftest"):
                    imported.append(f"{path.relative_to(PROJECT_ROOT)} imports {name}")
    assert imported == []
