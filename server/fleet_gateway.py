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
Flower's), except hop-by-hop and forwarding headers: a client's ``X-Forwarded-For``,
``Forwarded``, ``X-Real-IP`` and the like are dropped and the gateway sets ``X-Forwarded-For`` to
the real peer (the SuperLink trusts that header from loopback). Bodies are streamed both ways.

No credentials are needed to reach this address, so what a call may cost is bounded before it
reaches the SuperLink: a body larger than any Fleet call of a SuperNode carries
(:data:`DEFAULT_BODY_LIMIT`: Flower cuts a model into array chunks of at most 5 MiB) is answered
413 without being read when its ``Content-Length`` says so, and cut at the limit otherwise, never
buffered beyond it. Connections (how many, from whom, how long they may take to deliver a
request) are bounded by server/gateway_connections.py. Every refused or failed call (4xx or 5xx,
from the gateway or the SuperLink) gets one line in the log with the peer's real address, the
method, the path as sent (escaped: a line break in it cannot start a log line) and the status.

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
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flower_adapter.fleet_api import (
    FLEET_ROUTES,
    MAX_ARRAY_CHUNK_SIZE,
    PULL_MESSAGES,
    PULL_OBJECT,
    no_message_yet,
    object_not_ready,
)
from flower_adapter.grid import PollSchedule
from server.gateway_connections import (
    ConnectionLimits,
    GatewayConfig,
    connections_within_file_limit,
    escaped,
    format_peer,
    raise_open_file_limit,
)

logger = logging.getLogger("server.fleet_gateway")  # also when run with -m

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
# Who the peer is, as a client claims it: never passed on (the gateway says it itself).
FORWARDING = frozenset(
    {b"forwarded", b"x-real-ip", b"x-client-ip", b"true-client-ip", b"x-cluster-client-ip"}
)
FORWARDING_PREFIX = b"x-forwarded-"
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
UPSTREAM_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
UPSTREAM_CONNECTIONS = 64
"""Connections to the SuperLink at most (files kept apart from the sites' connections)."""
RECORD_ALLOWANCE = 1024 * 1024
"""Room above one array chunk for the rest of a SuperNode's largest call: the object's own header,
a reply's metrics and config records, a packed model's layout, a message's object tree."""
DEFAULT_BODY_LIMIT = MAX_ARRAY_CHUNK_SIZE + RECORD_ALLOWANCE
"""The largest request body forwarded (6 MiB): a SuperNode's largest call is a push-object of one
array chunk (Flower cuts arrays into chunks of ``MAX_ARRAY_CHUNK_SIZE``, 5 MiB)."""
REFUSED_TEXT = "not found: this address serves only the Flower Fleet API for sites\n"

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


def request_headers(raw: list[tuple[bytes, bytes]], peer_host: str) -> list[tuple[bytes, bytes]]:
    """A site's headers as sent to the SuperLink: no hop-by-hop or client-claimed forwarding
    header, and ``X-Forwarded-For`` set to the real peer."""
    kept = [
        (key, value)
        for key, value in _forwarded_headers(raw)
        if key.lower() not in FORWARDING and not key.lower().startswith(FORWARDING_PREFIX)
    ]
    return [*kept, (b"x-forwarded-for", peer_host.encode("ascii", "replace"))]


class BodyTooLargeError(Exception):
    """A request body went over the gateway's limit while it was being read."""


