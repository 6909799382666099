"""The address sites connect to: a reverse proxy that forwards only Flower's Fleet API.

Flower 1.42's SuperLink serves the Fleet API (``/v1/fleet/...``, what SuperNodes call), the
Control API (``/v1/control/...``: submit, list and stop runs, register site keys) and the
runtime API (``/v1/runtime/...``: what ServerApps call) from one FastAPI app on one
``--host/--port``, and the open-source build has no Control API authentication. Whoever reaches
that port with the CA certificate (every site holds it) could drive the federation.

So ``cxr-fl-server start`` binds the SuperLink to 127.0.0.1 on a private port (TLS with a CA of
the run folder's own, which no site holds) and puts this gateway on the public ``--host/--port``.
The gateway terminates TLS with the federation's server certificate and forwards exactly the
Fleet calls a SuperNode makes (``POST`` to the twelve paths of :data:`FLEET_ROUTES`, taken from
``flwr/supernode/fleet_http_client.py``); every other method or path is answered 404 here and
never reaches the SuperLink. Headers go through unchanged (SuperNode authentication signs a
timestamp carried in them, and the SuperLink checks the signature, so site authentication stays
Flower's), and bodies are streamed both ways (a model is tens of MB per message).

Run as its own process (``python -m server.fleet_gateway ...``) so that it is started, recorded
and stopped by PID like the SuperLink.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from flwr.proto.fleet_pb2 import PullMessagesResponse  # pylint: disable=E0611
from flwr.proto.message_pb2 import PullObjectResponse  # pylint: disable=E0611
from google.protobuf.message import DecodeError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from server.grid import PollSchedule

logger = logging.getLogger("server.fleet_gateway")  # also when run with -m

FLEET_ROUTES = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
"""Every path a SuperNode calls (all POST). Nothing else is forwarded."""

# Hop-by-hop headers (RFC 9110 7.6.1) and Host belong to one connection, not to the request.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
    }
)
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
UPSTREAM_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
REFUSED_TEXT = "not found: this address serves only the Flower Fleet API for sites\n"

PULL_MESSAGES = "/v1/fleet/pull-messages"
PULL_OBJECT = "/v1/fleet/pull-object"
PULL_MESSAGES_HOLD_SECONDS = 15.0
"""How long a site's empty pull-messages is held (its HTTP client waits 30 s for an answer)."""
PULL_OBJECT_HOLD_SECONDS = 10.0
"""How long a pull-object for an object still being uploaded is held."""
HOLD_SCHEDULE = PollSchedule(first=0.05, growth=1.25, longest=0.5)
"""Pauses between two asks while holding: 50 ms at first (the next round's message usually comes
within a second of the last reply), then at most two asks a second per waiting site."""
GRACEFUL_SHUTDOWN_SECONDS = 1
"""How long a stopping gateway lets open calls finish (held ones are then cut: the site asks again)."""
HELD_REPLY_LIMIT = 4096
"""A reply larger than this (an object's content) is streamed through, never held or parsed."""


def allowed(method: str, path: str) -> bool:
    """Is this a Fleet API call that a SuperNode makes?"""
    return method == "POST" and path in FLEET_ROUTES


def _forwarded_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(key, value) for key, value in raw if key.lower() not in HOP_BY_HOP]


def no_message_yet(content: bytes) -> bool:
    """Is this pull-messages answer an empty one (no message, no reconnect instruction)?"""
    try:
        reply = PullMessagesResponse.FromString(content)
    except DecodeError:
        return False
    return not reply.messages_list and not reply.HasField("reconnect")


def object_not_ready(content: bytes) -> bool:
    """Is this pull-object answer "found, but still being uploaded"?"""
    try:
        reply = PullObjectResponse.FromString(content)
    except DecodeError:
        return False
    return reply.object_found and not reply.object_available


HELD_CALLS: dict[str, tuple[float, Callable[[bytes], bool]]] = {
    PULL_MESSAGES: (PULL_MESSAGES_HOLD_SECONDS, no_message_yet),
    PULL_OBJECT: (PULL_OBJECT_HOLD_SECONDS, object_not_ready),
}
"""Calls answered only once there is something to answer: path -> (longest hold, still waiting?)."""


