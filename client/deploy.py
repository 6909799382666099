"""A hospital site's side of a real federation: Flower's SuperNode, watched and explained.

``cxr-fl-client start`` is a thin front end over :class:`SiteNode`. It starts ``flower-supernode``
with TLS (``--root-certificates``) and site authentication (``--auth-supernode-private-key``),
passes the site's facts as node_config (see client/site.py), writes its output to
``OUT/supernode.log`` and reads it line by line (what a line says: flower_adapter/supernode_log.py)
to tell the user, in one line, why a site is refused: an unregistered key, a server certificate that
cannot be verified (no or wrong CA), or nothing listening at the address given (wrong host or port).

The SuperNode runs with ``--isolation process``: this process is its ClientApp runner (see
flower_adapter/app_runner.py), so torch, the data cache and the installed handlers stay warm across
rounds, and a run of any app other than this installation's own (or one listed with
``--allow-app``) is refused with a one-line reason in ``supernode.log`` and an error reply.
Every site runs this way: the SuperNode never starts Flower's own ``flwr-clientapp`` from the
coordinator's app bundle, so the allow-list always applies.

The SuperNode runs through flower_adapter/supernode_main.py: its data memory is bounded
(``--supernode-memory``, 4 GiB by default; a FAB whose ``pyproject.toml`` is a zip bomb makes it
fail, not the machine), and a SuperNode that dies (killed by a signal, or its Fleet loop ended
on an error such as that bound) is started again, as is one whose session a restarted server
forgot: the site keeps serving. A task that its SuperNode handed out is stopped when that
SuperNode goes away, and when the coordinator stops the task's run (flower_adapter/app_runner.py).

The ClientApp writes the student and its model card to ``OUT/student``; a site stops by itself
once it has answered the server's "finish" message (the last message of every run, after the
distillation and any federated-student rounds), on Ctrl-C, or when the server has been
unreachable for ``reconnect_timeout`` seconds. A long-running site (``stay``: ``cxr-fl-client
serve``) does neither: it stays connected across runs, keeps each run's outputs in
``OUT/runs/<run id>/`` (client/site.py ``for_run``) and starts its SuperNode again, as long as
it takes, when the coordinator is away; it stops on Ctrl-C or SIGTERM only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from client.site import PER_RUN_OUTPUTS_KEY
from client.site_audit import declined_run_recorder
from client.site_policy import SitePolicy
from client.site_privacy import SitePrivacy
from common.device import check_device_setting
from common.errors import ConfigError, CxrFlError
from common.processes import flower_env, free_port, prepend_pythonpath, stop_process_tree, toml_value
from common.protocol import RUN_FINISHED_MARKER
from flower_adapter import supernode_log
from flower_adapter.app_runner import (
    PROJECT_ROOT,
    AppAllowList,
    FleetAccess,
    RunStatusProbe,
    WarmClientAppRunner,
    normalise_app_hash,
    write_secret_file,
)
from flower_adapter.supernode_main import DEFAULT_MEMORY_LIMIT, FLEET_LOOP_ENDED_EXIT

STUDENT_CARD = Path("student") / "model_card.json"


class SiteRefusedError(CxrFlError):
    """The SuperNode could not join the federation; the message says why in one line."""


class _ActivationRefusedError(Exception):
    """The SuperLink refused to activate this SuperNode (unregistered key, or still online)."""


class _RestartNodeError(Exception):
    """Internal: the SuperNode is stuck on a server that listens again, or died; start it afresh."""

    def __init__(self, why: str = "the server came back without this site's session") -> None:
        super().__init__(why)
        self.why = why


STUCK_SECONDS = 30.0
# Flower keeps a SuperNode "online" for 2 heartbeats (2 x 30 s) after its last one; a site
# restarted after a crash is refused ("Failed to activate SuperNode") until then, exactly as an
# unregistered key is. So activation is retried this long before the site is called refused.
ACTIVATE_GRACE_SECONDS = 75.0
ACTIVATE_RETRY_SECONDS = 5.0
MAX_RESTARTS = 20
MIN_SUPERNODE_MEMORY = 512 * 1024**2
"""The smallest memory bound a SuperNode may be given (an idle one uses about 0.2 GB)."""


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
    # the site's DP budget, ledger and opt-ins to share more (client/site_privacy.py)
    privacy: SitePrivacy = field(default_factory=SitePrivacy)
    # site-wide state (the privacy ledger); None: $CXR_FL_STATE_DIR or ~/.local/state/cxr-fl, resolved here
    state_dir: Path | None = None
    num_threads: int = 2
    cache_dir: Path | None = None
    device: str = "auto"
    connect_timeout: float = 120.0
    reconnect_timeout: float = 600.0
    activate_timeout: float = ACTIVATE_GRACE_SECONDS
    # `cxr-fl-client serve`: stay connected across runs, each run's outputs apart
    stay: bool = False
    allowed_apps: tuple[str, ...] = ()
    supernode_memory_gib: float = DEFAULT_MEMORY_LIMIT / 1024**3
    """Bound of the SuperNode's data memory in GiB; 0: none."""
    # the most a run may ask of this site (client/site_policy.py)
    policy: SitePolicy = field(default_factory=SitePolicy)
    # the site's own pin of the initial global teacher (client/teacher_pin.py)
    initial_teacher_sha256: str | None = None
    initial_teacher: Path | None = None
    # the site's criterion for its operating points (client/site.py; checked by the CLI)
    operating_point: str = "balanced-accuracy"

    def __post_init__(self) -> None:
        host, sep, port = self.server.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError("--server", self.server, "HOST:PORT, e.g. coordinator.example.org:9092")
        object.__setattr__(self, "allowed_apps", tuple(normalise_app_hash(h) for h in self.allowed_apps))
        object.__setattr__(self, "device", check_device_setting(self.device, "--device"))
        for option, path in (("--ca", self.ca_cert), ("--key", self.private_key)):
            if path is not None and not path.is_file():
                raise ConfigError(option, str(path), "an existing file")
        self._check_teacher_pin()
        if self.num_threads < 1:
            raise ConfigError("--threads", self.num_threads, "an integer >= 1")
        memory = self.supernode_memory_gib
        if not (memory == 0 or (math.isfinite(memory) and memory * 1024**3 >= MIN_SUPERNODE_MEMORY)):
            raise ConfigError("--supernode-memory", memory, "0 (no bound) or at least 0.5 (GiB)")

    def _check_teacher_pin(self) -> None:
        from common.initial_teacher import check_sha256_hex

        if self.initial_teacher_sha256 is not None:
            value = check_sha256_hex("--initial-teacher-sha256", self.initial_teacher_sha256)
            object.__setattr__(self, "initial_teacher_sha256", value)
        if self.initial_teacher is not None and not self.initial_teacher.is_file():
            raise ConfigError("--initial-teacher", str(self.initial_teacher), "an existing weights file")

    @property
    def resolved_state_dir(self) -> Path:
        """Fixed when the site starts, so the SuperNode's app processes use the same ledger."""
        from client.privacy_ledger import default_state_dir

        return self.state_dir.resolve() if self.state_dir is not None else default_state_dir()

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
            "device": self.device,
        }
        if self.data_path is not None:
            values["data-path"] = str(self.data_path.resolve())
        if self.cache_dir is not None:
            values["cache-dir"] = str(self.cache_dir.resolve())
        values["state-dir"] = str(self.resolved_state_dir)
        values.update(self.privacy.node_config())
        values["operating-point"] = self.operating_point
        if self.stay:
            values[PER_RUN_OUTPUTS_KEY] = True
        if self.initial_teacher_sha256 is not None:
            values["initial-teacher-sha256"] = self.initial_teacher_sha256
        if self.initial_teacher is not None:
            values["initial-teacher"] = str(self.initial_teacher.resolve())
        values.update(self.policy.node_config())
        return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())

    def command(self, runtime_port: int, secret_file: Path) -> list[str]:
        """The ``flower-supernode`` command, always ``--isolation process``: the site's warm runner
        (flower_adapter/app_runner.py) is its only ClientApp runner. ``secret_file`` holds the
        per-start secret that signs the runner's task claims, so that no other local process can
        claim this site's tasks.

        The SuperNode runs through flower_adapter/supernode_main.py, which bounds its data memory
        (``supernode_memory_gib``) and ends it once its Fleet loop ends."""
        memory = int(self.supernode_memory_gib * 1024**3)
        command = [sys.executable, "-m", "flower_adapter.supernode_main", "--memory-limit", str(memory), "--"]
        command += ["--superlink", self.server]
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
            "process",
            "--host",
            "127.0.0.1",
            "--port",
            str(runtime_port),
            "--superexec-auth-secret-file",
            str(secret_file),
        ]
        return command


