"""The harness of the end-to-end tests: the installed commands run as a coordinator and its sites.

`Federation` holds one test federation's certificates, keys and processes (every process it
started is stopped by its PID tree in the `federation` fixture's teardown, tests/e2e/conftest.py);
`TINY_RUN` is the tiny run (a tiny teacher at 32 px) that every e2e federation trains;
`kit_and_init` sets a site up only from its onboarding kit, as docs/consortium.md does.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.processes import OFFLINE_ENV, free_port, stop_process_tree

BIN = Path(sys.executable).parent
SERVER = str(BIN / "cxr-fl-server")
CLIENT = str(BIN / "cxr-fl-client")
TINY_RUN = """\
image-size = 32
teacher-name = "tiny-cnn"
teacher-norm = "group"
batch-size = 16
kd-batch-size = 16
kd-epochs = 1
kd-width-mult = 0.35
kd-federated-student-rounds = 1
num-threads = 1
"""


class Federation:
    """Certificates, keys and the processes of one test federation."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.run_dir = root / "run"
        self.certs = root / "certs"
        self.keys = root / "keys"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.env = {**os.environ, **OFFLINE_ENV}

    def command(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout, env=self.env, check=False
        )

    def prepare(self, *sites: str) -> None:
        made = self.command(
            SERVER, "certs", "--out", str(self.certs), "--host", "127.0.0.1", "--host", "localhost"
        )
        assert made.returncode == 0, made.stderr
        for site in sites:
            made = self.command(SERVER, "site-key", "--out", str(self.keys), "--site", site)
            assert made.returncode == 0, made.stderr

    def make_certs(self) -> None:
        """The coordinator's TLS certificates for 127.0.0.1 (``cxr-fl-server certs``)."""
        made = self.command(SERVER, "certs", "--out", str(self.certs), "--host", "127.0.0.1")
        assert made.returncode == 0, made.stderr

    def write_config(self, extra: str = "") -> Path:
        path = self.root / "fed.toml"
        path.write_text(TINY_RUN + extra, encoding="utf-8")
        return path

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.out").open("ab")
        process = subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        self.processes.append(process)
        return process

    def coordinator_options(self) -> list[str]:
        """The run folder, certificates and port of a `cxr-fl-server start`/`serve`/`evaluate`."""
        return ["--run-dir", str(self.run_dir), "--certs", str(self.certs), "--port", str(self.port)]

    def start_server(
        self, *extra: str, sites: tuple[str, ...] = ("site-a", "site-b")
    ) -> subprocess.Popen[bytes]:
        args = [SERVER, "start", *self.coordinator_options(), *extra]
        for site in sites:
            args += ["--site-key", str(self.keys / f"{site}.pub")]
        return self.spawn("server", *args)

    def wait_listening(self) -> None:
        """Sites join after their keys are registered, i.e. once the coordinator says it listens."""
        wait_for(lambda: "SuperLink listening" in self.output("server"), 90, "the SuperLink to listen")

    def wait_run_submitted(self) -> None:
        """The coordinator's ``flwr run`` has been accepted: deploy.json records Flower's run id."""

        def submitted() -> bool:
            try:
                state = json.loads((self.run_dir / "deploy.json").read_text())
            except (OSError, ValueError):  # not written yet, or caught mid-write
                return False
            return state.get("flower_run_id") is not None

        wait_for(submitted, 120, "the coordinator to submit its run")

    def start_client(self, site: str, *extra: str, key: str | None = None) -> subprocess.Popen[bytes]:
        return self.spawn(
            site,
            CLIENT,
            "start",
            "--server",
            f"127.0.0.1:{self.port}",
            "--site",
            site,
            "--format",
            "synthetic",
            "--out",
            str(self.root / site),
            "--ca",
            str(self.certs / "ca.crt"),
            "--key",
            str(self.keys / f"{key or site}.key"),
            "--threads",
            "1",
            "--image-size",
            "32",
            *extra,
        )

    def output(self, name: str) -> str:
        path = self.root / f"{name}.out"
        return path.read_text(errors="replace") if path.is_file() else ""

    def wait(self, process: subprocess.Popen[bytes], name: str, timeout: float) -> int:
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not finish within {timeout:.0f} s:\n{self.output(name)[-3000:]}")

    def metrics(self) -> list[dict[str, object]]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def stop_all(self) -> None:
        for process in self.processes:
            stop_process_tree(process)


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def completed_round(run_dir: Path) -> int:
    state = run_dir / "checkpoints" / "state.json"
    if not state.is_file():
        return 0
    return int(json.loads(state.read_text())["completed_round"])


SITES = ("site-a", "site-b")


def kit_and_init(federation: Federation, site: str, *own_limits: str) -> Path:
    kit = federation.root / f"kit-{site}"
    made = federation.command(
        SERVER,
        "kit",
        site,
        "--out",
        str(kit),
        "--server",
        f"127.0.0.1:{federation.port}",
        "--certs",
        str(federation.certs),
        "--max-rounds",
        "10",
        "--max-image-size",
        "64",
    )
    assert made.returncode == 0, made.stderr
    site_dir = federation.root / f"{site}-site"
    init = federation.command(
        CLIENT,
        "init",
        str(kit),
        "--site-dir",
        str(site_dir),
        "--format",
        "synthetic",
        "--image-size",
        "32",
        *own_limits,
        timeout=180,
    )
    assert init.returncode == 0, init.stdout + init.stderr
    assert stat.S_IMODE((site_dir / f"{site}.key").stat().st_mode) == 0o600
    assert "max-rounds = 10" in (site_dir / "site-policy.toml").read_text()
    return site_dir


def verify_site(federation: Federation, site_dir: Path, *extra: str) -> tuple[int, str]:
    result = federation.command(CLIENT, "audit", "verify", "--state-dir", str(site_dir / "state"), *extra)
    return result.returncode, result.stdout + result.stderr


def audit_events(log: Path) -> list[str]:
    return [json.loads(line)["event"] for line in log.read_text().splitlines()]


def start_with_kits(
    federation: Federation, site_dirs: dict[str, Path], extra_config: str
) -> subprocess.Popen[bytes]:
    """`cxr-fl-server start` of a tiny run (``extra_config`` added) with the keys of kit-made sites."""
    keys = [arg for site in site_dirs for arg in ("--site-key", str(site_dirs[site] / f"{site}.pub"))]
    config = federation.write_config(extra_config)
    return federation.spawn(
        "server", SERVER, "start", *federation.coordinator_options(), "--config", str(config), *keys
    )