def create_app(
    upstream: str,
    upstream_ca: Path | None,
    transport: httpx.AsyncBaseTransport | None = None,
    *,
    held_calls: dict[str, tuple[float, Callable[[bytes], bool]]] | None = None,
    schedule: PollSchedule = HOLD_SCHEDULE,
) -> Starlette:
    """The gateway's ASGI app, forwarding allowed calls to ``upstream`` (``https://127.0.0.1:PORT``).

    ``upstream_ca`` verifies the SuperLink's certificate (None: plain HTTP upstream, --insecure);
    ``transport`` replaces the network in tests; ``held_calls`` (default :data:`HELD_CALLS`) and
    ``schedule`` say which empty answers are held, how long, and how often the SuperLink is asked.
    """
    held = HELD_CALLS if held_calls is None else held_calls
    verify: ssl.SSLContext | bool = False
    if upstream_ca is not None:
        verify = ssl.create_default_context(cafile=str(upstream_ca))
    client = httpx.AsyncClient(
        base_url=upstream, verify=verify, timeout=UPSTREAM_TIMEOUT, transport=transport
    )

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not allowed(request.method, path):
            peer = request.client.host if request.client else "?"
            logger.warning("Refused %s %s from %s (not a Fleet API call)", request.method, path, peer)
            return PlainTextResponse(REFUSED_TEXT, status_code=404)
        headers = _forwarded_headers(request.headers.raw)
        if path not in held:
            return await send_upstream(path, headers, request.stream())
        longest, waiting = held[path]
        body = await request.body()  # a small request: a node id, an object id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + longest
        pauses = schedule.intervals()
        while True:
            response = await send_upstream(path, headers, body)
            if not isinstance(response, HeldReply) or not waiting(response.body):
                return response
            pause = min(next(pauses), deadline - loop.time())
            if pause <= 0 or await request.is_disconnected():
                return response
            await asyncio.sleep(pause)

    async def send_upstream(path: str, headers: list[tuple[bytes, bytes]], content: Any) -> Response:
        """The SuperLink's answer: read whole when small and plain (a HeldReply), else streamed."""
        outgoing = client.build_request("POST", path, headers=headers, content=content)
        try:
            reply = await client.send(outgoing, stream=True)
        except httpx.HTTPError as exc:
            logger.error("SuperLink unreachable for %s: %s", path, exc)
            return PlainTextResponse("the SuperLink is not reachable\n", status_code=502)
        raw_headers = _forwarded_headers(reply.headers.raw)
        size = reply.headers.get("content-length", "")
        if (
            path in held
            and reply.status_code == 200
            and size.isdigit()
            and int(size) <= HELD_REPLY_LIMIT
            and "content-encoding" not in reply.headers
        ):
            try:
                body = await reply.aread()  # not encoded (checked above): the bytes as sent
            finally:
                await reply.aclose()
            return HeldReply(body, reply.status_code, raw_headers)
        response = StreamingResponse(
            reply.aiter_raw(), status_code=reply.status_code, background=BackgroundTask(reply.aclose)
        )
        response.raw_headers = raw_headers
        return response

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await client.aclose()

    return Starlette(routes=[Route("/{path:path}", forward, methods=ALL_METHODS)], lifespan=lifespan)


class HeldReply(Response):
    """A small, whole answer of the SuperLink, passed on with its own headers."""

    def __init__(self, body: bytes, status_code: int, raw_headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(content=body, status_code=status_code)
        self.raw_headers = raw_headers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", required=True, help="Interface the sites connect to.")
    parser.add_argument("--port", type=int, required=True, help="Port the sites connect to.")
    parser.add_argument(
        "--upstream", required=True, help="The loopback SuperLink, e.g. https://127.0.0.1:PORT"
    )
    parser.add_argument("--upstream-ca", type=Path, help="CA certificate of the loopback SuperLink.")
    parser.add_argument("--certfile", type=Path, help="Server certificate for the sites (TLS).")
    parser.add_argument("--keyfile", type=Path, help="Its private key.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded call otherwise
    if (args.certfile is None) != (args.keyfile is None):
        parser.error("--certfile and --keyfile go together")
    uvicorn.run(
        create_app(args.upstream, args.upstream_ca),
        host=args.host,
        port=args.port,
        ssl_certfile=str(args.certfile) if args.certfile else None,
        ssl_keyfile=str(args.keyfile) if args.keyfile else None,
        access_log=False,
        log_level="info",
        workers=1,
        # A held pull would otherwise keep a stopping gateway up for its whole hold.
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )


if __name__ == "__main__":
    main()
