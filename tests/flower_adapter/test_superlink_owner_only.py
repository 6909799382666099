"""The owner-only HTTP server of the SuperLink (flower_adapter/superlink_owner_only.py).

The protocol class is tried on a real uvicorn server (a tiny ASGI app that records every request
it gets) on 127.0.0.1 and ::1, in a subprocess; the other user's requests come from a child forked
as ``nobody`` (tests/other_user.py). The whole SuperLink is tried in
tests/e2e/test_superlink_owner_only.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flwr
import pytest

from common.processes import free_port, stop_process_tree
from flower_adapter import superlink_owner_only
from flower_adapter.superlink_owner_only import (
    EXIT_REFUSED,
    SuperLinkRefusedError,
    main,
    owner_only_run,
    require_checked_flwr,
)
from tests.other_user import Attempt, attempt, attempts_as_other_user, needs_root, other_uid

PROJECT_ROOT = Path(__file__).resolve().parents[2]

RECORDING_SERVER = """\
import os, sys
import uvicorn
from flower_adapter.superlink_owner_only import configure_logging, owner_only_run

host, port, record = sys.argv[1], int(sys.argv[2]), sys.argv[3]

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    with open(record, "a") as out:
        out.write(scope["path"] + "\\n")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"served"})

configure_logging()
owner_only_run(uvicorn.run, os.geteuid())(app, host=host, port=port, lifespan="off", log_level="warning")
"""


def test_the_pinned_flower_passes_and_another_is_refused_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    require_checked_flwr()
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    with pytest.raises(SuperLinkRefusedError, match=r"supports flwr 1\.42\.0 only, found flwr 1\.43\.0"):
        require_checked_flwr()
    assert main(["--insecure"]) == EXIT_REFUSED
    assert "install flwr==1.42.0" in capsys.readouterr().err


def test_without_linux_socket_tables_nothing_starts(tmp_path: Path) -> None:
    superlink_owner_only.require_proc_net()  # this machine has them
    with pytest.raises(SuperLinkRefusedError, match="run the coordinator on Linux"):
        superlink_owner_only.require_proc_net(tmp_path)


def test_flowers_grpc_apis_outside_the_check_are_never_started() -> None:
    superlink_owner_only.require_http_only({"FLWR_INTERNAL_GRPC_CONTROL_API": "0"})
    with pytest.raises(SuperLinkRefusedError, match="FLWR_INTERNAL_GRPC_CONTROL_API=1"):
        superlink_owner_only.require_http_only({"FLWR_INTERNAL_GRPC_CONTROL_API": "1"})


def test_the_server_must_be_on_loopback_and_keep_the_owner_only_protocol() -> None:
    calls: list[dict[str, Any]] = []

    def fake_run(app: object, **kwargs: Any) -> None:
        calls.append(kwargs)

    run = owner_only_run(fake_run, owner_uid=1000)
    for host in ("0.0.0.0", "192.0.2.1", "::", "localhost"):
        with pytest.raises(SuperLinkRefusedError, match=r"must listen on 127\.0\.0\.1 or ::1"):
            run(object(), host=host, port=1)
    with pytest.raises(SuperLinkRefusedError, match="HTTP protocol"):
        run(object(), host="127.0.0.1", port=1, http="h11")
    run(object(), host="127.0.0.1", port=1)
    run(object(), host="::1", port=1)
    assert len(calls) == 2
    assert all(c["http"].__name__.startswith("OwnerOnly") for c in calls)
    assert superlink_owner_only.owner_only_announcement(7) == "SuperLink PID 7 serves only uid"


# -- the protocol on a real uvicorn server ------------------------------------------------------


def _serving(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        return probe.connect_ex((host, port)) == 0


@pytest.fixture
def recording_servers(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Owner-only uvicorn servers on 127.0.0.1 and ::1 whose app records every request it serves."""
    servers: dict[str, Any] = {"record": tmp_path / "served.txt", "log": tmp_path / "server.log"}
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    processes = []
    try:
        with servers["log"].open("ab") as log:
            for host in ("127.0.0.1", "::1"):
                port = free_port()
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-c", RECORDING_SERVER, host, str(port), str(servers["record"])],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
                servers[host] = port
        for host in ("127.0.0.1", "::1"):
            deadline = time.monotonic() + 60
            while not _serving(host, servers[host]):
                assert time.monotonic() < deadline, servers["log"].read_text()
                assert all(p.poll() is None for p in processes), servers["log"].read_text()
                time.sleep(0.2)
        yield servers
    finally:
        for process in processes:
            stop_process_tree(process)


@needs_root
def test_other_users_are_cut_off_from_any_loopback_address_and_the_owner_is_served(
    recording_servers: dict[str, Any],
) -> None:
    v4, v6 = recording_servers["127.0.0.1"], recording_servers["::1"]
    other_users = [
        Attempt("127.0.0.1", "127.0.0.1", v4, "/from-127.0.0.1", tls=False),
        Attempt("127.0.0.2", "127.0.0.1", v4, "/from-127.0.0.2", tls=False),
        Attempt("::1", "::1", v6, "/from-ipv6", tls=False),
        # sent, then closed at once: the kernel no longer says whose socket it was
        Attempt("127.0.0.3", "127.0.0.1", v4, "/sent-and-closed", tls=False, close_after_send=True),
    ]

    outcomes = attempts_as_other_user(other_users)
    owner = [attempt(Attempt("127.0.0.2", "127.0.0.1", v4, "/owner", tls=False))]
    owner.append(attempt(Attempt("::1", "::1", v6, "/owner-ipv6", tls=False)))

    assert [o["status"] for o in outcomes] == [None] * len(other_users), outcomes
    assert [o["status"] for o in owner] == [200, 200], owner
    served = recording_servers["record"].read_text().split()
    assert served == ["/owner", "/owner-ipv6"]  # not one request of the other user reached the app
    log = recording_servers["log"].read_text()
    assert "Refused a connection from 127.0.0.2:" in log
    assert f"(uid {other_uid()})" in log
    assert "Refused a connection from [::1]:" in log
