"""Runs the project's ServerApp and ClientApp in Flower's simulation runtime (Ray backend).

This is the way Flower itself runs simulations (``flwr run APP CONNECTION`` against a SuperLink
started with ``--simulation``), with three differences that make it safe to drive from code:

- the SuperLink runs on free loopback ports chosen here, not Flower's fixed 39091, with its own
  FLWR_HOME inside the run folder (the user's ``~/.flwr`` is never touched);
- it is started in a session of its own and stopped on exit, error or Ctrl-C together with every
  process it started (SuperExec, the simulation process, Ray and its workers), each by its PID
  as read from /proc: SIGTERM, then SIGKILL;
- runtime dependency installation, telemetry and update checks are off (this machine is offline).

Per-site resources: every simulated site gets ``cpus_per_site`` CPUs from Ray; with fewer cores
than sites, Ray runs sites in turn, so memory stays bounded by the number of concurrent sites,
not the number of sites.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from common.errors import CxrFlError
from common.processes import OFFLINE_ENV, console_script, free_port, stop_process_tree, toml_value
from server.deploy import FlwrRunTimeoutError, follow_flwr_run, write_run_config
from server.progress_lines import without_resume_advice

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 30.0


class SimulationError(CxrFlError):
    """Flower's simulation runtime could not start or the run failed."""


class FlowerSimulation:
    """A simulation SuperLink for one run folder; use as a context manager."""

    def __init__(self, work_dir: Path, *, app_dir: Path = PROJECT_ROOT) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.app_dir = Path(app_dir).resolve()
        self.flwr_home = self.work_dir / "flwr-home"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(OFFLINE_ENV)
        env["FLWR_HOME"] = str(self.flwr_home)
        # Flower starts its helpers (flower-superexec, flwr-simulation) by name.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    @property
    def superlink_log(self) -> Path:
        return self.work_dir / "superlink.log"

    def __enter__(self) -> FlowerSimulation:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        control_port = free_port()
        (self.flwr_home / "config.toml").write_text(
            '[superlink]\ndefault = "cxr-fl-sim"\n\n'
            f'[superlink.cxr-fl-sim]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n',
            encoding="utf-8",
        )
        command = [
            console_script("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--control-api-address",
            f"127.0.0.1:{control_port}",
        ]
        with self.superlink_log.open("ab") as log:
            self.process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise SimulationError(
                    f"Flower SuperLink exited with code {self.process.returncode}; see {self.superlink_log}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                time.sleep(1.0)  # the HTTP app starts right after the socket opens
                return
            time.sleep(0.2)
        raise SimulationError(
            f"Flower SuperLink did not start within {STARTUP_TIMEOUT:.0f} s; see {self.superlink_log}"
        )

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is not None:
            stop_process_tree(self.process)
            self.process = None

    def run(
        self,
        run_config: Mapping[str, Any],
        *,
        num_sites: int,
        cpus_per_site: int = 1,
        on_line: Callable[[str], None] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Submit one run, follow its log until it ends, and return Flower's record of it.

        Raises SimulationError when the run did not complete (the ServerApp failed).
        """
        if self.process is None:
            raise SimulationError("the simulation SuperLink is not running")
        overrides = self.work_dir / "run_overrides.toml"
        write_run_config(overrides, run_config)
        command = [
            console_script("flwr"),
            "run",
            str(self.app_dir),
            "cxr-fl-sim",
            "--run-config",
            str(overrides),
            "--federation-config",
            f"num-supernodes={num_sites} client-resources-num-cpus={toml_value(cpus_per_site)}",
            "--stream",
        ]
        log_path = self.work_dir / "flower.log"
        try:
            run = follow_flwr_run(
                command, env=self.env, cwd=self.work_dir, log_path=log_path, on_line=on_line, timeout=timeout
            )
        except FlwrRunTimeoutError as exc:
            raise SimulationError(str(exc)) from None
        run_id = run.run_id
        if run.returncode != 0 or run_id is None:
            raise SimulationError(f"`flwr run` exited with code {run.returncode}; see {log_path}")
        info = self.run_info(run_id)
        if info.get("status") != "finished:completed":
            details = without_resume_advice(str(info.get("status-details") or "no details"))
            raise SimulationError(
                f"run {run_id} ended as '{info.get('status')}': {details} (log: {log_path})"
            )
        return info

    def run_info(self, run_id: int) -> dict[str, Any]:
        """Flower's record of a run: status, details, elapsed time, network traffic."""
        result = subprocess.run(
            [console_script("flwr"), "ls", "cxr-fl-sim", "--run-id", str(run_id), "--format", "json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        try:
            runs = json.loads(result.stdout)["runs"]
        except (json.JSONDecodeError, KeyError):
            raise SimulationError(
                f"cannot read the status of run {run_id}: {result.stdout or result.stderr}"
            ) from None
        return dict(runs[0]) if runs else {}
