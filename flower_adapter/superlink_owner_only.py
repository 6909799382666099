"""Flower's SuperLink, serving only connections of the user who runs it.

Why: Flower 1.42's SuperLink serves its Control API (list, submit and stop runs; list and register
site keys) on the same port as the runtime and Fleet APIs, and the open-source build has no Control
API authentication. On loopback with TLS this still left the federation to any local account: it
can find the port in /proc/net/tcp and talk to it without verifying the certificate (a rogue key
registered that way received every global model). ``flower-superlink`` hands uvicorn only a
certificate and key (no client certificates, no Unix socket), and the ``flwr`` CLI, Flower's
SuperExec and ServerApp processes and the Fleet gateway must keep reaching it over TCP.

So ``python -m flower_adapter.superlink_owner_only ARGS`` runs Flower's own ``flower-superlink`` entry
point (same arguments) in this process, with one change: uvicorn gets an HTTP protocol class that,
when a connection is made (after the TLS handshake, before any byte of HTTP is read), looks up the
uid that holds the peer's socket (flower_adapter/loopback_peers.py) and closes the connection unless it is
this process's uid, with a log line naming the peer, its uid and the reason. The SuperLink must
listen on a loopback address (127/8 or ::1); HTTP (``--insecure``) and HTTPS alike. Flower's legacy
gRPC servers, which would listen outside uvicorn, must not be switched on.

Flower internals relied on (1.42.0, the version pyproject pins; any other version is refused with
a one-line message and exit code 2, so no SuperLink starts without the check): the
``flower-superlink`` entry point ``flwr.superlink.cli.flower_superlink`` reads ``sys.argv`` and
serves with ``uvicorn.run(app, host=..., ...)`` of the ``uvicorn`` module it imports, without an
``http`` argument of its own.
"""

from __future__ import annotations

import asyncio
import importlib
import ipaddress
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from flower_adapter.loopback_peers import PROC_NET, check_peer, describe_endpoint

logger = logging.getLogger(__name__)


def owner_only_announcement(pid: int) -> str:
    """Start of the line the SuperLink of process ``pid`` logs before uvicorn starts (deploy.py
    checks that it is there: no line, no SuperLink)."""
    return f"SuperLink PID {pid} serves only uid"


EXIT_REFUSED = 2
LEGACY_GRPC_PREFIX = "FLWR_INTERNAL_GRPC_"
ENTRY_MODULE = "flwr.superlink.cli.flower_superlink"
"""The module of the ``flower-superlink`` console script (its package re-exports the function)."""


class SuperLinkRefusedError(RuntimeError):
    """This module cannot guarantee the owner-only check: the SuperLink must not start."""


def require_proc_net(proc_net: Path = PROC_NET) -> None:
    """The check reads Linux's socket tables: without them no connection could be admitted."""
    if not (proc_net / "tcp").is_file():
        raise SuperLinkRefusedError(
            f"{proc_net}/tcp is missing: the owner-only SuperLink needs Linux's socket tables to tell "
            "which user is connecting; run the coordinator on Linux"
        )


def require_http_only(environ: Mapping[str, str] = os.environ) -> None:
    """Flower's legacy gRPC Control and Fleet servers (switched on by these variables) would listen
    on addresses of their own, outside this check: never start them."""
    legacy = sorted(k for k, v in environ.items() if k.startswith(LEGACY_GRPC_PREFIX) and v == "1")
    if legacy:
        raise SuperLinkRefusedError(
            f"{', '.join(legacy)}=1 would start Flower's gRPC APIs outside the owner-only check: unset it"
        )


def require_checked_flwr() -> None:
    """Refuse any Flower but the pinned one, whose SuperLink start this module was checked against."""
    import flwr
    import uvicorn

    from flower_adapter import FLWR_VERSION as SUPPORTED_FLWR_VERSION

    if flwr.__version__ != SUPPORTED_FLWR_VERSION:
        raise SuperLinkRefusedError(
            f"the owner-only SuperLink (flower_adapter/superlink_owner_only.py) supports flwr "
            f"{SUPPORTED_FLWR_VERSION} only, found flwr {flwr.__version__}: install "
            f"flwr=={SUPPORTED_FLWR_VERSION} (pyproject pins it). Not starting a SuperLink that "
            "any local user could control."
        )
    if getattr(importlib.import_module(ENTRY_MODULE), "uvicorn", None) is not uvicorn:
        raise SuperLinkRefusedError(
            "flwr's flower-superlink no longer starts uvicorn as checked: not starting"
        )


def owner_only_protocol(
    base: type[asyncio.Protocol], owner_uid: int, proc_net: Path = PROC_NET
) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's HTTP protocol ``base`` that closes connections of other users."""

    class OwnerOnlyHttpProtocol(base):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # uvicorn's bookkeeping, undone by connection_lost
            peer = transport.get_extra_info("peername")
            verdict = check_peer(peer, transport.get_extra_info("sockname"), owner_uid, proc_net)
            if not verdict.admitted:
                logger.warning(
                    "Refused a connection from %s (uid %s): %s; only uid %d may use this SuperLink",
                    describe_endpoint(peer),
                    "unknown" if verdict.uid is None else verdict.uid,
                    verdict.reason,
                    owner_uid,
                )
                cast(asyncio.Transport, transport).abort()  # no byte of the request is read

    OwnerOnlyHttpProtocol.__name__ = OwnerOnlyHttpProtocol.__qualname__ = f"OwnerOnly{base.__name__}"
    return OwnerOnlyHttpProtocol


def owner_only_run(run: Callable[..., None], owner_uid: int) -> Callable[..., None]:
    """``uvicorn.run`` that serves with :func:`owner_only_protocol`, on loopback only."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    def run_owner_only(app: Any, **kwargs: Any) -> None:
        if "http" in kwargs:
            raise SuperLinkRefusedError("flwr chose uvicorn's HTTP protocol itself: not starting")
        host = str(kwargs.get("host", ""))
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise SuperLinkRefusedError(f"--host {host!r}: the SuperLink must listen on 127.0.0.1 or ::1")
        logger.info(
            "%s %d (connections of other local users are closed)",
            owner_only_announcement(os.getpid()),
            owner_uid,
        )
        run(app, http=owner_only_protocol(AutoHTTPProtocol, owner_uid), **kwargs)

    return run_owner_only


def configure_logging() -> None:
    """This module's lines (refused connections) on stdout, beside Flower's and uvicorn's."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)-8s %(asctime)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``flower-superlink ARGS`` with the owner-only check; 2 (and one line) if it cannot be had."""
    configure_logging()
    try:
        require_proc_net()
        require_http_only()
        require_checked_flwr()
    except SuperLinkRefusedError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    import uvicorn

    entry_module = importlib.import_module(ENTRY_MODULE)
    uvicorn.run = owner_only_run(uvicorn.run, os.geteuid())  # type: ignore[assignment]
    sys.argv = ["flower-superlink", *(sys.argv[1:] if argv is None else argv)]
    try:
        entry_module.flower_superlink()
    except SuperLinkRefusedError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
