"""A hospital site's side of a real federation: Flower's SuperNode, watched and explained.

``cxr-fl-client start`` is a thin front end over :class:`SiteNode`. It starts
``flower-supernode`` with TLS (``--root-certificates``) and site authentication
(``--auth-supernode-private-key``), passes the site's facts as node_config (see client/site.py),
writes its output to ``OUT/supernode.log`` and reads it line by line to tell the user, in one
line, why a site is refused: an unregistered key, a server certificate that cannot be verified
(no or wrong CA), or nothing listening at the address given (wrong host or port).

The ClientApp writes the student and its model card to ``OUT/student``; a site stops by itself
once it has answered the server's "finish" message (the last message of every run, after the
distillation and any federated-student rounds), on Ctrl-C, or when the server has been
unreachable for ``reconnect_timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError, CxrFlError
from common.processes import console_script, flower_env, free_port, stop_process_tree, toml_value
from common.protocol import RUN_FINISHED_MARKER

STUDENT_CARD = Path("student") / "model_card.json"
# SuperExec (which starts each ClientApp process) polls for work every second by default.
# An interval already set in the environment wins (benchmarks/fl_round_deploy.py measures both).
FAST_POLL_ENV = {
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class SiteRefusedError(CxrFlError):
    """The SuperNode could not join the federation; the message says why in one line."""


class _ActivationRefusedError(Exception):
    """The SuperLink refused to activate this SuperNode (unregistered key, or still online)."""


class _RestartNodeError(Exception):
    """Internal: the SuperNode is stuck on a server that listens again; start it afresh."""


STUCK_SECONDS = 30.0
# Flower keeps a SuperNode "online" for 2 heartbeats (2 x 30 s) after its last one; a site
# restarted after a crash is refused ("Failed to activate SuperNode") until then, exactly as an
# unregistered key is. So activation is retried this long before the site is called refused.
ACTIVATE_GRACE_SECONDS = 75.0
ACTIVATE_RETRY_SECONDS = 5.0
MAX_RESTARTS = 20


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class SiteNodeSettings:
    """How one site joins: where the server is, who the site is, its data and policy."""

    server: str
    site: str
    data_format: str
    data_path: Path | None
    out_dir: Path
    ca_cert: Path | None = None
    private_key: Path | None = None
    insecure: bool = False
    dp_target_epsilon: float | None = None
    dp_target_delta: float | None = None
    dp_max_grad_norm: float | None = None
    num_threads: int = 2
    cache_dir: Path | None = None
    connect_timeout: float = 120.0
    reconnect_timeout: float = 600.0
    activate_timeout: float = ACTIVATE_GRACE_SECONDS

    def __post_init__(self) -> None:
        host, sep, port = self.server.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError("--server", self.server, "HOST:PORT, e.g. coordinator.example.org:9092")
        for option, path in (("--ca", self.ca_cert), ("--key", self.private_key)):
            if path is not None and not path.is_file():
                raise ConfigError(option, str(path), "an existing file")
        # The site's own DP policy and resources: refused here, at start, not inside the ClientApp.
        if self.dp_target_epsilon is not None and not 0 < self.dp_target_epsilon < math.inf:
            raise ConfigError("--epsilon", self.dp_target_epsilon, "a finite number > 0")
        if self.dp_target_delta is not None and not 0 < self.dp_target_delta < 1:
            raise ConfigError("--delta", self.dp_target_delta, "a number in (0, 1), e.g. 1e-5")
        if self.dp_max_grad_norm is not None and not 0 < self.dp_max_grad_norm < math.inf:
            raise ConfigError("--max-grad-norm", self.dp_max_grad_norm, "a finite number > 0")
        if self.num_threads < 1:
            raise ConfigError("--threads", self.num_threads, "an integer >= 1")

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.server.rpartition(":")
        return host.strip("[]"), int(port)

    def node_config(self) -> str:
        """The SuperNode ``--node-config`` string (absolute paths; see client/site.py)."""
        values: dict[str, object] = {
            "site-name": self.site,
            "data-format": self.data_format,
            "out-dir": str(self.out_dir.resolve()),
            "num-threads": self.num_threads,
        }
        if self.data_path is not None:
            values["data-path"] = str(self.data_path.resolve())
        if self.cache_dir is not None:
            values["cache-dir"] = str(self.cache_dir.resolve())
        for key, value in (
            ("dp-target-epsilon", self.dp_target_epsilon),
            ("dp-target-delta", self.dp_target_delta),
            ("dp-max-grad-norm", self.dp_max_grad_norm),
        ):
            if value is not None:
                values[key] = float(value)
        return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())

    def command(self, runtime_port: int) -> list[str]:
        command = [console_script("flower-supernode"), "--superlink", self.server]
        if self.insecure:
            command.append("--insecure")
        elif self.ca_cert is not None:  # without it: the system's CAs (a publicly signed server)
            command += ["--root-certificates", str(self.ca_cert.resolve())]
        if self.private_key is not None:
            command += ["--auth-supernode-private-key", str(self.private_key.resolve())]
        command += [
            "--node-config",
            self.node_config(),
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(runtime_port),
        ]
        return command


def refusal_reason(line: str, settings: SiteNodeSettings) -> str | None:
    """A one-line reason if this SuperNode output line says the site was refused."""
    if "CERTIFICATE_VERIFY_FAILED" in line or "SSL/TLS handshake error" in line:
        return (
            f"TLS failure: the server certificate of {settings.server} could not be verified; pass the "
            "coordinator's CA certificate with --ca ca.crt (the one made by `cxr-fl-server certs`)"
        )
    if "Failed to activate SuperNode" in line:
        return (
            f"the server at {settings.server} refused this site's key: it is not registered. Send "
            f"{settings.site}.pub to the coordinator (`cxr-fl-server register-site {settings.site}.pub "
            f"--name {settings.site}`), or check --key"
        )
    if "Unable to parse the private key" in line:
        return (
            f"--key {settings.private_key}: not an OpenSSH EC private key "
            "(make one with cxr-fl-server site-key)"
        )
    if "started without TLS but node auth" in line.lower() or "Exit Code: 303" in line:
        return "site authentication (--key) needs TLS: drop --insecure and pass --ca"
    return None


def unreachable_reason(settings: SiteNodeSettings) -> str:
    host, port = settings.host_port
    try:
        with socket.create_connection((host, port), timeout=2.0):
            pass
    except ConnectionRefusedError:
        return (
            f"connection refused at {settings.server}: nothing listens on port {port} of {host} "
            "(wrong port, or the server is not started)"
        )
    except OSError as exc:
        return f"cannot reach {settings.server}: {exc.strerror or exc} (check the host name and the network)"
    return f"{settings.server} accepts connections but the SuperNode could not join; see its log"


def connection_news(line: str) -> bool | None:
    """What a SuperNode log line says about its link to the SuperLink: False for a failed
    attempt, True for a (re)established link, None for anything else."""
    if "Connection attempt failed" in line:
        return False
    # "Connection successful after 4.41 seconds and 4 tries.", "Sent successfully", "SuperNode ID: ..."
    if "Connection successful" in line or "successfully" in line or "SuperNode ID" in line:
        return True
    return None


class SiteNode:
    """One site's flower-supernode, started, followed and stopped by its PID tree."""

    def __init__(self, settings: SiteNodeSettings) -> None:
        self.settings = settings
        self.out_dir = settings.out_dir.resolve()
        self.log_path = self.out_dir / "supernode.log"
        self.flwr_home = self.out_dir / "flwr-home"
        self.process: subprocess.Popen[str] | None = None
        self.node_id: int | None = None

    def run(self, on_event: Callable[[str], None] | None = None) -> str:
        """Run until the run ends; returns why it stopped. Raises SiteRefusedError when refused."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        started = time.time()
        notify = on_event or (lambda _e: None)
        restarts = 0
        while True:
            try:
                return self._run_once(started, notify)
            except _ActivationRefusedError as exc:
                if time.time() - started >= self.settings.activate_timeout:
                    raise SiteRefusedError(str(exc)) from None
                notify(
                    "the server did not activate this site yet (an earlier session may still count as "
                    f"online); retrying for up to {self.settings.activate_timeout:.0f} s"
                )
                time.sleep(ACTIVATE_RETRY_SECONDS)
            except _RestartNodeError:
                restarts += 1
                if restarts > MAX_RESTARTS:
                    raise SiteRefusedError(unreachable_reason(self.settings)) from None
                notify("the server came back without this site's session; restarting the SuperNode")

    def _run_once(self, started: float, notify: Callable[[str], None]) -> str:
        command = self.settings.command(free_port())
        self.node_id = None
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
            self.process = subprocess.Popen(
                command,
                env=flower_env(self.flwr_home, FAST_POLL_ENV),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                start_new_session=True,
                cwd=self.out_dir,
            )
            try:
                return self._follow(log, started, notify)
            finally:
                self.stop()

    def _follow(self, log: object, started: float, on_event: Callable[[str], None]) -> str:
        import selectors

        if self.process is None or self.process.stdout is None:
            raise SiteRefusedError("the SuperNode is not running")
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        failing_since: float | None = None
        finished = self.out_dir / RUN_FINISHED_MARKER
        sent_after_finish = 0.0
        while True:
            line = None
            if selector.select(timeout=0.5):
                line = self.process.stdout.readline()
                if line == "":  # the SuperNode exited
                    self.process.wait()
                    raise SiteRefusedError(
                        f"the SuperNode exited with code {self.process.returncode}; see {self.log_path}"
                    )
            now = time.time()
            if line:
                text = ANSI.sub("", line.rstrip("\n"))
                stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
                log.write(f"{stamp} {text}\n")  # type: ignore[attr-defined]
                log.flush()  # type: ignore[attr-defined]
                if reason := refusal_reason(text, self.settings):
                    if "Failed to activate SuperNode" in text:
                        raise _ActivationRefusedError(reason)
                    raise SiteRefusedError(reason)
                if match := re.search(r"SuperNode ID: (\d+)", text):
                    self.node_id = int(match[1])
                    on_event(f"joined the federation as node {self.node_id}")
                connected = connection_news(text)
                if connected is False:
                    failing_since = failing_since or now
                elif connected:
                    failing_since = None
                if "Receiving:" in text:
                    on_event("received a " + text.split("Receiving:", 1)[1].strip().split(" (")[0])
                if "Sent successfully" in text and finished.is_file() and finished.stat().st_mtime >= started:
                    sent_after_finish = now
            if failing_since is not None:
                limit = (
                    self.settings.connect_timeout if self.node_id is None else self.settings.reconnect_timeout
                )
                # A SuperLink restarted without its state (--in-memory) listens again but no longer
                # knows this SuperNode's session, which then fails forever: start it afresh.
                if (
                    self.node_id is not None
                    and now - failing_since > STUCK_SECONDS
                    and _listening(*self.settings.host_port)
                ):
                    raise _RestartNodeError
                if now - failing_since > limit:
                    raise SiteRefusedError(unreachable_reason(self.settings))
            # The distillation reply is the last message of a run.
            # The server's "finish" message is the last of a run; its reply has gone.
            if sent_after_finish and now - sent_after_finish > 1.0:
                card = self.out_dir / STUDENT_CARD
                where = f"; student and model card in {card.parent}" if card.is_file() else ""
                return f"run finished{where}"

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(OSError):
                stop_process_tree(self.process)
            self.process = None