def refusal_reason(line: str, settings: SiteNodeSettings) -> str | None:
    """A one-line reason if this SuperNode output line says the site was refused."""
    kind = supernode_log.refusal(line)
    if kind == "tls":
        return (
            f"TLS failure: the server certificate of {settings.server} could not be verified; pass the "
            "coordinator's CA certificate with --ca ca.crt (the one made by `cxr-fl-server certs`)"
        )
    if kind == "unregistered":
        return (
            f"the server at {settings.server} refused this site's key: it is not registered. Send "
            f"{settings.site}.pub to the coordinator (`cxr-fl-server register-site {settings.site}.pub "
            f"--name {settings.site}`), or check --key"
        )
    if kind == "bad-key":
        return (
            f"--key {settings.private_key}: not an OpenSSH EC private key "
            "(make one with cxr-fl-server site-key)"
        )
    if kind == "auth-needs-tls":
        return "site authentication (--key) needs TLS: drop --insecure and pass --ca"
    return None


def died(returncode: int) -> str | None:
    """Why a SuperNode that exited with ``returncode`` died (and is started again), or None when it
    ended by itself (Flower's refusals and exits keep their own codes and stop the site)."""
    if returncode < 0:
        return f"the SuperNode was killed (signal {-returncode})"
    if returncode == FLEET_LOOP_ENDED_EXIT:
        return "the SuperNode's Fleet loop ended on an error (e.g. it reached its memory bound)"
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


