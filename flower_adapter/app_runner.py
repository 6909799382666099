"""The site's warm ClientApp runner and its app allow-list, on Flower's Runtime API (internals).

Why this module exists
----------------------
With Flower's default ``--isolation subprocess`` a SuperNode starts a fresh ``flwr-clientapp``
process for every message: it pulls the app bundle (FAB) that the SuperLink hands it, unpacks
it, imports its code (flwr, torch, torchvision: 3-4 s) and runs it. So a site runs whatever app
the coordinator submits, and every message pays for the imports.

``cxr-fl-client start`` instead starts its SuperNode with ``--isolation process`` and acts as the
ClientApp runner itself, against the SuperNode's Runtime API on loopback (what ``flower-superexec``
and ``flwr-clientapp`` do, in one warm process that already imported torch and this site's
*installed* ``client.app``). For each task it:

1. claims the task with ``AcquireTask``, signed with a per-start secret that only this process
   and its SuperNode know (``--superexec-auth-secret-file``, a 0600 file), so that no other local
   process can take the site's messages;
2. pulls the task input (run, FAB, Context, message) and checks the FAB against the site's
   allow-list (:class:`AppAllowList`); an app that is not allowed gets an error reply with code
   :data:`~common.protocol.SITE_APP_REFUSED` (the coordinator logs its reason) and a one-line
   reason in the site's log;
3. otherwise calls the installed ClientApp in-process and pushes its reply and Context back.

A stopped run stops its work here
---------------------------------
Flower 1.42's SuperNode does not tell a running ClientApp that its run was stopped (``flwr
stop``): it waits for the reply, and only drops it when the SuperLink refuses it. So while a
task runs, the runner asks the SuperLink itself, every :data:`RUN_WATCH_SECONDS`, whether the
task's run still runs (:class:`RunStatusProbe`: the Fleet API's ``get-run``, signed with the
site's own key as its SuperNode signs, through the coordinator's gateway). Once the SuperLink
answers that the run is finished or stopped (HTTP 403, code ``FLEET_RUN_STATUS_NOT_ALLOWED``),
or that it no longer knows the run (``FLEET_GET_RUN_FAILED``: a coordinator restarted without
it), the task's :class:`~common.cancellation.StopSignal` is set, the site logs "run N stopped
by the coordinator", and the ClientApp's loops raise at their next check point: no training
step starts after that. The same happens when the SuperNode that handed out the task goes away
(:meth:`WarmClientAppRunner.stop_current_task`): its reply could not be delivered any more.
An unanswered or failing ``get-run`` (coordinator unreachable) stops nothing. Without site
authentication (``--insecure``) the site has no key to ask with, and a stopped run's task runs
to its end (its reply is then dropped), as with Flower's own runtime.

The FAB's code is never unpacked nor imported at the site, allowed or not: the FAB only
identifies the app (and its ``pyproject.toml`` gives the run settings' defaults, read as TOML by
the SuperNode). Torch, the site's decoded-image cache (``common.local.load_site_data`` memoises
it per process) and the first-use costs of torch stay warm across rounds: a message costs a
local call.

The other design considered, a thin ClientApp forwarding each message to a warm worker over a
Unix socket, would still run the FAB's code (the thin app) at the site and would need its own
pre-import check and protocol; this one uses Flower's own task protocol and needs neither.

What "same app" means
---------------------
An app is identified by Flower's FAB hash: the SHA-256 of the bundle that ``flwr run`` packs
(``flwr.cli.build.build_fab_from_disk``: the project's files after ``.gitignore`` and the
``fab-include``/``fab-exclude`` rules of ``[tool.flwr.app]``, in a zip with fixed dates). By
default a site accepts exactly the FAB that its own installed cxr-fl project builds, i.e. the same
files with the same contents packed by the same Flower; ``--allow-app SHA256`` adds others. A
site installed from a wheel (no project folder) builds it from its installed packages and the
``pyproject.toml`` the wheel ships (setup.py): the same bundle, the same hash.
``cxr-fl-client app-hash`` prints the hash a site accepts by default.

Version guard
-------------
The Runtime API calls, the FAB builder and the task-input helpers used here are Flower 1.42
internals (unchanged since 1.41): :func:`require_supported_flwr` refuses any other version
with a one-line message that names the version to install. There is no fallback runtime: every
site runs this runner (``--isolation process``), so the allow-list applies whatever the site's
options; a Flower upgrade is handled in flower_adapter/ (one version pin, ``FLWR_VERSION``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.cancellation import RunStoppedError, StopSignal, stoppable
from common.errors import ConfigError, CxrFlError
from common.protocol import SITE_APP_REFUSED, SITE_FAILED, error_reason
from flower_adapter import FLWR_VERSION

if TYPE_CHECKING:
    from flwr.app import Context, Message

logger = logging.getLogger(__name__)

SUPPORTED_FLWR_VERSION = FLWR_VERSION
PROJECT_ROOT = Path(__file__).resolve().parents[1]
APP_IDENTITY_DIR = Path(__file__).resolve().parent / "app_identity"
"""Where a wheel ships the project's pyproject.toml and .gitignore (setup.py)."""
CLIENTAPP_REF = "client.app:app"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
POLL_SECONDS = 0.2
"""How often the runner asks its SuperNode for a task: a local HTTP call on loopback, as often as
the SuperExec that cxr-fl ran before (FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.2), no more load."""


