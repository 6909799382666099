"""What one connection to the sites' address may cost the coordinator: the gateway's HTTP protocol.

Anyone who reaches the sites' address can open connections, and uvicorn 0.49 (the server the
Fleet gateway runs in) bounds none of them: it reads request headers for as long as a client
keeps sending them (its keep-alive timer starts only after a response), waits for a body without
end, and accepts connections until the process runs out of file descriptors, after which real
sites cannot connect at all. This module is the gateway's uvicorn protocol class (a subclass of
uvicorn's httptools protocol, the one uvicorn picks here) with those bounds added:

- at most ``max_connections`` open connections in all and ``max_connections_per_peer`` from one
  address (an IPv6 /64 counts as one address), both below the process's file limit; a
  connection over a limit is closed at once, before any TLS handshake, and logged (at most one
  line a second, then one line with the count of the others);
- TLS is started here, after that check (uvicorn gets a plain socket), so a connection that
  never finishes its handshake is counted and timed like any other;
- every request must deliver its complete headers within ``header_timeout`` seconds (from the
  connection's accept for the first, from its first byte for a later one) and in at most
  ``max_header_bytes``, and its body within ``body_timeout`` seconds of its headers; an idle
  keep-alive connection is closed after ``keep_alive_timeout`` seconds (uvicorn's own timer) and
  any connection after ``max_requests_per_connection`` requests;
- every connection cut off by these bounds, and every malformed request, is logged with the
  real peer address (and method and escaped path when known).

What is *in* a request (allowed paths, body size, headers passed on) is server/fleet_gateway.py's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
import ssl
import time
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.flow_control import CLOSE_HEADER
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("server.fleet_gateway")  # one log for the gateway, also when run with -m

RESERVED_FILES = 128
"""File descriptors kept out of the connection limit: upstream connections to the SuperLink (see
``UPSTREAM_CONNECTIONS`` in server/fleet_gateway.py), log files, the listening socket."""
REFUSAL_LOG_INTERVAL = 1.0
"""At most one line a second about connections refused over a limit (each line counts the rest)."""
MAX_LOGGED_PATH = 200
"""Characters of a path written to the log (a longer one is cut, with its length)."""


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection and all of them together may hold (seconds, bytes, counts)."""

    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keep_alive_timeout: int = 5
    max_header_bytes: int = 64 * 1024
    max_requests_per_connection: int = 1000
    max_connections: int = 1000
    max_connections_per_peer: int = 32

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {getattr(self, name)!r}")
        for name in ("max_header_bytes", "max_requests_per_connection", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if not 1 <= self.max_connections_per_peer <= self.max_connections:
            raise ValueError(
                f"max_connections_per_peer must be between 1 and max_connections ({self.max_connections}), "
                f"got {self.max_connections_per_peer!r}"
            )


def raise_open_file_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep the soft limit it has
    return soft


def connections_within_file_limit(wanted: int, open_file_limit: int) -> int:
    """``wanted``, lowered so that connections and the reserved files stay below the file limit."""
    return max(0, min(wanted, open_file_limit - RESERVED_FILES))


def peer_key(host: str) -> str:
    """The address a per-peer limit counts: the IP, an IPv6 /64 as one, IPv4-mapped IPv6 as IPv4."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def escaped(raw: bytes, limit: int = MAX_LOGGED_PATH) -> str:
    """Bytes as sent, printable ASCII kept and every other byte percent-escaped (no line breaks)."""
    text = "".join(chr(b) if 0x21 <= b <= 0x7E else f"%{b:02X}" for b in raw[:limit])
    return text if len(raw) <= limit else f"{text}... ({len(raw)} bytes)"


def format_peer(peer: tuple[str, int] | None) -> str:
    if peer is None:
        return "an unknown peer"
    host, port = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ConnectionCounts:
    """Open connections of one gateway, in all and by peer; refusals over a limit, logged sparingly."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.total = 0
        self.by_peer: dict[str, int] = {}
        self._unlogged_refusals = 0
        self._last_unlogged = ""
        self._last_refusal_log = -REFUSAL_LOG_INTERVAL

    def admit(self, key: str) -> str | None:
        """Count a new connection from ``key``; or, over a limit, say why it is refused."""
        if self.total >= self.limits.max_connections:
            return f"{self.total} connections open, the most this gateway keeps"
        open_from_peer = self.by_peer.get(key, 0)
        if open_from_peer >= self.limits.max_connections_per_peer:
            return f"{open_from_peer} connections open from {key}, the most one address may hold"
        self.total += 1
        self.by_peer[key] = open_from_peer + 1
        return None

    def release(self, key: str) -> None:
        self.total -= 1
        left = self.by_peer[key] - 1
        if left:
            self.by_peer[key] = left
        else:
            del self.by_peer[key]

    def log_refusal(self, peer: tuple[str, int] | None, why: str, loop: asyncio.AbstractEventLoop) -> None:
        """One line now, or (within a second of the last) counted and summed up a second later."""
        now = time.monotonic()
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL:
            logger.warning("Refused a connection from %s: %s", format_peer(peer), why)
            self._last_refusal_log = now
            return
        self._unlogged_refusals += 1
        self._last_unlogged = f"the last from {format_peer(peer)}: {why}"
        if self._unlogged_refusals == 1:
            loop.call_later(REFUSAL_LOG_INTERVAL, self._log_unlogged_refusals)

    def _log_unlogged_refusals(self) -> None:
        logger.warning(
            "Refused %d more connections over a limit (%s)", self._unlogged_refusals, self._last_unlogged
        )
        self._last_refusal_log = time.monotonic()
        self._unlogged_refusals = 0


class GatewayConfig(uvicorn.Config):
    """uvicorn's settings for the gateway, with its limits, its TLS context and its connection counts.

    uvicorn listens on a plain socket (TLS is started by :class:`GuardedHttpProtocol`), takes no
    forwarding header from any client as the peer's address (``proxy_headers=False``) and runs on
    the standard asyncio loop (whose ``start_tls`` this module relies on).
    """

    def __init__(
        self, app: Any, *, limits: ConnectionLimits, tls: ssl.SSLContext | None, **kwargs: Any
    ) -> None:
        super().__init__(
            app,
            http=GuardedHttpProtocol,
            loop="asyncio",
            proxy_headers=False,
            timeout_keep_alive=limits.keep_alive_timeout,
            **kwargs,
        )
        self.limits = limits
        self.tls = tls
        self.counts = ConnectionCounts(limits)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with connection limits, TLS after them, and read timeouts."""

    config: GatewayConfig

    def __init__(self, config: GatewayConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.limits = config.limits
        self._raw_transport: asyncio.Transport | None = None
        self._peer: tuple[str, int] | None = None
        self._peer_key: str | None = None  # set while counted
        self._serving = False  # uvicorn's connection_made has run
        self._timer: asyncio.TimerHandle | None = None
        self._awaiting_headers = False
        self._header_bytes = 0
        self._requests = 0
        self._tls_task: asyncio.Task[None] | None = None
        self._cut_off = False
        self._early_data: list[bytes] = []  # arrived with the end of the TLS handshake

    # -- connection ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw_transport = transport
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            self._peer = (str(peername[0]), int(peername[1]))
        key = peer_key(self._peer[0]) if self._peer else "unknown"
        why = self.config.counts.admit(key)
        if why is not None:
            self.config.counts.log_refusal(self._peer, why, self.loop)
            transport.abort()
            return
        self._peer_key = key
        self._await_headers(f"no complete request headers within {self.limits.header_timeout:g} s")
        if self.config.tls is None:
            self._serve(transport)
        else:
            self._tls_task = self.loop.create_task(self._start_tls(transport, self.config.tls))

    async def _start_tls(self, transport: asyncio.Transport, context: ssl.SSLContext) -> None:
        try:
            tls_transport = await self.loop.start_tls(
                transport,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self.limits.header_timeout,
            )
        except (TimeoutError, OSError) as exc:  # ssl.SSLError is an OSError
            if not self._cut_off:  # else already logged
                why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                logger.warning("Closed a connection from %s: no TLS session (%s)", self.peer, why)
            return
        if tls_transport is None or transport.is_closing():
            return
        self._serve(tls_transport)  # type: ignore[arg-type]

    def _serve(self, transport: asyncio.Transport) -> None:
        self._serving = True
        super().connection_made(transport)
        if self._early_data:
            early, self._early_data = b"".join(self._early_data), []
            self.data_received(early)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._peer_key is not None:
            self.config.counts.release(self._peer_key)
            self._peer_key = None
        if self._serving:
            self._serving = False
            super().connection_lost(exc)

    @property
    def peer(self) -> str:
        return format_peer(self._peer)

    # -- timers --------------------------------------------------------------------------------
    def _await_headers(self, why: str) -> None:
        self._awaiting_headers = True
        self._header_bytes = 0
        self._start_timer(self.limits.header_timeout, why)

    def _start_timer(self, seconds: float, why: str) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(seconds, self.cut_off, why)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def cut_off(self, why: str) -> None:
        """Close this connection now (no reply: the peer is not delivering a request), and log it."""
        self._timer = None
        self._cut_off = True
        request = ""
        if self.scope is not None and "method" in self.scope:
            request = f" during {self.scope['method']} {escaped(self.scope.get('raw_path', b''))}"
        logger.warning("Cut off %s%s: %s", self.peer, request, why)
        if self._raw_transport is not None and not self._raw_transport.is_closing():
            self._raw_transport.abort()

    # -- parser callbacks ----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if not self._serving:  # the request began before start_tls returned: at most a few reads
            self._early_data.append(data)
            return
        if self._awaiting_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._awaiting_headers and self._header_bytes > self.limits.max_header_bytes:
            self.cut_off(f"request headers over {self.limits.max_header_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._awaiting_headers:  # a later request on a kept-alive connection
            self._await_headers(f"no complete request headers within {self.limits.header_timeout:g} s")

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        why = f"request body not received within {self.limits.body_timeout:g} s"
        self._start_timer(self.limits.body_timeout, why)
        super().on_headers_complete()
        self._requests += 1
        if self._requests >= self.limits.max_requests_per_connection and self.cycle is not None:
            self.cycle.keep_alive = False  # closed once this request is answered,
            self.headers.append(CLOSE_HEADER)  # and uvicorn then says so in its answer

    def on_message_complete(self) -> None:
        self._cancel_timer()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        logger.warning("Refused a request from %s: 400 (%s)", self.peer, msg.rstrip("."))
        self._cancel_timer()
        super().send_400_response(msg)
