"""Act as another local account (``nobody``): what anyone with a shell on the coordinator's machine can do.

The attempt runs in a child forked from the test process that drops to ``nobody``'s uid and gids
first, so it needs no file of its own (``nobody`` may not even execute this venv's Python). The
child sends raw HTTP(S) requests with the standard library, the certificate unverified, from the
loopback address it is told, and hands back what it got as JSON. Tests using it need root (they
run as root in CI); :data:`needs_root` skips them elsewhere with the reason.
"""

from __future__ import annotations

import http.client
import json
import os
import pwd
import select
import signal
import socket
import ssl
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

OTHER_USER = "nobody"
CHILD_TIMEOUT = 120.0


def _other_user() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(OTHER_USER)
    except KeyError:
        return None


def other_uid() -> int:
    user = _other_user()
    assert user is not None
    return user.pw_uid


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or _other_user() is None,
    reason=f"acting as another local user ({OTHER_USER}) needs root and that account",
)


@dataclass(frozen=True)
class Attempt:
    """One HTTP request: where from, where to, what."""

    source: str
    host: str
    port: int
    path: str
    body: bytes = b""
    tls: bool = True
    close_after_send: bool = False
    """Send the request and close at once (the peer socket is gone before the server looks)."""


def attempt(request: Attempt) -> dict[str, Any]:
    """Send ``request`` (the certificate unverified); the status and body, or the error."""
    family = socket.AF_INET6 if ":" in request.host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.bind((request.source, 0))
        sock.connect((request.host, request.port))
        if request.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            sock = context.wrap_socket(sock)
        head = (
            f"POST {request.path} HTTP/1.1\r\nHost: {request.host}\r\n"
            f"Content-Type: application/protobuf\r\nContent-Length: {len(request.body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        sock.sendall(head.encode() + request.body)
        if request.close_after_send:
            sock.close()
            return {"status": None, "error": "closed after sending"}
        response = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
        response.begin()
        body = response.read()
        sock.close()
        return {"status": response.status, "body": body.hex(), "error": None}
    except (OSError, http.client.HTTPException) as exc:
        return {"status": None, "error": f"{type(exc).__name__}: {exc}"}


def as_other_user(work: Callable[[], Any]) -> Any:
    """``work()``'s JSON-able result, computed in a forked child running as ``nobody``."""
    user = _other_user()
    assert user is not None, "use @needs_root"
    assert os.geteuid() == 0, "use @needs_root"
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, work, report, leave without running any cleanup
        os.close(read_fd)
        try:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            payload = json.dumps({"result": work(), "uid": os.getuid()})
        except BaseException:
            payload = json.dumps({"crash": traceback.format_exc()})
        with os.fdopen(write_fd, "w") as out:
            out.write(payload)
        os._exit(0)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], CHILD_TIMEOUT)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"the child acting as {OTHER_USER} did not answer in {CHILD_TIMEOUT:.0f} s")
        with os.fdopen(read_fd) as answer:
            reply = json.loads(answer.read())
    finally:
        os.waitpid(pid, 0)
    assert "crash" not in reply, reply.get("crash")
    assert reply["uid"] == user.pw_uid
    return reply["result"]


def attempts_as_other_user(requests: list[Attempt]) -> list[dict[str, Any]]:
    """Each request's outcome, all sent by ``nobody``."""
    return list(as_other_user(lambda: [attempt(r) for r in requests]))