def installed_client_app() -> Any:
    """This installation's ClientApp, for the warm runner: torch, flwr and the handlers, imported once."""
    from client.app import app
    from common.metrics import preload_scorers

    preload_scorers()  # else the first round that validates waits 2-3 s for scikit-learn
    return app


class SiteNode:
    """One site's flower-supernode, started, followed and stopped by its PID tree."""

    def __init__(self, settings: SiteNodeSettings) -> None:
        self.settings = settings
        self.out_dir = settings.out_dir.resolve()
        self.log_path = self.out_dir / "supernode.log"
        self.flwr_home = self.out_dir / "flwr-home"
        self.secret_path = self.flwr_home / "superexec.secret"
        self.process: subprocess.Popen[str] | None = None
        self.node_id: int | None = None
        self.runner: WarmClientAppRunner | None = None
        self._log: TextIO | None = None
        self._log_lock = threading.Lock()

    def write_log(self, text: str) -> None:
        """One time-stamped line in ``supernode.log`` (the SuperNode's output and the runner's)."""
        now = time.time()
        stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
        with self._log_lock:
            if self._log is None:
                self._log = self.log_path.open("a", encoding="utf-8")
            self._log.write(f"{stamp} {text}\n")
            self._log.flush()

    def run(self, on_event: Callable[[str], None] | None = None) -> str:
        """Run until the run ends; returns why it stopped. Raises SiteRefusedError when refused."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        notify = on_event or (lambda _e: None)
        log_handler = _LogFileHandler(self)
        logging.getLogger().addHandler(log_handler)
        worker: threading.Thread | None = None
        try:
            worker = self._start_runner(notify)
            return self._run_until_done(notify)
        finally:
            if self.runner is not None:
                self.runner.stop()
            if worker is not None:
                worker.join(timeout=5.0)
            self.secret_path.unlink(missing_ok=True)
            logging.getLogger().removeHandler(log_handler)
            with self._log_lock:
                if self._log is not None:
                    self._log.close()
                    self._log = None

    def _start_runner(self, notify: Callable[[str], None]) -> threading.Thread:
        """The warm ClientApp runner (imports torch and the installed app once), in a thread."""
        allow = AppAllowList.for_site(self.settings.allowed_apps)
        secret = write_secret_file(self.secret_path)

        def report(text: str) -> None:
            self.write_log(text)
            notify(text)

        self.runner = WarmClientAppRunner(
            secret,
            allow,
            self.settings.site,
            report,
            run_probe=self._run_probe(),
            load_app=installed_client_app,
            on_refused=declined_run_recorder(self.settings.resolved_state_dir),
        )
        hashes = ", ".join(sorted(allow.hashes))
        self.write_log(f"# warm ClientApp runner; apps allowed (FAB sha256): {hashes}")
        worker = threading.Thread(target=self.runner.serve, name="clientapp-runner", daemon=True)
        worker.start()
        return worker

    def _run_probe(self) -> RunStatusProbe | None:
        """How the runner learns that a task's run was stopped: the Fleet API with the site's key
        (none without site authentication: nothing to sign the question with)."""
        settings = self.settings
        if settings.insecure or settings.private_key is None:
            return None
        access = FleetAccess(settings.server, settings.ca_cert, settings.private_key)
        return RunStatusProbe(access, lambda: self.node_id)

    def _run_until_done(self, notify: Callable[[str], None]) -> str:
        started = time.time()
        restarts = 0
        while True:
            try:
                return self._run_once(started, notify)
            except _ActivationRefusedError as exc:
                if time.time() - started >= self.settings.activate_timeout and not self.settings.stay:
                    raise SiteRefusedError(str(exc)) from None
                notify(
                    "the server did not activate this site yet (an earlier session may still count as "
                    f"online); retrying for up to {self.settings.activate_timeout:.0f} s"
                )
                time.sleep(ACTIVATE_RETRY_SECONDS)
            except _RestartNodeError as exc:
                restarts += 1
                if restarts > MAX_RESTARTS and not self.settings.stay:
                    raise SiteRefusedError(unreachable_reason(self.settings)) from None
                if self.settings.stay:
                    time.sleep(ACTIVATE_RETRY_SECONDS)
                self.write_log(f"# {exc.why}; restarting the SuperNode")
                notify(f"{exc.why}; restarting the SuperNode")
                started = time.time()  # a restarted coordinator registers the sites again: the same grace

    def _run_once(self, started: float, notify: Callable[[str], None]) -> str:
        port = free_port()
        command = self.settings.command(port, self.secret_path)
        self.node_id = None
        self.write_log(f"# {time.strftime('%Y-%m-%d')} {' '.join(command)}")
        env = flower_env(self.flwr_home)  # flower_adapter.supernode_main from this installation:
        prepend_pythonpath(env, PROJECT_ROOT)
        self.process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
            cwd=self.out_dir,
        )
        if self.runner is not None:
            self.runner.set_target(f"127.0.0.1:{port}")
        try:
            return self._follow(started, notify)
        finally:
            if self.runner is not None:
                self.runner.set_target(None)
                # its task's reply could not reach the server any more: stop that work
                self.runner.stop_current_task("the SuperNode that handed out this task stopped")
            self.stop()

    def _follow(self, started: float, on_event: Callable[[str], None]) -> str:
        import selectors

        if self.process is None or self.process.stdout is None:
            raise SiteRefusedError("the SuperNode is not running")
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        failing_since: float | None = None
        session_lost = False
        finished = self.out_dir / RUN_FINISHED_MARKER
        sent_after_finish = 0.0
        while True:
            line = None
            if selector.select(timeout=0.5):
                line = self.process.stdout.readline()
                if line == "":  # the SuperNode exited
                    self.process.wait()
                    if session_lost:  # Flower stops a SuperNode whose session the server forgot
                        raise _RestartNodeError
                    if why := died(self.process.returncode):
                        raise _RestartNodeError(why)
                    raise SiteRefusedError(
                        f"the SuperNode exited with code {self.process.returncode}; see {self.log_path}"
                    )
            now = time.time()
            if line:
                text = supernode_log.plain(line)
                self.write_log(text)
                if reason := refusal_reason(text, self.settings):
                    if supernode_log.refusal(text) == "unregistered":
                        raise _ActivationRefusedError(reason)
                    raise SiteRefusedError(reason)
                session_lost = session_lost or (
                    self.node_id is not None and supernode_log.forgotten_session(text)
                )
                if (node_id := supernode_log.joined_node_id(text)) is not None:
                    self.node_id = node_id
                    on_event(f"joined the federation as node {self.node_id}")
                connected = supernode_log.connection_news(text)
                if connected is False:
                    failing_since = failing_since or now
                elif connected:
                    failing_since = None
                if (received := supernode_log.received_message_type(text)) is not None:
                    on_event("received a " + received)
                if (
                    supernode_log.reply_sent(text)
                    and finished.is_file()
                    and finished.stat().st_mtime >= started
                ):
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
                    if self.settings.stay:  # a long-running site waits for its coordinator
                        raise _RestartNodeError(f"{unreachable_reason(self.settings)}; trying again")
                    raise SiteRefusedError(unreachable_reason(self.settings))
            # The distillation reply is the last message of a run.
            # The server's "finish" message is the last of a run; its reply has gone.
            if sent_after_finish and now - sent_after_finish > 1.0 and not self.settings.stay:
                card = self.out_dir / STUDENT_CARD
                where = f"; student and model card in {card.parent}" if card.is_file() else ""
                return f"run finished{where}"

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(OSError):
                stop_process_tree(self.process)
            self.process = None


class _LogFileHandler(logging.Handler):
    """Warnings and errors of the in-process ClientApp (and of its runner) go to supernode.log."""

    def __init__(self, node: SiteNode) -> None:
        super().__init__(level=logging.WARNING)
        self.node = node
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            for line in self.format(record).splitlines():
                self.node.write_log(line)
        except Exception:  # logging must never break the site
            self.handleError(record)