RUN_WATCH_SECONDS = 3.0
"""How often, while a task runs, the runner asks the SuperLink whether the task's run still runs
(as often as a SuperNode polls for messages: one small signed request per site)."""


class RuntimeUnsupportedError(CxrFlError):
    """The installed Flower is not the version the warm runner was written against."""


def require_supported_flwr() -> None:
    """Fail with a one-line message unless flwr is the version this module was checked against
    (the one cxr-fl pins); the message names the install command."""
    import flwr

    if flwr.__version__ != SUPPORTED_FLWR_VERSION:
        raise RuntimeUnsupportedError(
            f"the warm site runtime supports flwr {SUPPORTED_FLWR_VERSION} only, found flwr "
            f"{flwr.__version__}: install the version this cxr-fl pins "
            f"(pip install flwr[simulation]=={SUPPORTED_FLWR_VERSION})"
        )


def normalise_app_hash(value: str, option: str = "--allow-app") -> str:
    """A FAB hash as 64 lower-case hex digits, or a ConfigError naming the option."""
    text = value.strip().lower()
    if not _SHA256.match(text):
        raise ConfigError(
            option, value, "a full SHA-256 app hash of 64 hex digits (`cxr-fl-client app-hash` prints one)"
        )
    return text


def installed_app_hash(project_root: Path = PROJECT_ROOT, identity_dir: Path = APP_IDENTITY_DIR) -> str:
    """The FAB hash of the app that this installation's own files build (as ``flwr run``).

    From the project folder when cxr-fl runs from one; from a wheel's installed packages and the
    ``pyproject.toml`` (and ``.gitignore``) the wheel ships in ``flower_adapter/app_identity/``
    (setup.py) otherwise: the same files, so the same bundle and hash.
    """
    require_supported_flwr()
    pyproject = project_root / "pyproject.toml"
    if pyproject.is_file():
        _check_project(pyproject)
        from flwr.cli.build import build_fab_from_disk

        try:
            fab = build_fab_from_disk(project_root)
        except ValueError as exc:
            raise CxrFlError(
                f"cannot build this installation's app bundle from {project_root}: {exc}"
            ) from None
        return hashlib.sha256(fab).hexdigest()
    shipped = identity_dir / "pyproject.toml"
    if not shipped.is_file():
        raise CxrFlError(
            f"cannot compute this installation's app hash: no pyproject.toml in {project_root} nor in "
            f"{identity_dir} (cxr-fl is neither a project folder nor a wheel built from one); pass the "
            "coordinator's app hash with --allow-app"
        )
    return _installed_wheel_hash(project_root, shipped, _check_project(shipped))


