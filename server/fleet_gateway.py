"""The address sites connect to: a reverse proxy that forwards only Flower's Fleet API.

Flower 1.41's SuperLink serves the Fleet API (``/v1/fleet/...``, what SuperNodes call), the
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
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

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


def allowed(method: str, path: str) -> bool:
    """Is this a Fleet API call that a SuperNode makes?"""
    return method == "POST" and path in FLEET_ROUTES


def _forwarded_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(key, value) for key, value in raw if key.lower() not in HOP_BY_HOP]


def create_app(
    upstream: str, upstream_ca: Path | None, transport: httpx.AsyncBaseTransport | None = None
) -> Starlette:
    """The gateway's ASGI app, forwarding allowed calls to ``upstream`` (``https://127.0.0.1:PORT``).

    ``upstream_ca`` verifies the SuperLink's certificate (None: plain HTTP upstream, --insecure);
    ``transport`` replaces the network in tests.
    """
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
        outgoing = client.build_request(
            "POST",
            path,
            headers=_forwarded_headers(request.headers.raw),
            content=request.stream(),
        )
        try:
            reply = await client.send(outgoing, stream=True)
        except httpx.HTTPError as exc:
            logger.error("SuperLink unreachable for %s: %s", path, exc)
            return PlainTextResponse("the SuperLink is not reachable\n", status_code=502)
        response = StreamingResponse(
            reply.aiter_raw(), status_code=reply.status_code, background=BackgroundTask(reply.aclose)
        )
        response.raw_headers = _forwarded_headers(reply.headers.raw)
        return response

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await client.aclose()

    return Starlette(routes=[Route("/{path:path}", forward, methods=ALL_METHODS)], lifespan=lifespan)


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
    )


if __name__ == "__main__":
    main()