async def capped(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """``chunks`` passed on as they come, until more than ``limit`` bytes: then BodyTooLargeError."""
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > limit:
            raise BodyTooLargeError
        yield chunk


async def read_capped(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """A whole (small) body, never more than ``limit`` bytes of it in memory."""
    return b"".join([chunk async for chunk in capped(chunks, limit)])


def refusal(status: int, text: str, why: str) -> Response:
    """The gateway's own answer to a call it refuses; the connection is closed after it (the rest
    of a refused body is not read)."""
    response = PlainTextResponse(text, status_code=status, headers={"connection": "close"})
    response.why = why  # type: ignore[attr-defined]
    return response


HELD_CALLS: dict[str, tuple[float, Callable[[bytes], bool]]] = {
    PULL_MESSAGES: (PULL_MESSAGES_HOLD_SECONDS, no_message_yet),
    PULL_OBJECT: (PULL_OBJECT_HOLD_SECONDS, object_not_ready),
}
"""Calls answered only once there is something to answer: path -> (longest hold, still waiting?)."""


class FleetForwarder:
    """Forwards the Fleet API's calls to the SuperLink through one HTTP client; holds the calls
    that have nothing to answer yet (``held``: path -> (longest hold, still waiting?))."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        held: dict[str, tuple[float, Callable[[bytes], bool]]],
        schedule: PollSchedule,
        body_limit: int,
    ) -> None:
        self.client = client
        self.held = held
        self.schedule = schedule
        self.body_limit = body_limit
        self.too_large = f"request body over {body_limit} bytes, more than any Fleet call carries"

    async def forward(self, request: Request) -> Response:
        path = request.url.path
        if not allowed(request.method, path):
            return refusal(404, REFUSED_TEXT, "not a Fleet API call")
        length = request.headers.get("content-length")
        if length is not None and not length.isdigit():
            return refusal(400, "bad Content-Length\n", "bad Content-Length")
        if length is not None and int(length) > self.body_limit:
            return refusal(413, self.too_large + "\n", self.too_large)  # the body is never read
        headers = request_headers(request.headers.raw, request.client.host if request.client else "unknown")
        try:
            if path not in self.held:
                return await self.send_upstream(path, headers, capped(request.stream(), self.body_limit))
            body = await read_capped(request.stream(), self.body_limit)  # a small request: a node id
            return await self.hold(request, path, headers, body)
        except BodyTooLargeError:
            return refusal(413, self.too_large + "\n", self.too_large)
        except ClientDisconnect:
            return refusal(400, "request not received\n", "the client went away before its request was read")

    async def hold(
        self, request: Request, path: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Response:
        """Ask the SuperLink again (for up to the call's hold) while its answer is "nothing yet"."""
        longest, waiting = self.held[path]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + longest
        pauses = self.schedule.intervals()
        while True:
            response = await self.send_upstream(path, headers, body)
            if not isinstance(response, HeldReply) or not waiting(bytes(response.body)):
                return response
            pause = min(next(pauses), deadline - loop.time())
            if pause <= 0 or await request.is_disconnected():
                return response
            await asyncio.sleep(pause)

    async def send_upstream(self, path: str, headers: list[tuple[bytes, bytes]], content: Any) -> Response:
        """The SuperLink's answer: read whole when small and plain (a HeldReply), else streamed."""
        outgoing = self.client.build_request("POST", path, headers=headers, content=content)
        try:
            reply = await self.client.send(outgoing, stream=True)
        except httpx.HTTPError as exc:
            logger.error("SuperLink unreachable for %s: %s", path, exc)
            unreachable = PlainTextResponse("the SuperLink is not reachable\n", status_code=502)
            unreachable.why = "the SuperLink is not reachable"  # type: ignore[attr-defined]
            return unreachable
        raw_headers = _forwarded_headers(reply.headers.raw)
        size = reply.headers.get("content-length", "")
        if (
            path in self.held
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
        response.why = "answered so by the SuperLink"  # type: ignore[attr-defined]
        return response


def create_app(
    upstream: str,
    upstream_ca: Path | None,
    transport: httpx.AsyncBaseTransport | None = None,
    *,
    held_calls: dict[str, tuple[float, Callable[[bytes], bool]]] | None = None,
    schedule: PollSchedule = HOLD_SCHEDULE,
    body_limit: int = DEFAULT_BODY_LIMIT,
) -> ASGIApp:
    """The gateway's ASGI app, forwarding allowed calls to ``upstream`` (``https://127.0.0.1:PORT``).

    ``upstream_ca`` verifies the SuperLink's certificate (None: plain HTTP upstream, --insecure);
    ``transport`` replaces the network in tests; ``held_calls`` (default :data:`HELD_CALLS`) and
    ``schedule`` say which empty answers are held, how long, and how often the SuperLink is asked;
    ``body_limit`` is the largest request body forwarded. Refused and failed calls are logged
    (:class:`FailureLog`).
    """
    if body_limit < 1:
        raise ValueError(f"body_limit must be at least 1 byte, got {body_limit!r}")
    verify: ssl.SSLContext | bool = False
    if upstream_ca is not None:
        verify = ssl.create_default_context(cafile=str(upstream_ca))
    client = httpx.AsyncClient(
        base_url=upstream,
        verify=verify,
        timeout=UPSTREAM_TIMEOUT,
        transport=transport,
        limits=httpx.Limits(max_connections=UPSTREAM_CONNECTIONS),
    )
    forwarder = FleetForwarder(client, HELD_CALLS if held_calls is None else held_calls, schedule, body_limit)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await client.aclose()

    async def endpoint(request: Request) -> Response:
        response = await forwarder.forward(request)
        request.scope[FAILURE_NOTE]["why"] = getattr(response, "why", "")
        return response

    app = Starlette(routes=[Route("/{path:path}", endpoint, methods=ALL_METHODS)], lifespan=lifespan)
    return FailureLog(app)


FAILURE_NOTE = "cxr_fl.gateway_note"
"""Scope key of the dict in which a call's handler says why it answered so (for the log line)."""


class FailureLog:
    """ASGI middleware: one log line for every call answered 4xx or 5xx, or failing before it
    is answered, whoever refused it (the gateway's routing, its handler, or the SuperLink).

    The line has the real peer (the connection's, never a header's), the method, the path as
    sent (:func:`escaped`: no control character or line break reaches the log) and the status.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        note: dict[str, str] = {}
        scope[FAILURE_NOTE] = note
        status: list[int] = []

        async def noting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        except Exception:
            self.log(scope, status[0] if status else 500, "the gateway failed")
            raise
        if not status:
            self.log(scope, 0, "no answer")
        elif status[0] >= 400:
            self.log(scope, status[0], note.get("why") or default_reason(status[0]))

    @staticmethod
    def log(scope: Scope, status: int, why: str) -> None:
        peer = scope.get("client")
        path = escaped(scope.get("raw_path") or scope.get("path", "").encode("utf-8", "replace"))
        if scope.get("query_string"):
            path += "?" + escaped(scope["query_string"])
        verb = "Failed" if status >= 500 or status == 0 else "Refused"
        logger.warning(
            "%s %s %s from %s: %s (%s)",
            verb,
            escaped(str(scope.get("method", "?")).encode("ascii", "replace")),
            path,
            format_peer(tuple(peer) if peer else None),  # type: ignore[arg-type]
            status or "-",
            why,
        )


def default_reason(status: int) -> str:
    return "not a Fleet API call" if status in (404, 405) else "refused by the gateway"


class HeldReply(Response):
    """A small, whole answer of the SuperLink, passed on with its own headers."""

    def __init__(self, body: bytes, status_code: int, raw_headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(content=body, status_code=status_code)
        self.raw_headers = raw_headers


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded call otherwise
    if (args.certfile is None) != (args.keyfile is None):
        parser.error("--certfile and --keyfile go together")
    open_files = raise_open_file_limit()
    max_connections = connections_within_file_limit(args.max_connections, open_files)
    try:
        limits = ConnectionLimits(
            header_timeout=args.header_timeout,
            body_timeout=args.body_timeout,
            keep_alive_timeout=args.keep_alive_timeout,
            max_header_bytes=args.max_header_bytes,
            max_requests_per_connection=args.max_requests_per_connection,
            max_connections=max_connections,
            max_connections_per_peer=args.max_connections_per_peer,
        )
        app = create_app(args.upstream, args.upstream_ca, body_limit=args.body_limit)
    except ValueError as exc:
        parser.error(f"{exc} (open file limit {open_files}: lower --max-connections-per-peer or raise it)")
    tls = None
    if args.certfile is not None:
        tls = uvicorn.config.create_ssl_context(
            certfile=args.certfile,
            keyfile=args.keyfile,
            password=None,
            ssl_version=uvicorn.config.SSL_PROTOCOL_VERSION,
            cert_reqs=ssl.CERT_NONE,
            ca_certs=None,
            ciphers=None,
        )
    logger.info(
        "Sites connect to %s://%s:%d (TLS ends here; uvicorn listens on the plain socket). Limits: "
        "bodies up to %d bytes; %d connections (%d per address, open file limit %d); "
        "headers within %g s, bodies within %g s, keep-alive %d s",
        "https" if tls else "http",
        args.host,
        args.port,
        args.body_limit,
        limits.max_connections,
        limits.max_connections_per_peer,
        open_files,
        limits.header_timeout,
        limits.body_timeout,
        limits.keep_alive_timeout,
    )
    config = GatewayConfig(
        app,
        limits=limits,
        tls=tls,
        host=args.host,
        port=args.port,
        access_log=False,  # refused and failed calls are logged by FailureLog
        log_level="info",
        workers=1,
        # A held pull would otherwise keep a stopping gateway up for its whole hold.
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    uvicorn.Server(config).run()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", required=True, help="Interface the sites connect to.")
    parser.add_argument("--port", type=int, required=True, help="Port the sites connect to.")
    parser.add_argument(
        "--upstream", required=True, help="The loopback SuperLink, e.g. https://127.0.0.1:PORT"
    )
    parser.add_argument("--upstream-ca", type=Path, help="CA certificate of the loopback SuperLink.")
    parser.add_argument("--certfile", type=Path, help="Server certificate for the sites (TLS).")
    parser.add_argument("--keyfile", type=Path, help="Its private key.")
    defaults = ConnectionLimits()
    limits = parser.add_argument_group("limits (what one caller can make the coordinator hold)")
    limits.add_argument(
        "--body-limit", type=int, default=DEFAULT_BODY_LIMIT, help="Largest request body in bytes (413)."
    )
    limits.add_argument(
        "--header-timeout",
        type=float,
        default=defaults.header_timeout,
        help="Seconds a connection has to deliver a request's headers (TLS handshake included).",
    )
    limits.add_argument(
        "--body-timeout", type=float, default=defaults.body_timeout, help="Seconds to deliver a request body."
    )
    limits.add_argument(
        "--keep-alive-timeout",
        type=int,
        default=defaults.keep_alive_timeout,
        help="Seconds an idle connection is kept open.",
    )
    limits.add_argument("--max-header-bytes", type=int, default=defaults.max_header_bytes)
    limits.add_argument(
        "--max-requests-per-connection", type=int, default=defaults.max_requests_per_connection
    )
    limits.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        help="Open connections at most (lowered to fit the open file limit).",
    )
    limits.add_argument(
        "--max-connections-per-peer",
        type=int,
        default=defaults.max_connections_per_peer,
        help="Open connections at most from one address (an IPv6 /64 counts as one).",
    )
    return parser


if __name__ == "__main__":
    main()
