"""The run folder's layout is spelled once: common/run_layout.py (RunLayout, which server/run_folder.py's
RunFolder extends) and server/run_folder.py (CoordinatorFolder, the coordinator's own files).

Every string literal of the installed packages (docstrings aside; read with ``ast``) that looks
like a path and names one of the run folder's or the coordinator's files is reported, unless it
is in the owner module or on the small allow-list below, each entry with its reason.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from server.run_folder import CoordinatorFolder, RunFolder

PROJECT_ROOT = Path(__file__).resolve().parents[2]
OWNERS = ("common/run_layout.py", "server/run_folder.py")
LAYOUT_NAMES = frozenset(
    {
        "metrics.jsonl",
        "events.jsonl",
        "run_config.json",
        "run_overrides.toml",
        "server.log",
        "summary.json",
        "summary.md",
        "distillation.json",
        "federated_student.json",
        "public_student.json",
        "state.json",
        "strategy.npz",
        "checkpoints",
        "best.pt",
        "last.pt",
        "deploy.json",
        "sites.json",
        "revoked.json",
        "gateway.log",
        "superlink.db",
        "loopback-tls",
        "evaluations",
    }
)
ALLOWED = {
    (
        "simulation/runtime.py",
        "run_overrides.toml",
    ): "the settings file of the simulation's own Flower folder, not a run folder",
}


def package_files() -> list[Path]:
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    files: list[Path] = []
    for package in pyproject["tool"]["setuptools"]["packages"]:
        files += sorted((PROJECT_ROOT / package.replace(".", "/")).glob("*.py"))
    return files


def docstrings(tree: ast.AST) -> set[int]:
    """The string literals that stand alone as statements: docstrings (modules, classes,
    functions, attributes), which describe the layout rather than rebuild a path."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }


def layout_names_spelled(source: str) -> set[str]:
    """The layout names that string literals of ``source`` spell as (part of) a path."""
    tree = ast.parse(source)
    skip = docstrings(tree)
    spelled = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = node.value.strip()
            if text and not any(c.isspace() for c in text):
                spelled |= LAYOUT_NAMES & set(text.replace("\\", "/").split("/"))
    return spelled


def test_no_module_but_the_run_folder_spells_its_layout() -> None:
    found = []
    for path in package_files():
        module = path.relative_to(PROJECT_ROOT).as_posix()
        if module in OWNERS:
            continue
        for name in layout_names_spelled(path.read_text(encoding="utf-8")):
            if (module, name) not in ALLOWED:
                found.append(f"{module}: {name!r}")
    assert found == [], "ask common/run_layout.py (RunLayout) or server/run_folder.py (CoordinatorFolder)"


def test_the_check_sees_a_rebuilt_path_and_not_a_sentence() -> None:
    assert layout_names_spelled('p = run_dir / "checkpoints" / "state.json"') == {"checkpoints", "state.json"}
    assert layout_names_spelled('p = f"{run_dir}/summary.json"') == {"summary.json"}
    assert layout_names_spelled('"""Reads metrics.jsonl."""\nhelp = "see the summary.json written"') == set()


def test_the_owner_spells_every_name_the_check_looks_for() -> None:
    owner = set().union(
        *(layout_names_spelled((PROJECT_ROOT / o).read_text(encoding="utf-8")) for o in OWNERS)
    )
    assert owner | {"best.pt", "last.pt"} == LAYOUT_NAMES  # checkpoint(which): checkpoints/<which>.pt
    folder, coordinator = RunFolder(Path("/r")), CoordinatorFolder(Path("/r"))
    assert [folder.checkpoint(w).name for w in ("best", "last")] == ["best.pt", "last.pt"]
    assert folder.state_path == Path("/r/checkpoints/state.json")
    assert coordinator.run("a").summary_path == Path("/r/runs/a/summary.json")
