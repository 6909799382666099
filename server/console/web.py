"""The console's web app and its server: read only, on 127.0.0.1 only, behind a random token.

Who may look: whoever holds the token, a random 256-bit value made in this process and printed
to its owner's terminal (never put in a process's arguments or a file). Opening
``http://127.0.0.1:PORT/?token=T`` sets a cookie (HttpOnly, SameSite=Strict) and redirects to the
page without the token in the address bar; ``/metrics`` also takes ``Authorization: Bearer T``
(a Prometheus ``credentials_file``). Anything else is answered 401 without a hint of the run.

Where: the socket is bound to 127.0.0.1 (another machine reaches it only through an SSH tunnel,
docs/console.md), never to the sites' address, and a request whose ``Host`` is not a loopback name
is refused (a web page elsewhere cannot reach it by DNS rebinding). Only GET and HEAD are
served; every answer forbids caching, framing, inline scripts and foreign origins.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from common.errors import ConfigError
from server.console.assets import SCRIPT, STYLE
from server.console.page import live, page
from server.console.prometheus import CONTENT_TYPE, metrics_text
from server.console.run_state import RunReader

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})
COOKIE_PREFIX = "cxr_fl_console_"
UNAUTHORISED = "open the console with the address cxr-fl-server printed (it carries the token)\n"
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
STOP_SECONDS = 5.0


def new_token() -> str:
    return secrets.token_urlsafe(32)


def loopback_host(host_header: str) -> bool:
    """Is a ``Host`` header a loopback name (any port: an SSH tunnel may use another one)?"""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] in LOOPBACK_NAMES
    return host.rsplit(":", 1)[0] in LOOPBACK_NAMES


def create_app(reader: RunReader, token: str) -> Starlette:
    """The console of ``reader``'s run folder, for holders of ``token``."""
    cookie = COOKIE_PREFIX + hashlib.sha256(token.encode()).hexdigest()[:12]
    expected = token.encode()

    def authorised(request: Request) -> bool:
        offered = [request.cookies.get(cookie, ""), request.query_params.get("token", "")]
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            offered.append(credentials.strip())
        return any(secrets.compare_digest(o.encode(), expected) for o in offered if o)

    def guarded(handler: Callable[[Request], Response]) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            if not loopback_host(request.headers.get("host", "")):
                response: Response = PlainTextResponse("this console answers on 127.0.0.1 only\n", 400)
            elif not authorised(request):
                response = PlainTextResponse(UNAUTHORISED, 401)
            else:
                response = handler(request)
            response.headers.update(SECURITY_HEADERS)
            return response

        return endpoint

    def index(request: Request) -> Response:
        if "token" in request.query_params:  # set the cookie, and drop the token from the address bar
            response = RedirectResponse("./", status_code=303)
            response.set_cookie(cookie, token, httponly=True, samesite="strict")
            return response
        return HTMLResponse(page(reader.snapshot()))

    routes = [
        Route("/", guarded(index), methods=["GET", "HEAD"]),
        Route("/live", guarded(lambda _: HTMLResponse(live(reader.snapshot()))), methods=["GET", "HEAD"]),
        Route(
            "/metrics",
            guarded(lambda _: Response(metrics_text(reader.snapshot()), media_type=CONTENT_TYPE)),
            methods=["GET", "HEAD"],
        ),
        Route(
            "/console.js", guarded(lambda _: Response(SCRIPT, media_type="text/javascript")), methods=["GET"]
        ),
        Route("/favicon.ico", lambda _: Response(status_code=204), methods=["GET"]),
        Route("/console.css", guarded(lambda _: Response(STYLE, media_type="text/css")), methods=["GET"]),
    ]
    return Starlette(routes=routes)


def bind_loopback(port: int, option: str = "--port") -> socket.socket:
    """A socket listening on 127.0.0.1:``port`` (0: any free port); ConfigError naming ``option``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((LOOPBACK, port))
        sock.listen(128)  # the port is this console's from now on, before it serves
    except OSError as exc:
        sock.close()
        raise ConfigError(option, str(port), f"a free port on {LOOPBACK}, or 0 for any ({exc})") from None
    return sock


class ConsoleServer:
    """The console of one run folder on 127.0.0.1: in the foreground, or in a thread beside a run."""

    def __init__(self, run_dir: Path, port: int = 0, *, option: str = "--port") -> None:
        self.token = new_token()
        self.socket = bind_loopback(port, option)
        self.port = int(self.socket.getsockname()[1])
        app = create_app(RunReader(run_dir), self.token)
        config = uvicorn.Config(app, log_level="warning", access_log=False, log_config=None, lifespan="off")
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The address to open, token included: for the owner's eyes only."""
        return f"http://{LOOPBACK}:{self.port}/?token={self.token}"

    def serve(self) -> None:
        """Serve until interrupted (Ctrl-C, SIGTERM)."""
        self.server.run(sockets=[self.socket])

    def start_background(self) -> None:
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="cxr-fl-console", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_SECONDS)
        self.socket.close()
