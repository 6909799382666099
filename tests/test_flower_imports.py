"""Flower's internals only in flower_adapter/: elsewhere the project imports Flower's app API alone.

Every ``flwr`` import of the project's packages (module-level, in functions, under
``TYPE_CHECKING``; read with ``ast``) outside ``flower_adapter`` must be one of Flower's public app
modules below, or a name (not a submodule) imported from ``flwr.common`` itself. Flower's
runtime (``flwr.supercore``, ``flwr.proto``, ``flwr.superlink``, ``flwr.supernode``,
``flwr.superexec``, ``flwr.cli``, ``flwr.common.*`` submodules, ``flwr.__version__``) is the
adapter's: a Flower upgrade then touches that folder, and its one version pin.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import tomllib

from flower_adapter import FLWR_VERSION
from tests.helpers import PACKAGES, PROJECT_ROOT

ADAPTER = "flower_adapter"
PUBLIC_MODULES = frozenset(
    {"flwr.app", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.clientapp", "flwr.simulation"}
)
"""Flower's app API (``flwr.serverapp.strategy`` is where Flower documents its strategies)."""


def _is_flwr(module: str) -> bool:
    return module == "flwr" or module.startswith("flwr.")


def _is_submodule(module: str, name: str) -> bool:
    try:
        return importlib.util.find_spec(f"{module}.{name}") is not None
    except ModuleNotFoundError:
        return False


def flower_imports(source: str) -> list[tuple[str, str]]:
    """``(module, name)`` for every ``flwr`` import in ``source`` (name "" for ``import flwr.x``)."""
    found: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if _is_flwr(alias.name)]
        elif isinstance(node, ast.ImportFrom) and not node.level and _is_flwr(node.module or ""):
            found += [(node.module or "", alias.name) for alias in node.names]
    return found


def forbidden(module: str, name: str) -> bool:
    """Is this ``flwr`` import one that only the adapter may make?"""
    if module in PUBLIC_MODULES:
        return False
    if module == "flwr.common":
        return not name or _is_submodule(module, name)
    return True


def outside_imports() -> list[str]:
    """``path: import`` for every forbidden ``flwr`` import outside the adapter."""
    found = []
    for package in PACKAGES:
        if package == ADAPTER:
            continue
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            for module, name in flower_imports(path.read_text(encoding="utf-8")):
                if forbidden(module, name):
                    where = path.relative_to(PROJECT_ROOT)
                    found.append(f"{where}: {f'from {module} import {name}' if name else f'import {module}'}")
    return found


def test_the_check_tells_the_app_api_from_the_internals() -> None:
    source = (
        "from flwr.app import Message\n"
        "from flwr.serverapp.strategy import FedAvg\n"
        "from flwr.common import ndarrays_to_parameters\n"
        "def f():\n    from flwr.common.constant import ErrorCode\n"
        "if TYPE_CHECKING:\n    from flwr.proto.node_pb2 import Node\n"
        "import flwr\n"
        "from flwr.common import serde\n"
        "from flwr_datasets.partitioner import IidPartitioner\n"
    )
    imports = flower_imports(source)
    assert sorted(pair for pair in imports if forbidden(*pair)) == [
        ("flwr", ""),
        ("flwr.common", "serde"),
        ("flwr.common.constant", "ErrorCode"),
        ("flwr.proto.node_pb2", "Node"),
    ]
    assert ("flwr_datasets.partitioner", "IidPartitioner") not in imports


def test_flower_internals_are_imported_only_in_the_adapter() -> None:
    assert outside_imports() == []


def test_the_adapter_uses_flower_internals() -> None:
    # the check above would pass vacuously if the scan found no files: the adapter's own do count
    adapter = sorted((PROJECT_ROOT / ADAPTER).rglob("*.py"))
    assert any(forbidden(*pair) for path in adapter for pair in flower_imports(path.read_text("utf-8")))


def test_one_flower_version_pin() -> None:
    """pyproject's flwr requirement is the version the adapter was written against."""
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]
    pins = [re.fullmatch(r"flwr(\[[^\]]*\])?==(\S+)", item.replace(" ", "")) for item in dependencies]
    assert [match[2] for match in pins if match] == [FLWR_VERSION]
    elsewhere = [
        path.relative_to(PROJECT_ROOT)
        for package in PACKAGES
        if package != ADAPTER
        for path in (PROJECT_ROOT / package).rglob("*.py")
        if f'"{FLWR_VERSION}"' in path.read_text(encoding="utf-8")
    ]
    assert elsewhere == []
