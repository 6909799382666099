"""What a holder of ``ca.crt`` can do at the sites' address: join as a registered site, nothing else.

Every site holds the federation's CA certificate; it is not a secret. With only that file and a
Flower connection pointing at the sites' address, `flwr ls`, `flwr supernode register` and
`flwr run` must get no answer, no code of the submitted app may run anywhere, and the two-site
TLS federation must still complete with a student at each site. Real processes, as in
test_federation.py; every process is stopped by its PID tree.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from common.processes import console_script
from tests.e2e.harness import Federation

FLWR = console_script("flwr")

# A foreign Flower app: were any of its code to run, on the coordinator (ServerApp) or at a site
# (ClientApp), it would leave a marker file.
FOREIGN_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "foreign"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "intruder"

[tool.flwr.app.components]
serverapp = "foreign_app:server"
clientapp = "foreign_app:client"

[tool.flwr.app.config]
"""
FOREIGN_APP = """\
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

MARKERS = Path({markers!r})
server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    (MARKERS / "serverapp-ran").write_text("the foreign ServerApp ran")
    queries = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in grid.get_node_ids()]
    grid.send_and_receive(queries, timeout=60)


@client.query()
def query(msg: Message, context: Context) -> Message:
    (MARKERS / "clientapp-ran").write_text(str(context.node_config))
    return Message(RecordDict(), reply_to=msg)
"""


def flwr(flwr_home: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A flwr CLI command with its own FLWR_HOME; a command that hangs counts as no answer."""
    try:
        return subprocess.run(
            [FLWR, *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, "FLWR_HOME": str(flwr_home)},
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(exc.cmd, 124, str(exc.stdout or ""), str(exc.stderr or ""))


def connection(flwr_home: Path, name: str, address: str, ca: Path) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
        f'address = "{address}"\nroot-certificates = "{ca}"\n',
        encoding="utf-8",
    )


def json_reply(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    text = result.stdout
    return dict(json.loads(text[text.index("{") :]))


@pytest.mark.timeout(1800)  # a whole federation with distillation, on a possibly busy machine
def test_a_ca_holder_cannot_drive_the_federation_but_sites_still_train(federation: Federation) -> None:
    federation.prepare("site-a", "site-b", "intruder")
    config = federation.write_config("num-rounds = 1\n")
    server = federation.start_server("--config", str(config))
    federation.wait_listening()

    # Prepare: an intruder with only ca.crt, a connection to the sites' address, a foreign app.
    intruder = federation.root / "intruder-home"
    connection(intruder, "sites-address", f"127.0.0.1:{federation.port}", federation.certs / "ca.crt")
    markers = federation.root / "markers"
    markers.mkdir()
    app = federation.root / "foreign"
    app.mkdir()
    (app / "pyproject.toml").write_text(FOREIGN_PYPROJECT, encoding="utf-8")
    (app / "foreign_app.py").write_text(FOREIGN_APP.format(markers=str(markers)), encoding="utf-8")

    # Execute: list runs, register a key, submit the foreign app.
    listed = flwr(intruder, "ls", "sites-address", env=federation.env)
    registered = flwr(
        intruder,
        "supernode",
        "register",
        str(federation.keys / "intruder.pub"),
        "sites-address",
        env=federation.env,
    )
    submitted = flwr(intruder, "run", str(app), "sites-address", env=federation.env)

    # Assert: none of them got an answer (flwr exits 1 on the gateway's 404).
    for result in (listed, registered, submitted):
        assert result.returncode != 0, result.stdout + result.stderr
        assert "404" in result.stdout + result.stderr or result.returncode == 124
    gateway_log = (federation.run_dir / "gateway.log").read_text()
    assert "Refused POST /v1/control/list-runs" in gateway_log
    assert "Refused POST /v1/control/register-node" in gateway_log
    assert "Refused POST /v1/control/start-run" in gateway_log

    # The coordinator's own connection (loopback) still works, and shows nothing of the intruder.
    # (The coordinator submits its run just after it starts listening; on a fast machine the
    # intruder's three commands can all finish before that.)
    federation.wait_run_submitted()
    coordinator_home = federation.run_dir / "flwr-home"
    runs = json_reply(flwr(coordinator_home, "ls", "--format", "json", env=federation.env))["runs"]
    assert [run["fab-id"] for run in runs] == ["cxr-fl/cxr-fl"], runs  # type: ignore[index]
    nodes = json_reply(flwr(coordinator_home, "supernode", "list", "--format", "json", env=federation.env))
    sites = json.loads((federation.run_dir / "sites.json").read_text())
    assert sorted(int(n["node-id"]) for n in nodes["nodes"]) == sorted(s["node_id"] for s in sites)  # type: ignore[attr-defined]

    # The federation goes on: both registered sites train and distil their students.
    clients = [federation.start_client(site) for site in ("site-a", "site-b")]
    # A generous limit: the shared test machine can be many times slower than a quiet one. The
    # sites' own exit after the run is test_federation.py's business (teardown stops them here).
    assert federation.wait(server, "server", 1200) == 0, federation.output("server")
    assert all(client.poll() is None or client.returncode == 0 for client in clients)
    for site in ("site-a", "site-b"):
        assert (federation.root / site / "student" / "student.onnx").is_file(), federation.output(site)
    rows = federation.metrics()
    trained = sorted((r["site"], r["node_id"]) for r in rows if r["phase"] == "train" and r["status"] == "ok")
    assert trained == sorted((s["name"], s["node_id"]) for s in sites)  # registered names and nodes
    assert list(markers.iterdir()) == []  # no code of the foreign app ran anywhere
