"""The site's app allow-list and the version guard of its warm ClientApp runner.

The runner itself is exercised against real Flower processes in tests/e2e (a federation, and a
modified app that a site refuses).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import flwr
import pytest
from typer.testing import CliRunner

from client.cli import app
from client.deploy import SiteNodeSettings
from common.errors import ConfigError, CxrFlError
from common.processes import OFFLINE_ENV
from flower_adapter.app_runner import (
    PROJECT_ROOT,
    SUPPORTED_FLWR_VERSION,
    AppAllowList,
    RuntimeUnsupportedError,
    WarmClientAppRunner,
    installed_app_hash,
    normalise_app_hash,
    require_supported_flwr,
    write_secret_file,
)
from tests.helpers import copy_project

runner = CliRunner()


@pytest.fixture(scope="module")
def original_hash() -> str:
    return installed_app_hash()


def test_the_hash_is_the_one_flwr_build_gives(tmp_path: Path, original_hash: str) -> None:
    project = copy_project(tmp_path / "cxr-fl")
    built = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), "build", "--app", str(project)],
        cwd=tmp_path,
        env={**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(tmp_path / "flwr-home")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (fab,) = tmp_path.glob("*.fab")

    assert hashlib.sha256(fab.read_bytes()).hexdigest() == original_hash
    assert installed_app_hash(project) == original_hash


def test_a_modified_app_is_refused_and_can_be_allowed(tmp_path: Path, original_hash: str) -> None:
    project = copy_project(tmp_path / "cxr-fl")
    with (project / "client" / "app.py").open("a", encoding="utf-8") as handle:
        handle.write("\nPath('/tmp/marker').write_text('ran')\n")
    from flwr.cli.build import build_fab_from_disk

    modified = build_fab_from_disk(project)
    modified_hash = hashlib.sha256(modified).hexdigest()

    reason = AppAllowList(original_hash).refusal(modified_hash, modified)
    assert reason is not None
    assert modified_hash in reason
    assert original_hash in reason
    assert "--allow-app" in reason
    assert "\n" not in reason
    assert AppAllowList(original_hash, frozenset({modified_hash})).refusal(modified_hash, modified) is None


def test_the_installed_app_is_accepted(original_hash: str) -> None:
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(PROJECT_ROOT)
    assert AppAllowList(original_hash).refusal(original_hash, fab) is None


def test_a_bundle_that_does_not_match_its_hash_is_refused(original_hash: str) -> None:
    reason = AppAllowList(original_hash).refusal(original_hash, b"something else")
    assert reason is not None
    assert "does not match its hash" in reason


def test_docs_and_tests_are_not_part_of_the_app(tmp_path: Path, original_hash: str) -> None:
    project = copy_project(tmp_path / "cxr-fl")
    (project / "README.md").write_text("# edited\n")
    (project / "tests").mkdir()
    (project / "tests" / "conftest.py").write_text("x = 1\n")
    assert installed_app_hash(project) == original_hash


def test_only_listed_hashes_without_a_project_folder(tmp_path: Path) -> None:
    with pytest.raises(CxrFlError, match="--allow-app"):
        installed_app_hash(tmp_path)


def test_allow_app_hashes_are_checked() -> None:
    assert normalise_app_hash(" " + "AB" * 32 + " ") == "ab" * 32
    with pytest.raises(ConfigError, match="--allow-app"):
        normalise_app_hash("abc123")


def test_other_flower_versions_are_refused_with_the_pinned_one_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_supported_flwr()  # the pinned version passes
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    expected = re.escape(f"pip install flwr[simulation]=={SUPPORTED_FLWR_VERSION}")
    with pytest.raises(RuntimeUnsupportedError, match=expected):
        require_supported_flwr()
    with pytest.raises(RuntimeUnsupportedError):
        AppAllowList.for_site(("ab" * 32,))


def test_the_secret_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "home" / "superexec.secret"
    secret = write_secret_file(path)
    assert path.read_bytes() == secret
    assert len(secret) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert write_secret_file(path) != secret  # a fresh one per start


def _settings(tmp_path: Path, **changes: object) -> SiteNodeSettings:
    values: dict[str, object] = {
        "server": "127.0.0.1:9092",
        "site": "site-a",
        "data_format": "synthetic",
        "data_path": None,
        "out_dir": tmp_path / "out",
        "insecure": True,
    }
    values.update(changes)
    return SiteNodeSettings(**values)  # type: ignore[arg-type]


def test_the_warm_runtime_takes_the_supernodes_tasks_itself(tmp_path: Path) -> None:
    secret = tmp_path / "superexec.secret"
    command = _settings(tmp_path).command(1234, secret)
    assert command[command.index("--isolation") + 1] == "process"
    assert command[command.index("--superexec-auth-secret-file") + 1] == str(secret)
    assert command[command.index("--host") + 1] == "127.0.0.1"


def test_start_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--allow-app"):
        _settings(tmp_path, allowed_apps=("ab12",))
    assert _settings(tmp_path, allowed_apps=("AB" * 32,)).allowed_apps == ("ab" * 32,)

    base = ["start", "--server", "127.0.0.1:9", "--site", "a", "--format", "synthetic"]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "o"), "--insecure", "--allow-app", "xyz"])
    assert result.exit_code == 2
    assert "--allow-app" in result.output
    assert "Traceback" not in result.output


def test_app_hash_command_prints_the_installed_hash(original_hash: str) -> None:
    result = runner.invoke(app, ["app-hash"])
    assert result.exit_code == 0, result.output
    assert original_hash in result.output


def test_start_refuses_an_unsupported_flower_before_anything_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    base = ["start", "--server", "127.0.0.1:9", "--site", "a", "--format", "synthetic", "--insecure"]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert f"pip install flwr[simulation]=={SUPPORTED_FLWR_VERSION}" in result.output
    assert "--runtime" not in result.output
    assert not (tmp_path / "o").exists()  # nothing started, nothing written


class _Acquired:
    """What AcquireTask answers: a task with ``token``, or none."""

    def __init__(self, token: str) -> None:
        self.token = token

    def HasField(self, name: str) -> bool:  # noqa: N802  (protobuf's spelling)
        return name == "task" and bool(self.token)


class _SuperNode:
    """The acquire side of a SuperNode that holds ``waiting`` tasks, handed out in order."""

    def __init__(self, waiting: list[str]) -> None:
        self.waiting = list(waiting)

    def AcquireTask(self, request: object) -> _Acquired:  # noqa: N802
        return _Acquired(self.waiting.pop(0) if self.waiting else "")


def _runner(monkeypatch: pytest.MonkeyPatch, supernode: _SuperNode) -> WarmClientAppRunner:
    import flower_adapter.app_runner as app_runner

    monkeypatch.setattr(app_runner, "PULL_PATIENCE_SECONDS", 0.02)
    monkeypatch.setattr(app_runner, "SUPERSEDE_CHECK_SECONDS", 0.01)
    runner = WarmClientAppRunner(b"secret", AppAllowList(None), "site-a", lambda line: None)
    monkeypatch.setattr(runner, "_acquire_request", lambda: object())
    runner._clients["127.0.0.1:1"] = supernode
    return runner


def test_a_task_whose_input_never_arrives_is_given_up_for_a_newer_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A coordinator killed mid-transfer leaves a task whose objects never reach the SuperNode;
    # Flower would pull them for hours. The resumed run's task must still be served.
    never = threading.Event()
    runner = _runner(monkeypatch, _SuperNode(["resumed-run-task"]))
    newer = runner._pull_input(object(), "127.0.0.1:1", lambda client: never.wait(5))
    never.set()
    assert newer == "resumed-run-task"


def test_a_slow_input_is_kept_while_no_newer_task_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = _runner(monkeypatch, _SuperNode([]))
    pulled = runner._pull_input(object(), "127.0.0.1:1", lambda client: time.sleep(0.1) or "the input")
    assert pulled == "the input"


def test_a_failed_pull_raises_in_the_runners_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = _runner(monkeypatch, _SuperNode([]))

    def broken(client: object) -> None:
        raise RuntimeError("No messages received from Runtime API")

    with pytest.raises(RuntimeError, match="No messages"):
        runner._pull_input(object(), "127.0.0.1:1", broken)


class _UploadingSuperNode:
    """A SuperNode's Runtime API for one task whose message objects are still arriving at first."""

    def __init__(self, message: object, context: object) -> None:
        from flwr.app.message import remove_content_from_message
        from flwr.common.serde import context_to_proto, fab_to_proto, message_to_proto, run_to_proto
        from flwr.proto.runtime_pb2 import PullTaskInputResponse
        from flwr.supercore.fab import Fab
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
        from flwr.supercore.run import Run

        message.metadata.__dict__["_message_id"] = message.object_id  # type: ignore[attr-defined]
        self.task = PullTaskInputResponse(
            task_id=7,
            context=context_to_proto(context),  # type: ignore[arg-type]
            run=run_to_proto(Run.create_empty(run_id=3)),
            fab=fab_to_proto(Fab("ab" * 32, b"bundle", {})),
        )
        self.header = message_to_proto(remove_content_from_message(message))  # type: ignore[arg-type]
        self.tree = get_object_tree(message)  # type: ignore[arg-type]
        self.contents = {oid: o.deflate() for oid, o in get_all_nested_objects(message).items()}  # type: ignore[arg-type]
        self.asked: dict[str, int] = {}

    def PullTaskInput(self, request: object) -> object:  # noqa: N802 (Flower's method names)
        return self.task

    def PullMessages(self, request: object) -> object:  # noqa: N802
        from flwr.proto.runtime_pb2 import PullAppMessagesResponse

        return PullAppMessagesResponse(messages_list=[self.header], message_object_trees=[self.tree])

    def PullObject(self, request: object) -> object:  # noqa: N802
        from flwr.proto.message_pb2 import PullObjectResponse

        object_id = request.object_id  # type: ignore[attr-defined]
        self.asked[object_id] = self.asked.get(object_id, 0) + 1
        if self.asked[object_id] == 1:
            return PullObjectResponse(object_found=True, object_available=False)
        return PullObjectResponse(
            object_found=True, object_available=True, object_content=self.contents[object_id]
        )

    def ConfirmMessageReceived(self, request: object) -> object:  # noqa: N802
        return None


