"""Another account on the coordinator's machine cannot act on its SuperLink; the coordinator still can.

The SuperLink is started by the same deploy.py class that ``cxr-fl-server start`` uses (real
processes: SuperLink with its SuperExec, Fleet gateway), a site is registered with the ``flwr``
CLI. Then ``nobody`` (tests/other_user.py: a forked child, no file of the run folder) does what
was shown against the old SuperLink: it finds the port, speaks the Control API over HTTPS without
verifying the certificate, from 127.0.0.1 and 127.0.0.2, to list runs and nodes and register a key
of its own. Every connection must be closed before a byte of the request is read, and no key
registered; the coordinator's own ``flwr`` calls and unverified requests keep working. The same
with ``--insecure`` (HTTP). A federation over it is test_federation.py's business.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from flwr.proto.control_pb2 import ListNodesRequest, ListNodesResponse, ListRunsRequest, RegisterNodeRequest
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from common.processes import console_script, free_port
from server.deploy import Coordinator, TlsFiles
from server.security import make_certificates, make_site_key
from tests.other_user import Attempt, attempt, attempts_as_other_user, needs_root, other_uid


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    """A coordinator's run folder; whatever it starts is stopped after the test."""
    coordinator = Coordinator(tmp_path / "run")
    try:
        yield coordinator
    finally:
        coordinator.stop(recorded=False)


def flwr_json(coordinator: Coordinator, *args: str) -> dict[str, object]:
    """A ``flwr`` CLI command of the coordinator (its own FLWR_HOME and connection), JSON reply."""
    result = subprocess.run(
        [console_script("flwr"), *args, "--format", "json"],
        env=coordinator.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(json.loads(result.stdout[result.stdout.index("{") :]))


def register_request(public_key: Path) -> bytes:
    key = serialization.load_ssh_public_key(public_key.read_bytes())
    return RegisterNodeRequest(public_key=public_key_to_bytes(key), name="rogue").SerializeToString()  # type: ignore[arg-type]


@needs_root
@pytest.mark.timeout(600)
@pytest.mark.parametrize("transport", ["https", "http"])
def test_another_local_user_cannot_act_on_the_superlink_and_the_coordinator_can(
    coordinator: Coordinator, tmp_path: Path, transport: str
) -> None:
    # Prepare: the coordinator's SuperLink (TLS and site authentication, or --insecure), one site.
    tls = None
    if transport == "https":
        make_certificates(tmp_path / "certs", ["127.0.0.1", "localhost"])
        tls = TlsFiles.from_dir(tmp_path / "certs")
    site, rogue = make_site_key(tmp_path / "keys", "site-a"), make_site_key(tmp_path / "keys", "rogue")
    coordinator.start_superlink(port=free_port(), tls=tls)
    node_ids = [coordinator.register_site(site.public_key, "site-a")] if tls else []
    port = int(coordinator.read_state()["superlink_port"])
    https = tls is not None

    def control(source: str, call: str, body: bytes = b"") -> Attempt:
        return Attempt(source, "127.0.0.1", port, f"/v1/control/{call}", body, tls=https)

    # Execute: what another local account tried, from two loopback addresses.
    tried = [
        control("127.0.0.1", "list-runs", ListRunsRequest().SerializeToString()),
        control("127.0.0.2", "list-nodes", ListNodesRequest().SerializeToString()),
        control("127.0.0.1", "register-node", register_request(rogue.public_key)),
        control("127.0.0.2", "register-node", register_request(rogue.public_key)),
    ]
    outcomes = attempts_as_other_user(tried)

    # Assert: no answer at all, nothing registered, each refusal logged with the peer and its uid.
    assert [o["status"] for o in outcomes] == [None] * len(tried), outcomes
    nodes = flwr_json(coordinator, "supernode", "list")["nodes"]
    assert sorted(int(n["node-id"]) for n in nodes) == node_ids  # type: ignore[attr-defined]
    assert "runs" in flwr_json(coordinator, "ls")
    log = coordinator.superlink_log.read_text()
    for source in ("127.0.0.1", "127.0.0.2"):
        assert f"Refused a connection from {source}:" in log
    refused = [line for line in log.splitlines() if "Refused a connection" in line]
    by_other_user = [line for line in refused if f"(uid {other_uid()}): the peer's socket belongs" in line]
    assert len(by_other_user) == len(tried), refused
    if https:  # the coordinator's own clients (flwr, SuperExec, gateway) were never turned away
        assert refused == by_other_user

    # The coordinator's own unverified request from another loopback address is served: what
    # counts is whose socket it is, not the address or the certificate.
    mine = attempt(control("127.0.0.2", "list-nodes", ListNodesRequest().SerializeToString()))
    assert mine["status"] == 200, mine
    listed = ListNodesResponse.FromString(bytes.fromhex(mine["body"]))
    assert sorted(n.node_id for n in listed.nodes_info) == node_ids
