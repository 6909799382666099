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
not the number of sites. ``gpus_per_site`` (a fraction: 0.25 puts four sites on one GPU) is
Flower's ``client-resources-num-gpus``: Ray then runs at most that many sites per GPU and shows
each site only its GPU (``CUDA_VISIBLE_DEVICES``). With 0 Ray leaves the GPUs visible to every
site (``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0``) without limiting how many share them.

An existing Ray cluster: ``ray_address`` (``HOST:PORT`` of its head, ``auto`` or
``ray://HOST:PORT``) reaches Flower's simulation process as ``RAY_ADDRESS``, which ``ray.init()``
reads when Flower's Ray backend starts (Flower 1.42's federation config has no address field;
its ``init-args`` only carry CPU/GPU counts and logging, which Ray refuses when connecting to a
cluster, so none are set). The cluster is not started or stopped here; its workers must see this
project and its Python environment at the same paths. Without ``ray_address`` any
``RAY_ADDRESS`` of the caller's environment is removed, so a local Ray is always started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from common.errors import ConfigError, CxrFlError
from common.processes import (
    OFFLINE_ENV,
    console_script,
    free_port,
    pids_with_env,
    prepend_pythonpath,
    stop_pids,
    stop_process_tree,
    toml_value,
)
from server.deploy import FlwrRunTimeoutError, follow_flwr_run, write_run_config
from server.progress_lines import without_resume_advice

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 30.0
RUN_INFO_TIMEOUT = 300.0
"""`flwr ls` of a finished run: a few seconds, but over a minute was seen after a 100-site run
on a 2-core machine shared with other jobs (load average 20-45)."""


class SimulationError(CxrFlError):
    """Flower's simulation runtime could not start or the run failed."""


_RAY_ADDRESS = re.compile(r"auto|(ray://)?[A-Za-z0-9_.\-]+:\d{1,5}|(ray://)?\[[0-9A-Fa-f:]+\]:\d{1,5}")


def check_ray_address(value: str, option: str = "--ray-address") -> str:
    """A Ray cluster address (``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``), or ConfigError; '' is none."""
    text = value.strip()
    if text and not _RAY_ADDRESS.fullmatch(text):
        raise ConfigError(
            option, value, "the HOST:PORT of a Ray head node (e.g. 10.0.0.5:6379), ray://HOST:PORT or auto"
        )
    return text


def check_gpus_per_site(value: float, option: str = "--gpus-per-site") -> float:
    """A GPU share per simulated site: 0, a fraction in (0, 1] or a whole number of GPUs."""
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number > 1 and not number.is_integer()):
        raise ConfigError(
            option, value, "0 (no GPU), a fraction of one GPU in (0, 1], or a whole number of GPUs"
        )
    return number


def federation_config(num_sites: int, cpus_per_site: int, gpus_per_site: float = 0.0) -> str:
    """Flower's ``--federation-config`` of a simulation: sites and the Ray resources of each."""
    if isinstance(cpus_per_site, bool) or int(cpus_per_site) != cpus_per_site or cpus_per_site < 1:
        raise ConfigError("cpus-per-site", cpus_per_site, "an integer >= 1")
    items = [
        f"num-supernodes={int(num_sites)}",
        f"client-resources-num-cpus={toml_value(int(cpus_per_site))}",
    ]
    gpus = check_gpus_per_site(gpus_per_site)
    if gpus > 0:
        items.append(f"client-resources-num-gpus={toml_value(gpus)}")
    return " ".join(items)


class FlowerSimulation:
    """A simulation SuperLink for one run folder; use as a context manager."""

    def __init__(self, work_dir: Path, *, app_dir: Path = PROJECT_ROOT, ray_address: str = "") -> None:
        self.work_dir = Path(work_dir).resolve()
        self.app_dir = Path(app_dir).resolve()
        self.ray_address = check_ray_address(ray_address)
        self.flwr_home = self.work_dir / "flwr-home"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(OFFLINE_ENV)
        env["FLWR_HOME"] = str(self.flwr_home)
        env.pop("RAY_ADDRESS", None)
        if self.ray_address:
            env["RAY_ADDRESS"] = self.ray_address  # read by ray.init() in Flower's Ray backend
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
        # Flower's SuperLink, serving only this user's connections (flower_adapter/superlink_owner_only.py):
        # another local account could otherwise submit an app here and run code as the researcher
        command = [
            sys.executable,
            "-m",
            "flower_adapter.superlink_owner_only",
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
        env = self.env
        prepend_pythonpath(env, PROJECT_ROOT)
        with self.superlink_log.open("ab") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
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
        # Ray's workers outlive the raylet for a moment and are then no one's children: every
        # process of this simulation carries its FLWR_HOME, so none is left behind
        stop_pids(pids_with_env("FLWR_HOME", str(self.flwr_home)))

    def run(
        self,
        run_config: Mapping[str, Any],
        *,
        num_sites: int,
        cpus_per_site: int = 1,
        gpus_per_site: float = 0.0,
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
            federation_config(num_sites, cpus_per_site, gpus_per_site),
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
        try:
            result = subprocess.run(
                [console_script("flwr"), "ls", "cxr-fl-sim", "--run-id", str(run_id), "--format", "json"],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=RUN_INFO_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise SimulationError(
                f"`flwr ls` did not report run {run_id} within {RUN_INFO_TIMEOUT:.0f} s (is the machine "
                f"overloaded?); see {self.superlink_log}"
            ) from None
        try:
            runs = json.loads(result.stdout)["runs"]
        except (json.JSONDecodeError, KeyError):
            raise SimulationError(
                f"cannot read the status of run {run_id}: {result.stdout or result.stderr}"
            ) from None
        return dict(runs[0]) if runs else {}