def _check_project(pyproject: Path) -> dict[str, Any]:
    """The parsed ``pyproject.toml`` of cxr-fl (CxrFlError for any other project's)."""
    import tomllib

    try:
        with pyproject.open("rb") as handle:
            config = tomllib.load(handle)
        components = config["tool"]["flwr"]["app"]["components"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise CxrFlError(f"{pyproject}: no [tool.flwr.app.components] ({exc})") from None
    if components.get("clientapp") != CLIENTAPP_REF:
        raise CxrFlError(f"{pyproject} is not cxr-fl's project (its clientapp is not {CLIENTAPP_REF})")
    return config


def _installed_wheel_hash(packages_root: Path, pyproject: Path, config: dict[str, Any]) -> str:
    """The FAB built, as ``flwr run`` builds it from the project folder, from the installed
    packages that ``fab-include`` names and the shipped ``pyproject.toml`` and ``.gitignore``."""
    from flwr.cli.build import build_fab_from_files

    files: dict[str, bytes | Path] = {"pyproject.toml": pyproject.read_bytes()}
    gitignore = pyproject.parent / "gitignore"
    if gitignore.is_file():
        files[".gitignore"] = gitignore.read_bytes()
    patterns = config["tool"]["flwr"]["app"].get("fab-include", [])
    for package in sorted({str(p).split("/", 1)[0] for p in patterns}):
        for path in sorted((packages_root / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                files[path.relative_to(packages_root).as_posix()] = path
    try:
        fab, _ = build_fab_from_files(files)
    except ValueError as exc:
        raise CxrFlError(f"cannot build this installation's app bundle from {packages_root}: {exc}") from None
    return hashlib.sha256(fab).hexdigest()


@dataclass(frozen=True)
class AppAllowList:
    """The FAB hashes a site runs: its installed app's (``installed``) and any it lists."""

    installed: str | None
    extra: frozenset[str] = frozenset()

    @classmethod
    def for_site(cls, allow_apps: tuple[str, ...] | list[str] = ()) -> AppAllowList:
        """The installed app plus ``--allow-app`` hashes; listed hashes alone where the installed
        app's hash cannot be computed (cxr-fl not installed from its project folder)."""
        extra = frozenset(normalise_app_hash(value) for value in allow_apps)
        try:
            installed: str | None = installed_app_hash()
        except RuntimeUnsupportedError:
            raise
        except CxrFlError:
            if not extra:
                raise
            installed = None
        return cls(installed, extra)

    @property
    def hashes(self) -> frozenset[str]:
        return self.extra | ({self.installed} if self.installed else set())

    def refusal(self, claimed_hash: str, content: bytes) -> str | None:
        """Why a FAB is refused (one line), or None when this site runs it."""
        actual = hashlib.sha256(content).hexdigest()
        if claimed_hash and claimed_hash != actual:
            return f"refused the app: its bundle (sha256 {actual}) does not match its hash {claimed_hash}"
        if actual in self.hashes:
            return None
        mine = f"its installed cxr-fl app {self.installed}" if self.installed else "no installed app"
        listed = f" and {len(self.extra)} hash(es) given with --allow-app" if self.extra else ""
        return (
            f"refused the app {actual}: this site runs only {mine}{listed} (add it with --allow-app "
            "after checking it)"
        )


def write_secret_file(path: Path) -> bytes:
    """A fresh random secret in a file only this user can read (raw bytes, as Flower reads it)."""
    secret = secrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)
    return secret


@dataclass(frozen=True)
class FleetAccess:
    """How the site reaches the SuperLink's Fleet API as its SuperNode does: the server address,
    the CA certificate (None: the system's CAs) and the site's private key."""

    server: str
    ca_cert: Path | None
    private_key: Path


class RunStatusProbe:
    """Asks the SuperLink whether a run still runs: Fleet ``get-run``, signed with the site's key.

    ``node_id`` gives the site's current Flower node id (None before its SuperNode joined): the
    SuperLink accepts the signature only for the node id registered with that key.
    """

    def __init__(self, access: FleetAccess, node_id: Callable[[], int | None]) -> None:
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import load_ssh_private_key

        try:
            key = load_ssh_private_key(access.private_key.read_bytes(), None)
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
            key = None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(
                "--key",
                str(access.private_key),
                "an OpenSSH EC private key (make one with cxr-fl-server site-key)",
            )
        self._key = key
        self._access = access
        self._node_id = node_id
        self._client: Any = None
        self._lock = threading.Lock()

    def _fleet(self) -> Any:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supernode.fleet_http_client import FleetHttpClient
        from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

        if self._client is None:
            ca = self._access.ca_cert
            self._client = FleetHttpClient.from_server_address(
                self._access.server,
                insecure=False,
                root_certificates=None if ca is None else ca.read_bytes(),
                interceptors=[
                    RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                    NodeAuthHttpInterceptor(self._key, self._key.public_key()),
                ],
            )
        return self._client

    def run_over(self, run_id: int) -> str | None:
        """Why ``run_id`` is over, as the SuperLink says; None while it runs or when unknown."""
        import httpx
        from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
        from flwr.proto.run_pb2 import GetRunRequest  # pylint: disable=E0611
        from flwr.supercore.error import ApiErrorCode, FlowerError

        node_id = self._node_id()
        if node_id is None:
            return None
        with self._lock:
            try:
                self._fleet().GetRun(GetRunRequest(node=Node(node_id=node_id), run_id=run_id))
            except httpx.HTTPStatusError as exc:
                error = FlowerError.from_json(exc.response.text)
                code = None if error is None else error.code
                if code == ApiErrorCode.FLEET_RUN_STATUS_NOT_ALLOWED:
                    return f"the SuperLink reports run {run_id} as finished or stopped"
                if code == ApiErrorCode.FLEET_GET_RUN_FAILED:
                    return f"the SuperLink no longer knows run {run_id} (or this site's part in it)"
                logger.debug("get-run %s: %s", run_id, exc)
            except Exception as exc:  # unreachable, restarting, or a reply that does not parse
                logger.debug("get-run %s: %s", run_id, exc)
        return None

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                with contextlib.suppress(Exception):
                    self._client.close()
                self._client = None


class WarmClientAppRunner:
    """Takes this site's tasks from its SuperNode's Runtime API and runs the installed ClientApp.

    One runner lives as long as ``cxr-fl-client start``; :meth:`set_target` points it at the
    SuperNode of the moment (a restarted SuperNode listens on a new port). Tasks run one at a
    time, in the thread that calls :meth:`serve`. ``client_app`` is the ClientApp to call, or
    None: :meth:`serve` then gets it from ``load_app`` (the site's installed ``client.app``,
    passed in by client/deploy.py: this package never imports ``client``).
    """

    def __init__(
        self,
        secret: bytes,
        allow: AppAllowList,
        site: str,
        report: Callable[[str], None],
        client_app: Any = None,
        poll_seconds: float = POLL_SECONDS,
        run_probe: RunStatusProbe | None = None,
        watch_seconds: float = RUN_WATCH_SECONDS,
        load_app: Callable[[], Any] | None = None,
        on_refused: Callable[[int, str], None] | None = None,
    ) -> None:
        require_supported_flwr()
        self.client_app = client_app  # None: load_app() gives it, in serve()
        self._load_app = load_app
        # told of every refused app (run id, reason): the site's audit trail records a declined run
        self.on_refused = on_refused
        self.secret = secret
        self.allow = allow
        self.site = site
        self.report = report
        self.poll_seconds = poll_seconds
        self._target: str | None = None
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.run_probe = run_probe
        self.watch_seconds = watch_seconds
        self._current: StopSignal | None = None
        self.tasks_run = 0
        self.tasks_refused = 0
        self.tasks_stopped = 0

    def set_target(self, address: str | None) -> None:
        """Serve the SuperNode whose Runtime API listens at ``address`` (None: pause)."""
        with self._lock:
            self._target = address

    def stop(self) -> None:
        self._stop.set()

    def stop_current_task(self, reason: str) -> None:
        """Stop the work of the task now running (if any) at its next check point."""
        with self._lock:
            signal = self._current
        if signal is not None and signal.stop(reason):
            self.report(f"the task now running stops: {reason}")

    def serve(self) -> None:
        """Poll for tasks and run them until :meth:`stop`."""
        import httpx

        if self.client_app is None and self._load_app is not None:
            self.client_app = (
                self._load_app()
            )  # torch, flwr and the handlers, once (the site joins meanwhile)

        clients = self._clients
        refused_claims = False
        try:
            while not self._stop.is_set():
                with self._lock:
                    target = self._target
                if target is None:
                    self._stop.wait(self.poll_seconds)
                    continue
                if target not in clients:
                    clients[target] = self._acquire_client(target)
                try:
                    acquired = clients[target].AcquireTask(self._acquire_request())
                except httpx.HTTPStatusError as exc:  # e.g. 401: the SuperNode does not know our secret
                    if not refused_claims:
                        self.report(f"the SuperNode refused this site's task claims: {exc}")
                    refused_claims = True
                    self._stop.wait(self.poll_seconds * 10)
                    continue
                except httpx.HTTPError as exc:  # the SuperNode is starting, restarting or gone
                    logger.debug("AcquireTask at %s: %s", target, exc)
                    self._stop.wait(self.poll_seconds * 5)
                    continue
                except Exception:  # never let the runner die: the site would hang
                    logger.exception("could not ask the SuperNode for a task")
                    self._stop.wait(self.poll_seconds * 10)
                    continue
                if acquired.HasField("task") and acquired.token:
                    token: str | None = acquired.token
                    while token:  # a task whose input never came may be superseded by a newer one
                        try:
                            token = self.run_task(target, token)
                        except Exception:
                            logger.exception("the ClientApp task could not be run")
                            token = None
                else:
                    self._stop.wait(self.poll_seconds)
        finally:
            for client in clients.values():
                with contextlib.suppress(Exception):
                    client.close()

    @staticmethod
    def _acquire_request() -> Any:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        return AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])

    def _acquire_client(self, target: str) -> Any:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        return RuntimeHttpClient.from_server_address(
            server_address=target,
            insecure=True,  # loopback only: the SuperNode's Runtime API is bound to 127.0.0.1
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(
                    master_secret=self.secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}
                ),
            ],
        )

    def run_task(self, target: str, token: str) -> str | None:
        """Run one claimed task: pull its input, check the app, call the ClientApp, push the reply.

        Returns the token of a newer task that superseded this one while its input was still
        being pulled (see :meth:`_pull_input`), None otherwise.
        """
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        client = RuntimeHttpClient.from_server_address(
            server_address=target,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=_retry_policy(),
        )
        heartbeat = HeartbeatSender(_heartbeat_fn(client))
        heartbeat.start()
        context: Context | None = None
        message: Message | None = None
        reply: Message | None = None
        sub_status, details = SubStatus.FAILED, "the ClientApp task failed"
        newer: str | None = None
        try:
            pulled = self._pull_input(client, target, pull_task_input)
            if isinstance(pulled, str):
                newer, details = pulled, "superseded by a newer task while its input was being pulled"
                self.report(
                    f"a task whose input did not arrive in {PULL_PATIENCE_SECONDS:.0f} s "
                    "was given up for a newer one"
                )
                return newer
            message, context, run, fab = pulled
            reason = self.allow.refusal(run.fab_hash, fab.content)
            if reason is not None:
                self.tasks_refused += 1
                self.report(reason)
                if self.on_refused is not None:
                    self.on_refused(int(run.run_id), reason)
                reply = Message(Error(SITE_APP_REFUSED, error_reason(self.site, reason)), reply_to=message)
                details = reason
            else:
                started = time.perf_counter()
                reply, stopped = self._call_app(message, context)
                if stopped:
                    details = str(reply.error.reason)
                else:
                    self.tasks_run += 1
                    sub_status, details = SubStatus.COMPLETED, ""
                logger.info(
                    "%s message handled in %.2f s",
                    message.metadata.message_type,
                    time.perf_counter() - started,
                )
        except Exception as exc:  # a failure of one task must not stop the site
            logger.exception("the ClientApp task failed")
            details = f"{type(exc).__name__}: {exc}"
            if message is not None:
                text = error_reason(self.site, details)
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, text), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception:
                logger.exception("could not hand the reply to the SuperNode")
            finally:
                with contextlib.suppress(Exception):
                    push_task_output(client, context, sub_status, details)
                heartbeat.stop()
                client.close()  # an abandoned pull (superseded task) fails on the closed client and ends
        return newer

    def _call_app(self, message: Message, context: Context) -> tuple[Message, bool]:
        """Call the ClientApp under a stop signal that the run watch sets once the run is over;
        returns its reply and whether the task was stopped.

        A stopped task still answers (an error reply): Flower's SuperNode waits for a reply to
        every message it handed out before it takes the next one.
        """
        from flwr.app import Error, Message

        signal = StopSignal()
        run_id = int(context.run_id)
        with self._lock:
            self._current = signal
        done = threading.Event()
        watch = None
        if self.run_probe is not None:
            watch = threading.Thread(
                target=self._watch_run, args=(run_id, signal, done), name="cxr-fl run watch", daemon=True
            )
            watch.start()
        try:
            with stoppable(signal):
                return self.client_app(message=message, context=context), False
        except RunStoppedError as exc:
            self.tasks_stopped += 1
            self.report(
                f"run {run_id}: the site stopped its work on the {message.metadata.message_type} message "
                f"({signal.steps_at_stop} training steps had started before the stop reached this site, "
                f"{signal.steps_after_stop} after)"
            )
            text = error_reason(self.site, f"run {run_id} was stopped; this site stopped its work: {exc}")
            return Message(Error(SITE_FAILED, text), reply_to=message), True
        finally:
            done.set()
            with self._lock:
                self._current = None
            if watch is not None:
                watch.join(timeout=self.watch_seconds + 30.0)

    def _watch_run(self, run_id: int, signal: StopSignal, done: threading.Event) -> None:
        """Until ``done``: ask the SuperLink whether ``run_id`` still runs; stop the task once not."""
        probe = self.run_probe
        while probe is not None and not done.wait(self.watch_seconds):
            reason = probe.run_over(run_id)
            if reason is not None and not done.is_set() and signal.stop(reason):
                self.report(
                    f"run {run_id} stopped by the coordinator ({reason}); the site stops its work on it"
                )
                return

    def _pull_input(self, client: Any, target: str, pull: Callable[[Any], Any]) -> Any:
        """The task's input, or the token of a newer task that superseded it.

        Flower pulls a message's objects from the SuperNode with a patience of hours (its
        ``PULL_MAX_TIME``): a message whose objects never reach the SuperNode (its SuperLink was
        stopped mid-transfer, e.g. a coordinator killed and resumed) would block this one runner
        and with it every later message. So the pull runs in its own thread, and once it has
        waited :data:`PULL_PATIENCE_SECONDS` the runner also asks the SuperNode for a newer task
        every few seconds: if there is one, this task is given up for it (the server re-sends
        what it still needs).
        """
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["input"] = pull(client)
            except BaseException as exc:  # handed to the caller's thread
                result["error"] = exc

        thread = threading.Thread(target=work, name="cxr-fl task input", daemon=True)
        thread.start()
        waited = 0.0
        while True:
            thread.join(SUPERSEDE_CHECK_SECONDS)
            if not thread.is_alive():
                break
            waited += SUPERSEDE_CHECK_SECONDS
            if waited >= PULL_PATIENCE_SECONDS and (newer := self._claim_newer_task(target)):
                return newer
        if "error" in result:
            raise result["error"]
        return result["input"]

    def _claim_newer_task(self, target: str) -> str | None:
        client = self._clients.get(target)
        if client is None:
            return None
        try:
            acquired = client.AcquireTask(self._acquire_request())
        except Exception as exc:  # the SuperNode is busy or restarting: keep waiting
            logger.debug("AcquireTask while a task's input is pulled: %s", exc)
            return None
        return str(acquired.token) if acquired.HasField("task") and acquired.token else None


