"""The coordinator's side of a real federation: Flower's SuperLink, run submission, progress.

``cxr-fl-server start`` is a thin front end over this module. What it keeps in the run folder
(beside what server/run_folder.py keeps; its CoordinatorFolder names these paths)::

    RUN_DIR/
      deploy.json          sites' address, SuperLink loopback port, PIDs, TLS files, Flower run id
      sites.json           registered sites: name, public key, Flower node id
      revoked.json         revoked site keys (never registered again)
      audit.jsonl          the coordinator's hash-chained audit log (common/audit.py)
      superlink.db         SuperLink state (registered sites, runs) with --database
      superlink.log        SuperLink output (connections it refused are logged here)
      gateway.log          the Fleet gateway's output (refused calls are logged here)
      loopback-tls/        CA and certificate of the loopback SuperLink (no site holds this CA)
      flower.log           the run's log as streamed by `flwr run --stream`
      run_overrides.toml   the run settings submitted (checked against pyproject's schema)
      flwr-home/           FLWR_HOME of the flwr CLI for this run (connection in config.toml)

Transport, TLS and site authentication are Flower's own (``flower-superlink`` with
``--ssl-*`` and ``--enable-supernode-auth``; ``flwr supernode register``); nothing here
reimplements them. The SuperLink listens on 127.0.0.1 only, on a private port, and serves only
connections of the user who runs the coordinator (flower_adapter/superlink_owner_only.py closes any other
local user's): its Control API (submit, list, stop runs; register keys) is the coordinator's alone. The
address sites connect to (``--host/--port``) is served by server/fleet_gateway.py, which forwards
only the Fleet API. Every process started here is stopped by its PID tree.

A run that ends without finishing (``cxr-fl-server stop``, Ctrl-C, ``flwr stop``, a failure) is
first marked stopped in the SuperLink, which is then kept up for a moment
(:meth:`Coordinator.stop_run_for_sites`): a site learns that the run of the task it works on is
over by asking the SuperLink (flower_adapter/app_runner.py), and stops that work.

Audit trail: sites registered, keys rotated and revoked, runs submitted (settings and app hash),
resumed and stopped, and a summary of the calls the gateway refused go to ``RUN_DIR/audit.jsonl``
(an append-only hash chain; ``cxr-fl-server audit verify``). A revoked key
(:meth:`Coordinator.revoke_site`) is unregistered from the SuperLink at once, dropped from
``sites.json`` (its replies are refused: server/site_identity.py) and refused by ``register-site``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.audit import AUDIT_FILE, AuditLog
from common.errors import ConfigError, CxrFlError
from common.jsonio import write_json
from common.pki import public_key_body, public_key_fingerprint
from common.processes import (
    console_script,
    flower_env,
    free_port,
    pid_alive,
    prepend_pythonpath,
    stop_pid_tree,
    stop_process_tree,
    toml_value,
)
from flower_adapter.superlink_owner_only import owner_only_announcement
from server.run_folder import CoordinatorFolder, RunFolder

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PORT = 9092
STARTUP_TIMEOUT = 60.0
SITE_NOTICE_SECONDS = 10.0
"""How long a stopped run's SuperLink stays up for the sites to learn that the run is over
(a site at work asks every 3 s: flower_adapter/app_runner.py RUN_WATCH_SECONDS)."""
CONNECTION = "cxr-fl"
LOOPBACK = "127.0.0.1"
# SuperExec (which starts the ServerApp process) polls for work every second by default.
# An interval already set in the environment wins (benchmarks/fl_round_deploy.py measures both).
FAST_POLL_ENV = {
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
}


class DeployError(CxrFlError):
    """The SuperLink could not start, a site could not be registered, or the run failed."""


# ---------------------------------------------------------------------------------------------
# run settings (schema, reading and checking: common/run_settings.py)


def write_run_config(path: Path, overrides: Mapping[str, Any]) -> None:
    path.write_text(
        "".join(f"{key} = {toml_value(value)}\n" for key, value in sorted(overrides.items())),
        encoding="utf-8",
    )


# ---------------------------------------------------------------------------------------------
# the SuperLink of one run folder


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def from_dir(cls, certs: Path) -> TlsFiles:
        files = cls(certs / "ca.crt", certs / "server.crt", certs / "server.key")
        missing = [str(p) for p in (files.ca_cert, files.server_cert, files.server_key) if not p.is_file()]
        if missing:
            raise ConfigError(
                "--certs",
                str(certs),
                f"a folder with ca.crt, server.crt and server.key (missing {missing[0]}); "
                "make them with `cxr-fl-server certs --out DIR --host HOST`",
            )
        return files


def make_private_folder(folder: Path) -> None:
    """Create ``folder`` readable by its owner only (it will hold checkpoints, logs, the
    Flower home and the loopback TLS key); warn, without changing it, when an existing one is
    open to other users: only the SuperLink itself refuses them (flower_adapter/superlink_owner_only.py)."""
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o700)
        return
    mode = folder.stat().st_mode & 0o777
    if mode & 0o077:
        logger.warning(
            "run folder %s is open to other local users (mode %s): it holds the checkpoints, logs "
            "and Flower's home of this federation; make it private with `chmod 700 %s`",
            folder,
            oct(mode),
            folder,
        )


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


class Coordinator:
    """Starts, drives and stops the SuperLink of one run folder."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.folder = CoordinatorFolder(self.run_dir)
        self.flwr_home = self.folder.flwr_home
        self.state_path = self.folder.deploy_state_path
        self.sites_path = self.folder.sites_path
        self.revoked_path = self.folder.revoked_path
        self.audit = AuditLog(self.run_dir / AUDIT_FILE)
        self.superlink_log = self.folder.superlink_log
        self.flower_log = self.folder.flower_log
        self.gateway_log = self.folder.gateway_log
        self.process: subprocess.Popen[bytes] | None = None
        self.gateway: subprocess.Popen[bytes] | None = None

    # -- state files ---------------------------------------------------------------------------
    def read_state(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            return {}
        return dict(json.loads(self.state_path.read_text(encoding="utf-8")))

    def _update_state(self, **values: Any) -> None:
        state = self.read_state()
        state.update(values)
        write_json(self.state_path, state)

    def read_sites(self) -> list[dict[str, Any]]:
        if not self.sites_path.is_file():
            return []
        return list(json.loads(self.sites_path.read_text(encoding="utf-8")))

    @property
    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home, FAST_POLL_ENV)

    def superlink_running(self) -> bool:
        """Is the loopback SuperLink of this run folder up (what register-site and flwr talk to)?"""
        state = self.read_state()
        pid, port = state.get("superlink_pid"), state.get("superlink_port") or state.get("port")
        if not pid or not port:
            return False
        return pid_alive(int(pid)) and port_open(LOOPBACK, int(port))

    def gateway_running(self) -> bool:
        """Is the sites' address (the Fleet gateway) of this run folder up?"""
        state = self.read_state()
        pid, port = state.get("gateway_pid"), state.get("port")
        if not pid or not port:
            return False
        return pid_alive(int(pid)) and port_open(str(state["host"]), int(port))

    def loopback_tls(self) -> TlsFiles:
        """The loopback SuperLink's CA and certificate (made once per run folder, kept for --resume).

        Not the federation's CA: a site's ``ca.crt`` does not verify the SuperLink itself.
        """
        from server.security import make_certificates

        folder = self.folder.loopback_tls
        files = TlsFiles(folder / "ca.crt", folder / "server.crt", folder / "server.key")
        if not all(p.is_file() for p in (files.ca_cert, files.server_cert, files.server_key)):
            for stale in folder.glob("*") if folder.is_dir() else []:
                stale.unlink()
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            make_certificates(folder, [LOOPBACK, "localhost"])
        return files

    # -- SuperLink -----------------------------------------------------------------------------
    def start_superlink(
        self,
        *,
        port: int,
        host: str = LOOPBACK,
        tls: TlsFiles | None,
        database: bool = False,
        isolation: str = "subprocess",
    ) -> None:
        """Start Flower's SuperLink on loopback and the Fleet gateway on ``host:port``.

        The SuperLink serves only connections of this process's user (flower_adapter/superlink_owner_only.py).
        TLS and site authentication are on unless ``tls`` is None (``--insecure``). The SuperLink
        uses a CA of the run folder's own; the gateway presents ``tls``'s server certificate.
        """
        connect_host = self._check_free(host, port)
        make_private_folder(self.run_dir)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        private_port = free_port()
        while private_port == port:
            private_port = free_port()
        loopback = self.loopback_tls() if tls is not None else None
        self._write_flwr_connection(private_port, loopback)
        self.process = self._spawn_superlink(
            self._superlink_command(private_port, loopback, database, isolation)
        )
        self._update_state(
            host=connect_host,
            port=port,
            superlink_port=private_port,
            superlink_pid=self.process.pid,
            gateway_pid=None,
            coordinator_pid=os.getpid(),
            tls=tls is not None,
            ca_cert=str(tls.ca_cert.resolve()) if tls else None,
            server_cert=str(tls.server_cert.resolve()) if tls else None,
            database=database,
            started=time.time(),
            flower_run_id=None,
        )
        # The gateway needs only the SuperLink's port: both start at once.
        self.gateway = self._start_gateway(host, port, private_port, tls, loopback)
        self._update_state(gateway_pid=self.gateway.pid)
        self._wait_both_ready(self.process, self.gateway, private_port, (host, connect_host, port))

    def _check_free(self, host: str, port: int) -> str:
        """Refuse a second start of this folder's SuperLink, or a port in use; returns the
        address to reach ``host`` at from this machine."""
        if self.superlink_running() or self.gateway_running():
            state = self.read_state()
            raise DeployError(
                f"a SuperLink of {self.run_dir} is already running (PID "
                f"{state.get('superlink_pid')}, gateway PID {state.get('gateway_pid')}); stop it with "
                f"`cxr-fl-server stop --run-dir {self.run_dir}`"
            )
        connect_host = LOOPBACK if host in ("0.0.0.0", "::") else host
        if port_open(connect_host, port):
            raise DeployError(f"port {port} on {host} is already in use; choose another with --port")
        return connect_host

    def _write_flwr_connection(self, private_port: int, loopback: TlsFiles | None) -> None:
        """The flwr CLI's connection to the loopback SuperLink (FLWR_HOME/config.toml)."""
        connection = f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        connection += f'address = "{LOOPBACK}:{private_port}"\n'
        if loopback is None:
            connection += "insecure = true\n"
        else:
            connection += f"root-certificates = {toml_value(str(loopback.ca_cert))}\n"
        (self.flwr_home / "config.toml").write_text(connection, encoding="utf-8")

    def _superlink_command(
        self, private_port: int, loopback: TlsFiles | None, database: bool, isolation: str
    ) -> list[str]:
        # Flower's flower-superlink, run by flower_adapter/superlink_owner_only.py: connections of other
        # local users are closed (Flower's Control API has no authentication of its own).
        command = [sys.executable, "-m", "flower_adapter.superlink_owner_only"]
        if loopback is None:
            command.append("--insecure")
        else:
            command += [
                "--ssl-ca-certfile",
                str(loopback.ca_cert),
                "--ssl-certfile",
                str(loopback.server_cert),
                "--ssl-keyfile",
                str(loopback.server_key),
                "--enable-supernode-auth",
            ]
        command += [
            "--host",
            LOOPBACK,
            "--port",
            str(private_port),
            "--isolation",
            isolation,
            "--disable-runtime-dependency-installation",
        ]
        if database:
            command += ["--database", str(self.folder.superlink_database)]
        return command

    def _spawn_superlink(self, command: list[str]) -> subprocess.Popen[bytes]:
        # Flower's legacy gRPC Fleet/Control servers (switched on by these variables) would listen
        # on addresses of their own, outside the gateway: never inherit them.
        env = {k: v for k, v in self.env.items() if not k.startswith("FLWR_INTERNAL_GRPC_")}
        prepend_pythonpath(env, PROJECT_ROOT)
        with self.superlink_log.open("ab") as log:
            return subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _wait_both_ready(
        self,
        superlink: subprocess.Popen[bytes],
        gateway: subprocess.Popen[bytes],
        private_port: int,
        sites_address: tuple[str, str, int],
    ) -> None:
        """Wait until the SuperLink (with its owner-only check) and the gateway serve;
        ``sites_address``: the host the sites connect to, the host to reach it at here, the port."""
        host, connect_host, port = sites_address
        self._wait_ready(
            superlink,
            self.superlink_log,
            LOOPBACK,
            private_port,
            "the SuperLink",
            "Application startup complete",
        )
        if owner_only_announcement(superlink.pid) not in self.superlink_log.read_text(errors="replace"):
            raise DeployError(f"the SuperLink started without its owner-only check; see {self.superlink_log}")
        # uvicorn runs the app's startup before it binds: an open port means it serves.
        self._wait_ready(gateway, self.gateway_log, connect_host, port, "the Fleet gateway", None)
        logger.info(
            "SuperLink up on %s:%d (PID %d); sites connect to %s:%d (Fleet gateway, PID %d)",
            LOOPBACK,
            private_port,
            superlink.pid,
            host,
            port,
            gateway.pid,
        )

    def _start_gateway(
        self, host: str, port: int, private_port: int, tls: TlsFiles | None, loopback: TlsFiles | None
    ) -> subprocess.Popen[bytes]:
        scheme = "http" if loopback is None else "https"
        command = [
            sys.executable,
            "-m",
            "server.fleet_gateway",
            "--host",
            host,
            "--port",
            str(port),
            "--upstream",
            f"{scheme}://{LOOPBACK}:{private_port}",
        ]
        if tls is not None and loopback is not None:
            command += [
                "--upstream-ca",
                str(loopback.ca_cert),
                "--certfile",
                str(tls.server_cert.resolve()),
                "--keyfile",
                str(tls.server_key.resolve()),
            ]
        # Its limits (body size, connections, header/body timeouts) are its defaults unless this
        # variable holds options of server/fleet_gateway.py, e.g. "--header-timeout 5" (tests use it).
        import shlex

        command += shlex.split(self.env.get("CXR_FL_GATEWAY_OPTIONS", ""))
        env = dict(self.env)
        prepend_pythonpath(env, PROJECT_ROOT)
        with self.gateway_log.open("ab") as log:
            return subprocess.Popen(
                command,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.run_dir,
            )

    def _wait_ready(
        self,
        process: subprocess.Popen[bytes],
        log_path: Path,
        host: str,
        port: int,
        what: str,
        ready_line: str | None,
    ) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise DeployError(
                    f"{what} exited with code {process.returncode}: {' | '.join(tail)} (full log: {log_path})"
                )
            if port_open(host, port):
                # The HTTP app serves requests shortly after the socket opens.
                for _ in range(50 if ready_line is not None else 0):
                    if str(ready_line) in log_path.read_text(errors="replace"):
                        return
                    time.sleep(0.1)
                return
            time.sleep(0.2)
        raise DeployError(
            f"{what} did not listen on {host}:{port} within {STARTUP_TIMEOUT:.0f} s; see {log_path}"
        )

    def stop(self, *, recorded: bool = True) -> None:
        """Stop the gateway and the SuperLink (and everything it started) of this process, or, with
        ``recorded``, the ones whose PIDs the run folder records (``cxr-fl-server stop``)."""
        started_here = False
        for attribute in ("gateway", "process"):
            process = getattr(self, attribute)
            if process is not None:
                stop_process_tree(process)
                setattr(self, attribute, None)
                started_here = True
        if started_here or not recorded:
            return
        state = self.read_state()
        for key in ("gateway_pid", "superlink_pid"):
            pid = state.get(key)
            if pid and pid_alive(int(pid)):
                stop_pid_tree(int(pid))

    def stop_run_for_sites(self, patience: float = SITE_NOTICE_SECONDS) -> None:
        """Mark the run of this folder stopped in the SuperLink and keep the SuperLink up until
        every registered site has been told so (each site's run watch asks every few seconds
        while it works on a task of the run), or ``patience`` seconds; a no-op without a SuperLink."""
        run_id = self.read_state().get("flower_run_id")
        if not run_id or not self.superlink_running():
            return
        offset = self.superlink_log.stat().st_size if self.superlink_log.is_file() else 0
        with contextlib.suppress(OSError, subprocess.SubprocessError):  # already over: nothing to stop
            subprocess.run(
                [console_script("flwr"), "stop", str(run_id), CONNECTION],
                env=self.env,
                capture_output=True,
                timeout=30,
                check=False,
            )
        told = re.compile(rf"\[/v1/fleet/get-run\]\[ApiError:2007\] SuperNode (\d+), run_id={int(run_id)}\b")
        sites = max(1, len(self.read_sites()))
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline and self.superlink_running():
            with self.superlink_log.open("rb") as log:
                log.seek(offset)
                if len(set(told.findall(log.read().decode(errors="replace")))) >= sites:
                    time.sleep(1.0)  # the answer still travels through the gateway
                    return
            time.sleep(0.5)

    # -- sites ---------------------------------------------------------------------------------
    def register_site(self, public_key: Path, name: str) -> int:
        """Register a site's public key with the running SuperLink; returns its Flower node id."""
        from server.security import check_site_name

        check_site_name(name)
        if not public_key.is_file():
            raise ConfigError("KEY.pub", str(public_key), "a public key file (cxr-fl-client init makes one)")
        key_body = public_key_body(public_key.read_text(encoding="utf-8"))
        for revoked in self.read_revoked():
            if revoked["public_key"] == key_body:
                raise ConfigError(
                    "KEY.pub",
                    str(public_key),
                    f"a key that was not revoked (this one was, for site '{revoked['name']}'): the site "
                    "makes a new key pair (cxr-fl-client init) and sends its new .pub",
                )
        sites = self.read_sites()
        state = self.read_state()
        for site in sites:
            # known to this SuperLink: kept in its database, or registered since it started
            if site["public_key"] == key_body and (
                state.get("database") or site.get("superlink_started") == state.get("started")
            ):
                logger.info("Site %s is already registered (node %s)", site["name"], site["node_id"])
                return int(site["node_id"])
        if not self.superlink_running():
            raise DeployError(
                f"no SuperLink of {self.run_dir} is running: start it first "
                f"(`cxr-fl-server start --run-dir {self.run_dir}`), or pass --site-key to start"
            )
        reply = self._flwr_supernode(
            ["register", str(public_key.resolve()), CONNECTION, "--name", name],
            f"{public_key} for site '{name}'",
        )
        node_id = int(reply["node-id"])
        earlier = [s for s in sites if s["name"] == name]
        rotated = bool(earlier) and earlier[0]["public_key"] != key_body
        sites = [s for s in sites if s["name"] != name]
        sites.append(
            {
                "name": name,
                "public_key": key_body,
                "node_id": node_id,
                "key_file": str(public_key),
                "superlink_started": state.get("started"),
            }
        )
        write_json(self.sites_path, sites)
        self.record(
            "site-key-rotated" if rotated else "site-registered",
            site=name,
            node_id=node_id,
            key_sha256=public_key_fingerprint(key_body),
        )
        logger.info("Registered site %s (node %d)", name, node_id)
        return node_id

    def record(self, event: str, **fields: Any) -> None:
        """One entry in the audit log; a log that cannot be appended to is reported, never fatal
        to the federation (``audit verify`` then fails)."""
        try:
            self.audit.append(event, **fields)
        except (CxrFlError, OSError) as exc:
            logger.error("could not write '%s' to the audit log %s: %s", event, self.audit.path, exc)

    def read_revoked(self) -> list[dict[str, Any]]:
        if not self.revoked_path.is_file():
            return []
        return list(json.loads(self.revoked_path.read_text(encoding="utf-8")))

    def revoke_site(self, name: str) -> int:
        """Unregister a site's key from the SuperLink (its node can no longer send or receive),
        forget it in ``sites.json`` and refuse its key from now on; returns its node id."""
        sites = self.read_sites()
        found = [s for s in sites if s["name"] == name]
        if not found:
            known = ", ".join(s["name"] for s in sites) or "none"
            raise ConfigError("SITE", name, f"a registered site of {self.run_dir} (registered: {known})")
        site = found[0]
        running = self.superlink_running()
        if not running and self.read_state().get("database"):
            raise DeployError(
                f"the SuperLink of {self.run_dir} keeps registrations in its database and is not running: "
                "start it, then revoke the site"
            )
        if running:
            self._flwr_unregister(int(site["node_id"]), name)
        write_json(self.sites_path, [s for s in sites if s["name"] != name])
        revoked = self.read_revoked()
        revoked.append(
            {"name": name, "public_key": site["public_key"], "node_id": site["node_id"], "at": time.time()}
        )
        write_json(self.revoked_path, revoked)
        self.record(
            "site-unregistered",
            site=name,
            node_id=int(site["node_id"]),
            key_sha256=public_key_fingerprint(site["public_key"]),
        )
        return int(site["node_id"])

    def _flwr_unregister(self, node_id: int, name: str) -> None:
        self._flwr_supernode(["unregister", str(node_id), CONNECTION], f"node {node_id} (site '{name}')")

    def _flwr_supernode(self, args: list[str], what: str) -> dict[str, Any]:
        """``flwr supernode ARGS --format json`` against the run's SuperLink; its JSON reply, or
        DeployError saying that it refused ``what``."""
        result = subprocess.run(
            [console_script("flwr"), "supernode", *args, "--format", "json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        try:
            reply = json.loads(result.stdout[result.stdout.index("{") :])
        except ValueError:
            reply = {}
        if result.returncode != 0 or not reply.get("success"):
            detail = reply.get("error-message") or (result.stdout + result.stderr).strip().splitlines()[-1:]
            raise DeployError(f"`flwr supernode {args[0]}` refused {what}: {detail}")
        return reply

    def audit_refused_calls(self, since_offset: int) -> None:
        """One audit entry summarising the calls the gateway refused since ``since_offset`` of its
        log (how many, by HTTP status); nothing when there were none."""
        try:
            with self.gateway_log.open("rb") as log:
                log.seek(since_offset)
                text = log.read().decode(errors="replace")
        except OSError:  # no gateway log: nothing was refused through it
            return
        statuses = re.findall(r" Refused \S+ \S+ from .*?: (\d{3}) \(", text)
        if statuses:
            counts = {status: statuses.count(status) for status in sorted(set(statuses))}
            self.record(
                "refused-calls",
                count=len(statuses),
                by_status=", ".join(f"{status}: {n}" for status, n in counts.items()),
            )

    def reregister_sites(self) -> None:
        """After a restart without a persistent database, register the known sites again."""
        for site in self.read_sites():
            key_file = Path(site["key_file"])
            if key_file.is_file():
                self.register_site(key_file, site["name"])

    # -- the run -------------------------------------------------------------------------------
    def submit(
        self,
        overrides: Mapping[str, Any],
        *,
        app_dir: Path = PROJECT_ROOT,
        on_line: Callable[[str], None] | None = None,
        timeout: float | None = None,
        config_name: str | None = None,
    ) -> int:
        """Submit the run with ``flwr run --stream`` and follow its log; returns flwr's exit code.

        The run's settings are written to ``RUN_DIR/config_name``, by default to the run folder's
        ``run_overrides.toml``, which ``--resume`` reads (an evaluation-only run names another
        file, so that one stays as it was).
        Raises FlwrRunTimeoutError when ``timeout`` seconds pass first (``flwr run`` is stopped).
        """
        run = RunFolder(Path(overrides["run-dir"])) if "run-dir" in overrides else RunFolder(self.run_dir)
        config_path = self.run_dir / config_name if config_name else run.overrides_path
        write_run_config(config_path, overrides)
        command = [
            console_script("flwr"),
            "run",
            str(app_dir),
            CONNECTION,
            "--run-config",
            str(config_path),
            "--stream",
        ]

        def record(line: str) -> None:
            if match := RUN_STARTED.search(line):
                self._update_state(flower_run_id=int(match[1]))
            if on_line is not None:
                on_line(line)

        return follow_flwr_run(
            command, env=self.env, cwd=self.run_dir, log_path=self.flower_log, on_line=record, timeout=timeout
        ).returncode

    def failure_reason(self) -> str:
        """The most telling lines of a run that ended without a summary."""
        lines = self.flower_log.read_text(errors="replace").splitlines() if self.flower_log.is_file() else []
        telling = [
            ln.strip()
            for ln in lines
            if "RoundFailedError" in ln or "Error" in ln or "ERROR" in ln or "Exit Code" in ln
        ]
        return telling[-1] if telling else (lines[-1].strip() if lines else "no log")


RUN_STARTED = re.compile(r"Successfully started run (\d+)")


class FlwrRunTimeoutError(CxrFlError):
    """``flwr run`` did not end within the time allowed."""


@dataclass(frozen=True)
class FlwrRun:
    returncode: int
    run_id: int | None


def follow_flwr_run(
    command: list[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path,
    on_line: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> FlwrRun:
    """Start ``flwr run ... --stream``, append its output to ``log_path`` and follow it to the end.

    Each line goes to ``on_line`` without ANSI colours. ``timeout`` is checked every second,
    also while Flower prints nothing; when it passes, the process tree is stopped and
    FlwrRunTimeoutError raised. The process is stopped on any exit, Ctrl-C included.
    """
    lines: queue.Queue[str | None] = queue.Queue()
    deadline = None if timeout is None else time.monotonic() + timeout
    run_id: int | None = None
    with log_path.open("a", encoding="utf-8") as log:
        process = subprocess.Popen(
            command,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            cwd=cwd,
        )
        threading.Thread(target=_pump, args=(process, lines), daemon=True).start()
        try:
            while True:
                if deadline is not None and time.monotonic() > deadline:
                    raise FlwrRunTimeoutError(
                        f"the run did not finish within {timeout:.0f} s (flwr run stopped); see {log_path}"
                    )
                try:
                    line = lines.get(timeout=1.0)
                except queue.Empty:
                    continue
                if line is None:
                    break
                log.write(line + "\n")
                log.flush()
                if run_id is None and (match := RUN_STARTED.search(line)):
                    run_id = int(match[1])
                if on_line is not None:
                    on_line(line)
            process.wait()
        finally:
            stop_process_tree(process)
    return FlwrRun(int(process.returncode or 0), run_id)


def _pump(process: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    """Reader thread: every output line (ANSI stripped) into ``lines``, then None at the end."""
    try:
        if process.stdout is not None:
            for raw in process.stdout:
                lines.put(_strip_ansi(raw.rstrip("\n")))
    finally:
        lines.put(None)


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _strip_ansi(text: str) -> str:
    return ANSI.sub("", text)
