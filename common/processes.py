"""Child processes of the CLIs: free loopback ports, the offline environment, stopping trees by PID.

Flower's SuperLink and SuperNode start helpers (SuperExec, ServerApp and ClientApp processes,
Ray workers) in sessions of their own, so signalling a process group is not enough to stop
them. :func:`stop_process_tree` reads the tree from /proc and signals every process by its
PID. Nothing here imports Flower.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.errors import CxrFlError

# Flower's runtime dependency installation (``uv sync``), telemetry and update checks all need
# the internet; hospitals and this machine are offline.
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "PYTHONUNBUFFERED": "1",
}


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def console_script(name: str) -> str:
    """A console script of the running interpreter's environment (works without activation)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise CxrFlError(f"'{name}' not found; install the project (make test / pip install -e .)")
    return found


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: offline, a private FLWR_HOME, this venv first on PATH."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    # Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if extra:
        env.update(extra)
    return env


def toml_value(value: Any) -> str:
    """A Python scalar as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (from /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    queue = [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def signal_pid(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def stop_pid_tree(pid: int, timeout: float = 10.0) -> None:
    """Stop ``pid`` and every process it started, each by its PID: SIGTERM, then SIGKILL."""
    tree = [pid, *descendants(pid)]
    for member in tree:
        signal_pid(member, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(member) for member in tree):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    for member in tree:
        if pid_alive(member):
            signal_pid(member, signal.SIGKILL)


def stop_process_tree(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Stop a Popen child and every process it started, each by its PID: SIGTERM, then SIGKILL."""
    tree = [process.pid, *descendants(process.pid)]
    for pid in tree:
        signal_pid(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.poll()
        if not any(pid_alive(pid) for pid in tree):
            break
        time.sleep(0.1)
    for pid in tree:
        if pid_alive(pid):
            signal_pid(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)
    wait_gone(tree, timeout)


def wait_gone(pids: list[int], timeout: float) -> bool:
    """Wait up to ``timeout`` seconds until none of ``pids`` is alive (a killed process takes a
    moment to go); True when they are all gone."""
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def pids_with_env(name: str, value: str) -> list[int]:
    """PIDs of live processes whose environment has ``name=value`` exactly (this user's only)."""
    entry_bytes = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not pid_alive(int(entry.name)):
            continue
        with contextlib.suppress(OSError):
            if entry_bytes in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def stop_pids(pids: list[int], timeout: float = 10.0) -> None:
    """Stop ``pids`` (not our children, e.g. workers a runtime left behind): SIGTERM, then SIGKILL."""
    for pid in pids:
        signal_pid(pid, signal.SIGTERM)
    if not wait_gone(pids, timeout):
        for pid in pids:
            if pid_alive(pid):
                signal_pid(pid, signal.SIGKILL)
        wait_gone(pids, timeout)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that ``finally`` blocks stop the processes we started."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def prepend_pythonpath(env: dict[str, str], folder: Path) -> None:
    """Put ``folder`` first on ``env``'s PYTHONPATH (a child started with ``python -m`` then
    imports this installation's packages, whatever its working directory)."""
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)