PULL_PATIENCE_SECONDS = 30.0
"""How long a task's input may take to arrive before a newer task may supersede it."""
SUPERSEDE_CHECK_SECONDS = 5.0
"""How often, past that patience, the runner asks its SuperNode whether a newer task waits."""
RETRY_SECONDS = 60.0
"""How long a task's calls to its SuperNode are retried (transport errors) before the task gives up."""


OBJECT_PULL_BACKOFF = (0.05, 0.5)
"""First and longest pause (s) between two asks for an object the SuperNode is still receiving.

The runner claims a task as soon as the SuperNode has the message's header, usually before
the SuperNode has the model itself; Flower's own ``flwr-clientapp`` then backs off 1 s, 2 s,
4 s... (``PULL_INITIAL_BACKOFF``/``PULL_BACKOFF_CAP``), which cost a round 1-3 s. Asking the
local SuperNode again within half a second costs it next to nothing."""


def pull_task_input(client: Any) -> tuple[Message, Context, Any, Any]:
    """The task's message, Context, run and FAB, as Flower's ``run_clientapp.pull_task_input``
    but with :data:`OBJECT_PULL_BACKOFF` between asks for objects that are not there yet."""
    from flwr.app import Message as FlowerMessage
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    task = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = task.task_id  # as Flower's: replies made in this process carry them
    TaskIdentity.run_id = task.run.run_id
    TaskIdentity.node_id = task.context.node_id
    context = context_from_proto(task.context)
    run = run_from_proto(task.run)
    fab = fab_from_proto(task.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode handed over a task without its message")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    first, longest = OBJECT_PULL_BACKOFF
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=FlowerMessage,
        initial_backoff=first,
        backoff_cap=longest,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's: not part of the content
    return message, context, run, fab


def _retry_policy() -> Any:
    """Retry transport errors for a while, nothing else. Flower's own policy for ``flwr-clientapp``
    signals its process (SIGINT) on a 401 and retries forever: fine for a throw-away process,
    not for the warm site that outlives every task."""
    import httpx
    from flwr.supercore.retry import RetryInvoker, exponential

    return RetryInvoker(
        lambda: exponential(base_delay=0.2, max_delay=5),
        httpx.TransportError,
        max_tries=None,
        max_time=RETRY_SECONDS,
    )


def _heartbeat_fn(client: Any) -> Callable[[], bool]:
    """Flower's task heartbeat, except that a refused heartbeat does not signal this process."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

    def beat() -> bool:
        try:
            client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False
        except Exception as exc:  # the task is over or unknown: nothing left to keep alive
            logger.debug("task heartbeat: %s", exc)
        return True

    return beat
