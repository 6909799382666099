"""CI runs every test: `make test` leaves out only the tests marked `slow`, and `.ci/run` runs
`make test-slow` (exactly those) after it."""

from __future__ import annotations

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
