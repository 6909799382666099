"""A site runs only its own installed app: a modified app submitted to the SuperLink is refused.

Real processes on loopback: ``flower-superlink``, one ``cxr-fl-client start`` (its warm ClientApp
runner), and ``flwr run`` of a modified copy of cxr-fl whose ClientApp writes a marker file as
soon as it is imported. The site must refuse it before importing any of its code (no marker),
say why in one line of its log, and send an error reply that the coordinator's ServerApp sees.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.processes import flower_env, free_port, stop_process_tree
from common.protocol import SITE_APP_REFUSED
from tests.e2e.harness import wait_for
from tests.helpers import copy_project

BIN = Path(sys.executable).parent

PROBE_SERVER_APP = '''\
"""The coordinator's side of the modified app: one message to every site; replies to a file."""

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = []
    deadline = time.monotonic() + 180
    while not nodes and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    messages = [Message(content, dst_node_id=node, message_type="query") for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=300))
    rows = [
        {"code": r.error.code, "reason": r.error.reason} if r.has_error() else {"ok": True} for r in replies
    ]
    Path(REPLIES).write_text(json.dumps(rows))
'''


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            stop_process_tree(process)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def modified_app(root: Path, marker: Path, replies: Path) -> Path:
    """cxr-fl with a ClientApp that writes ``marker`` when imported, and a probing ServerApp."""
    app = copy_project(root / "cxr-fl")
    with (app / "client" / "app.py").open("a", encoding="utf-8") as handle:
        handle.write(f"\nPath({str(marker)!r}).write_text('the modified app ran at the site')\n")
    (app / "server" / "probe.py").write_text(PROBE_SERVER_APP.replace("REPLIES", repr(str(replies))))
    pyproject = app / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8")
    assert 'serverapp = "server.app:app"' in text
    pyproject.write_text(text.replace('serverapp = "server.app:app"', 'serverapp = "server.probe:app"'))
    return app


def test_a_site_refuses_a_modified_app_before_importing_it(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    marker = tmp_path / "marker.txt"
    replies = tmp_path / "replies.json"
    app = modified_app(tmp_path, marker, replies)
    env = flower_env(tmp_path / "site-home")  # offline, this venv first on PATH
    port = free_port()
    with (tmp_path / "superlink.out").open("wb") as out:
        processes.append(
            subprocess.Popen(
                [
                    str(BIN / "flower-superlink"),
                    "--insecure",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--disable-runtime-dependency-installation",
                ],
                env=flower_env(tmp_path / "superlink-home"),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        )
    wait_for(lambda: _listening(port), 120, "the SuperLink to listen")
    site_out = tmp_path / "site-a"
    with (tmp_path / "site-a.out").open("wb") as out:
        site = subprocess.Popen(
            [
                str(BIN / "cxr-fl-client"),
                "start",
                "--server",
                f"127.0.0.1:{port}",
                "--site",
                "site-a",
                "--format",
                "synthetic",
                "--out",
                str(site_out),
                "--insecure",
                "--skip-check",
                "--threads",
                "1",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    processes.append(site)
    log = site_out / "supernode.log"
    wait_for(lambda: log.is_file() and "SuperNode ID" in log.read_text(), 240, "the site to join")

    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    submitted = subprocess.run(
        [str(BIN / "flwr"), "run", str(app), "test"],
        env=flower_env(flwr_home),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    wait_for(replies.is_file, 400, "the ServerApp to receive the site's reply")

    (reply,) = json.loads(replies.read_text())
    assert reply.get("code") == SITE_APP_REFUSED, reply
    assert reply["reason"].startswith("site 'site-a': refused the app ")
    refusals = [line for line in log.read_text().splitlines() if "refused the app" in line]
    assert len(refusals) == 1
    assert "--allow-app" in refusals[0]
    assert not marker.exists()  # no code of the modified app ran at the site
    assert site.poll() is None  # the site refused that run and keeps serving