def test_the_task_input_is_pulled_on_a_short_backoff(
    monkeypatch: pytest.MonkeyPatch, flower_task_identity: None
) -> None:
    """Flower's flwr-clientapp waits 1 s, 2 s, 4 s... for objects the SuperNode is still receiving."""
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.inflatable import inflatable_utils

    from flower_adapter import app_runner

    content = RecordDict(
        {"arrays": ArrayRecord([np.ones(4, dtype=np.float32)]), "config": ConfigRecord({"r": 2})}
    )
    context = Context(run_id=3, node_id=5, node_config={"site-name": "a"}, state=RecordDict(), run_config={})
    supernode = _UploadingSuperNode(Message(content, dst_node_id=5, message_type="train"), context)
    backoffs: list[tuple[float, float]] = []
    flower_pull = inflatable_utils.pull_and_inflate_object_from_tree

    def recording_pull(*args: object, **kwargs: object) -> object:
        backoffs.append((kwargs["initial_backoff"], kwargs["backoff_cap"]))  # type: ignore[arg-type]
        return flower_pull(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(inflatable_utils, "pull_and_inflate_object_from_tree", recording_pull)

    message, got_context, run, fab = app_runner.pull_task_input(supernode)

    assert backoffs == [app_runner.OBJECT_PULL_BACKOFF]
    assert max(backoffs[0]) <= 0.5
    assert message.content["config"]["r"] == 2
    assert np.array_equal(message.content["arrays"].to_numpy_ndarrays()[0], np.ones(4, dtype=np.float32))
    assert message.metadata.message_id == supernode.tree.object_id
    assert got_context.node_config == {"site-name": "a"}
    assert (run.run_id, fab.content) == (3, b"bundle")
    assert all(count == 2 for count in supernode.asked.values())


class _StoppingProbe:
    """The SuperLink's answer about a run: running until the app has trained ``after`` steps."""

    def __init__(self, trained: threading.Event) -> None:
        self.trained = trained
        self.asked: list[int] = []

    def run_over(self, run_id: int) -> str | None:
        self.asked.append(run_id)
        return "the SuperLink reports it stopped" if self.trained.is_set() else None


def test_a_task_whose_run_is_stopped_starts_no_step_after_the_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from common.progress import reporter_for

    for name, value in (("_task_id", 3), ("_run_id", 42), ("_node_id", 1)):  # as a pulled task sets them
        monkeypatch.setattr(TaskIdentity, name, value)

    trained = threading.Event()
    steps: list[int] = []

    def training_app(message: Message, context: Context) -> Message:
        reporter = reporter_for(None, "train", None)
        for step in range(1, 5001):  # about 5 s of steps if the stop never came
            time.sleep(0.001)
            steps.append(step)
            if step == 5:
                trained.set()
            reporter.step(step, step)
        return Message(RecordDict(), reply_to=message)

    lines: list[str] = []
    probe = _StoppingProbe(trained)
    runner = WarmClientAppRunner(
        b"secret",
        AppAllowList(None),
        "site-a",
        lines.append,
        training_app,
        run_probe=probe,
        watch_seconds=0.01,
    )
    message = Message(RecordDict(), dst_node_id=1, message_type="train")
    context = Context(run_id=42, node_id=1, node_config={}, state=RecordDict(), run_config={})

    reply, stopped = runner._call_app(message, context)

    assert stopped
    assert reply.has_error()
    assert "run 42 was stopped" in reply.error.reason
    assert reply.error.reason.startswith("site 'site-a'")
    assert set(probe.asked) == {42}
    assert any("run 42 stopped by the coordinator" in line for line in lines)
    ended = next(line for line in lines if "the site stopped its work" in line)
    assert ", 0 after)" in ended
    assert 5 <= len(steps) < 5000
    assert runner.tasks_stopped == 1
    assert runner.tasks_run == 0


def test_the_run_probe_reads_the_superlinks_answers(tmp_path: Path) -> None:
    import json

    import httpx
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.proto.run_pb2 import GetRunResponse  # pylint: disable=E0611

    from flower_adapter.app_runner import FleetAccess, RunStatusProbe

    key = tmp_path / "site-a.key"
    key.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    answers: list[httpx.Response] = []
    seen: list[httpx.Request] = []

    def superlink(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    node_id: list[int | None] = [None]
    probe = RunStatusProbe(FleetAccess("127.0.0.1:1", None, key), lambda: node_id[0])
    assert probe.run_over(5) is None
    assert not seen
    node_id[0] = 77
    probe._fleet()._client = httpx.Client(transport=httpx.MockTransport(superlink))

    def flower_error(code: int) -> httpx.Response:
        return httpx.Response(403, content=json.dumps({"code": code, "detail": "x"}).encode())

    answers += [httpx.Response(200, content=GetRunResponse().SerializeToString())]
    assert probe.run_over(5) is None
    answers += [flower_error(2007)]  # FLEET_RUN_STATUS_NOT_ALLOWED: finished or stopped
    assert "finished or stopped" in str(probe.run_over(5))
    answers += [flower_error(2008)]  # FLEET_GET_RUN_FAILED: the SuperLink does not know the run
    assert "no longer knows run 5" in str(probe.run_over(5))
    answers += [httpx.Response(401), httpx.Response(502), flower_error(9999)]
    assert [probe.run_over(5) for _ in range(3)] == [None, None, None]  # unknown: nothing stops
    assert seen[0].url.path == "/v1/fleet/get-run"
    assert all("flwr-signature" in request.headers for request in seen)  # signed with the site's key
    probe.close()


def test_a_key_the_run_watch_cannot_read_is_named(tmp_path: Path) -> None:
    from flower_adapter.app_runner import FleetAccess, RunStatusProbe

    key = tmp_path / "site-a.key"
    key.write_text("not a key")
    with pytest.raises(ConfigError, match="--key"):
        RunStatusProbe(FleetAccess("127.0.0.1:1", None, key), lambda: 1)
