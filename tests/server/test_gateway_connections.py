"""The gateway's connections are bounded: slow headers and bodies are cut off, and no address can
hold more than its share of connections; each cut-off is logged with the real peer.

A real gateway server (uvicorn with :class:`GatewayConfig`) runs in a thread on loopback with
short timeouts; clients are raw sockets, some from 127.0.0.2. Waits have generous upper bounds
(a test fails if a socket is still open after them) but nothing is timed.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn

from server.gateway_connections import (
    ConnectionLimits,
    GatewayConfig,
    connections_within_file_limit,
    escaped,
    peer_key,
)

GUARD = 60.0
"""Upper bound on any wait here: a socket still open after it is a failure, not a slow pass."""


async def echo_length(scope: dict[str, object], receive: object, send: object) -> None:
    """A tiny ASGI app: reads the whole body and answers its length."""
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()  # type: ignore[operator]
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = str(size).encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": body})  # type: ignore[operator]


@contextmanager
def serving(limits: ConnectionLimits, tls: ssl.SSLContext | None = None) -> Iterator[int]:
    """A gateway server on 127.0.0.1 in a thread; yields its port."""
    config = GatewayConfig(
        echo_length, limits=limits, tls=tls, host="127.0.0.1", port=0, lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + GUARD
    while not server.started:
        assert thread.is_alive(), "the gateway did not start"
        assert time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(GUARD)


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.settimeout(GUARD)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Read until the server closes the connection (True), or GUARD passes (False)."""
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def read_response(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """One whole response (head and Content-Length body) from the server."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def still_open(sock: socket.socket, wait: float = 0.5) -> bool:
    """Is the connection open after ``wait`` seconds of silence (or did the server say something)?"""
    sock.settimeout(wait)
    try:
        data = sock.recv(1)
    except TimeoutError:
        return True
    except ConnectionResetError:
        return False
    finally:
        sock.settimeout(GUARD)
    return data != b""


def gateway_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "server.fleet_gateway"]


def test_a_complete_request_is_served() -> None:
    with serving(ConnectionLimits(header_timeout=5, body_timeout=5)) as port:
        sock = connect(port)
        sock.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        sock.close()


def test_headers_that_never_complete_are_cut_off(caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.INFO, logger="server.fleet_gateway"),
        serving(ConnectionLimits(header_timeout=2, body_timeout=600)) as port,
    ):
        silent = connect(port, "127.0.0.2")
        partial = connect(port, "127.0.0.2")
        partial.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert closed_by_server(silent)
        assert closed_by_server(partial)
    lines = gateway_lines(caplog)
    assert sum("Cut off 127.0.0.2:" in line and "no complete request headers" in line for line in lines) == 2


def test_a_body_that_never_completes_is_cut_off(caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.INFO, logger="server.fleet_gateway"),
        serving(ConnectionLimits(header_timeout=6000, body_timeout=0.5)) as port,
    ):
        sock = connect(port, "127.0.0.2")
        sock.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nab")
        assert closed_by_server(sock)
    (line,) = gateway_lines(caplog)
    assert line.startswith("Cut off 127.0.0.2:")
    assert "POST /v1/fleet/push-object" in line
    assert "request body not received" in line


def test_a_later_request_on_a_kept_alive_connection_must_also_complete_its_headers() -> None:
    with serving(ConnectionLimits(header_timeout=2, body_timeout=600, keep_alive_timeout=600)) as port:
        sock = connect(port)
        sock.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\n")  # and no more
        assert closed_by_server(sock)


def test_endless_headers_are_cut_off_at_the_header_limit() -> None:
    with serving(ConnectionLimits(header_timeout=6000, max_header_bytes=4096)) as port:
        sock = connect(port)
        sock.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(100):
                sock.sendall(b"X-Filler: " + b"a" * 1000 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while sending: what the test wants
        assert closed_by_server(sock)


def test_a_connection_over_the_per_address_limit_is_closed_at_once(caplog: pytest.LogCaptureFixture) -> None:
    limits = ConnectionLimits(header_timeout=6000, max_connections=20, max_connections_per_peer=3)
    with caplog.at_level(logging.INFO, logger="server.fleet_gateway"), serving(limits) as port:
        held = [connect(port, "127.0.0.2") for _ in range(3)]
        assert all(still_open(sock) for sock in held)
        extra = connect(port, "127.0.0.2")
        assert closed_by_server(extra)  # long before the 60 s header timeout
        other = connect(port, "127.0.0.1")  # another address still gets in
        other.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na")
        assert read_response(other).startswith(b"HTTP/1.1 200")
        for sock in [*held, other]:
            sock.close()
    refused = [
        line for line in gateway_lines(caplog) if line.startswith("Refused a connection from 127.0.0.2:")
    ]
    assert refused
    assert "3 connections open from 127.0.0.2" in refused[0]


def test_refusals_within_a_second_are_summed_up_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    limits = ConnectionLimits(header_timeout=6000, max_connections=20, max_connections_per_peer=1)
    with caplog.at_level(logging.INFO, logger="server.fleet_gateway"), serving(limits) as port:
        held = connect(port, "127.0.0.2")
        assert still_open(held)
        refused = [connect(port, "127.0.0.2") for _ in range(50)]
        assert all(closed_by_server(sock) for sock in refused)
        deadline = time.monotonic() + GUARD
        while refusals_logged(gateway_lines(caplog)) < 50:  # the last ones are summed up a second later
            assert time.monotonic() < deadline, gateway_lines(caplog)
            time.sleep(0.1)
        for sock in [held, *refused]:
            sock.close()
    lines = gateway_lines(caplog)
    assert refusals_logged(lines) == 50
    assert sum(line.startswith("Refused a connection") for line in lines) < 50  # not one line each


def refusals_logged(lines: list[str]) -> int:
    """Refused connections from 127.0.0.2 that the log accounts for (one by one or summed up)."""
    lines = [line for line in lines if "127.0.0.2" in line]
    counted = sum(int(line.split()[1]) for line in lines if "more connections over a limit" in line)
    return sum(line.startswith("Refused a connection") for line in lines) + counted


def test_a_connection_over_the_total_limit_is_closed_at_once() -> None:
    limits = ConnectionLimits(header_timeout=6000, max_connections=4, max_connections_per_peer=2)
    with serving(limits) as port:
        held = [connect(port, f"127.0.0.{n}") for n in (2, 2, 3, 3)]
        extra = connect(port, "127.0.0.4")
        assert closed_by_server(extra)
        held[0].close()
        for _ in range(int(GUARD / 0.1)):  # the freed slot is taken by a newcomer
            newcomer = connect(port, "127.0.0.4")
            if still_open(newcomer, 0.1):
                break
            newcomer.close()
        else:
            pytest.fail("no connection admitted after one was closed")
        for sock in [*held, newcomer]:
            sock.close()


def test_a_tls_handshake_that_never_starts_is_cut_off(tmp_path: Path) -> None:
    from server.security import make_certificates

    files = make_certificates(tmp_path, ["127.0.0.1"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.server_cert, files.server_key)
    with serving(ConnectionLimits(header_timeout=3), tls=context) as port:
        silent = connect(port, "127.0.0.2")
        assert closed_by_server(silent)
        client_context = ssl.create_default_context(cafile=str(files.ca_cert))
        with client_context.wrap_socket(connect(port), server_hostname="127.0.0.1") as tls:
            tls.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na")
            assert read_response(tls).startswith(b"HTTP/1.1 200")


def test_limits_stay_below_the_open_file_limit() -> None:
    assert connections_within_file_limit(1000, 20000) == 1000
    assert connections_within_file_limit(1000, 1024) == 1024 - 128
    assert connections_within_file_limit(1000, 100) == 0


def test_peers_are_counted_by_address_and_ipv6_by_64_prefix() -> None:
    assert peer_key("127.0.0.2") == "127.0.0.2"
    assert peer_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert peer_key("2001:db8:1:2:aaaa::1") == peer_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"


def test_logged_paths_cannot_break_a_line() -> None:
    assert escaped(b"/v1/fleet/x\r\n2026 INFO forged") == "/v1/fleet/x%0D%0A2026%20INFO%20forged"
    assert escaped(b"/" + b"a" * 500).endswith("... (501 bytes)")


@pytest.mark.parametrize(
    "changes",
    [{"header_timeout": 0}, {"body_timeout": -1}, {"max_connections": 0}, {"max_connections_per_peer": 2000}],
)
def test_limits_that_make_no_sense_are_refused(changes: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(changes))):
        ConnectionLimits(**changes)  # type: ignore[arg-type]


def test_a_connection_is_closed_after_its_most_requests() -> None:
    with serving(ConnectionLimits(keep_alive_timeout=600, max_requests_per_connection=2)) as port:
        sock = connect(port)
        answers = []
        for _ in range(2):
            sock.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na")
            answers.append(read_response(sock))
        assert all(answer.startswith(b"HTTP/1.1 200") for answer in answers)
        assert b"connection: close" not in answers[0]
        assert b"connection: close" in answers[1]  # the client knows not to reuse it
        assert closed_by_server(sock)


def test_a_request_sent_with_the_end_of_the_tls_handshake_is_served(tmp_path: Path) -> None:
    """TLS 1.3: a client's first request can arrive in the same read as its Finished message,
    before the gateway has set up the connection's HTTP side; it must be served, not lost."""
    from server.security import make_certificates

    files = make_certificates(tmp_path, ["127.0.0.1"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.server_cert, files.server_key)
    client_context = ssl.create_default_context(cafile=str(files.ca_cert))
    request = b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na"
    with serving(ConnectionLimits(), tls=context) as port:
        for _ in range(20):
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = client_context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
            with connect(port) as sock:
                while True:  # the handshake, by hand: the request leaves with the last flight
                    try:
                        tls.do_handshake()
                        break
                    except ssl.SSLWantReadError:
                        sock.sendall(outgoing.read())
                        incoming.write(sock.recv(65536))
                tls.write(request)
                sock.sendall(outgoing.read())  # Finished and the request in one segment
                answer = b""
                while b"\r\n\r\n" not in answer:
                    try:
                        answer += tls.read(4096)
                    except ssl.SSLWantReadError:
                        data = sock.recv(65536)
                        assert data, "the gateway closed the connection without an answer"
                        incoming.write(data)
                assert answer.startswith(b"HTTP/1.1 200")
