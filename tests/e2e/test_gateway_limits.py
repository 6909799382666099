"""Whoever reaches the sites' address cannot take the coordinator down, and is logged.

Scaled down from the attacks of issue 24: while two sites train over TLS (real `cxr-fl-server`
and `cxr-fl-client` processes, as in test_federation.py), an anonymous peer sends request
bodies far over the gateway's limit (one announced as 1 GiB, one of unknown length) and a few
hundred clients from 127.0.0.2 open connections that never deliver a request (some never start
TLS, some stop in the middle of their headers). The gateway's and the SuperLink's peak memory
must stay far below the bytes sent, every slow client must be cut off by the server, every
refusal must be in gateway.log with the real peer, and the federation must finish. The
gateway runs with short timeouts (CXR_FL_GATEWAY_OPTIONS) so that the test is quick; no wait
here is timed, each has only a generous upper bound.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path

import pytest

from tests.e2e.harness import Federation

SLOW_CLIENTS = 300
SLOW_TLS_CLIENTS = 20
SENT_BYTES = 256 * 1024 * 1024
"""Bytes an attacker tries to send in each oversized body (the gateway's limit is 6 MiB)."""
MEMORY_ALLOWANCE = 64 * 1024 * 1024
"""How much a process's peak memory may grow while being sent 2 x SENT_BYTES."""
GUARD = 180.0


def peak_memory(pid: int) -> int:
    """A process's peak resident memory (VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for PID {pid}")


def tls_context(federation: Federation) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(federation.certs / "ca.crt"))


def connect(port: int, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=GUARD, source_address=(source, 0))
    return sock


def oversized_post(federation: Federation, path: str, *, announce: bool) -> bytes:
    """POST up to SENT_BYTES to ``path`` from 127.0.0.3 (announced as 1 GiB, or chunked).

    Returns the gateway's answer to an announced body, read before any of the body is sent
    (b"" if none came); the answer to a chunked one may be lost when the gateway cuts it off.
    """
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/protobuf\r\n"
    head += "Content-Length: 1073741824\r\n\r\n" if announce else "Transfer-Encoding: chunked\r\n\r\n"
    piece = b"\0" * (1024 * 1024)
    chunk = piece if announce else b"%x\r\n" % len(piece) + piece + b"\r\n"
    answer = b""
    with tls_context(federation).wrap_socket(
        connect(federation.port, "127.0.0.3"), server_hostname="127.0.0.1"
    ) as sock:
        sock.sendall(head.encode())
        if announce:
            sock.settimeout(30)  # refused at once, or (before the fix) read until the end
            try:
                answer = sock.recv(4096)
            except TimeoutError:
                answer = b""
            sock.settimeout(GUARD)
        try:
            for _ in range(SENT_BYTES // len(piece)):
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the gateway closed the connection: what it should do
    return answer


def open_slow_clients(federation: Federation) -> list[socket.socket]:
    """Connections from 127.0.0.2 that never deliver a request."""
    slow: list[socket.socket] = []
    context = tls_context(federation)
    for _ in range(SLOW_TLS_CLIENTS):  # TLS done, headers begun and never finished
        sock = context.wrap_socket(connect(federation.port, "127.0.0.2"), server_hostname="127.0.0.1")
        sock.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        slow.append(sock)
    for _ in range(SLOW_CLIENTS - SLOW_TLS_CLIENTS):  # TCP only: TLS never started
        slow.append(connect(federation.port, "127.0.0.2"))
    return slow


def closed_by_server(sock: socket.socket, deadline: float) -> bool:
    """Read until the server closes the connection (True) or the deadline passes (False)."""
    try:
        while True:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, ssl.SSLError, OSError) as exc:
        return not isinstance(exc, TimeoutError)


@pytest.mark.timeout(1800)
def test_the_coordinator_stays_up_under_oversized_bodies_and_slow_clients(federation: Federation) -> None:
    # Prepare: a two-site federation with a gateway of short timeouts.
    federation.env["CXR_FL_GATEWAY_OPTIONS"] = "--header-timeout 5 --body-timeout 20"
    federation.prepare("site-a", "site-b")
    config = federation.write_config("num-rounds = 2\nkd-enabled = false\n")
    server = federation.start_server("--config", str(config))
    federation.wait_listening()
    state = json.loads((federation.run_dir / "deploy.json").read_text())
    gateway, superlink = int(state["gateway_pid"]), int(state["superlink_pid"])
    clients = [federation.start_client(site) for site in ("site-a", "site-b")]
    before = {pid: peak_memory(pid) for pid in (gateway, superlink)}

    # Execute: the attacks, while the sites join and train.
    slow = open_slow_clients(federation)
    announced = oversized_post(federation, "/v1/fleet/pull-messages", announce=True)
    oversized_post(federation, "/v1/fleet/push-object", announce=False)  # streamed to the SuperLink
    oversized_post(federation, "/v1/fleet/pull-messages", announce=False)  # read by the gateway
    after = {pid: peak_memory(pid) for pid in (gateway, superlink)}
    deadline = time.monotonic() + GUARD
    still_open = sum(not closed_by_server(sock, deadline) for sock in slow)
    for sock in slow:
        sock.close()

    # Assert: memory flat, slow clients cut off, refusals logged with the peer, the run finished.
    grown = {
        name: (after[pid] - before[pid]) / 2**20
        for pid, name in ((gateway, "gateway"), (superlink, "SuperLink"))
    }
    print(f"peak memory growth under attack (MiB): {grown}")  # shown with pytest -s
    assert max(grown.values()) < MEMORY_ALLOWANCE / 2**20, f"peak memory grew (MiB): {grown}"
    assert still_open == 0, f"{still_open} of {len(slow)} slow clients still connected"
    assert announced.startswith(b"HTTP/1.1 413")
    assert federation.wait(server, "server", 1200) == 0, federation.output("server")
    aggregates = [r for r in federation.metrics() if r["phase"] == "aggregate"]
    assert [r["round"] for r in aggregates] == [1, 2]
    assert all(r["sites_trained"] == 2 for r in aggregates)
    assert all(client.poll() is None or client.returncode == 0 for client in clients)
    log = (federation.run_dir / "gateway.log").read_text()
    refused = [line for line in log.splitlines() if "from 127.0.0.3:" in line and ": 413 (" in line]
    assert len(refused) == 3, refused  # each oversized body, with the real peer and the status
    assert "Cut off 127.0.0.2:" in log
    assert "Refused a connection from 127.0.0.2:" in log
