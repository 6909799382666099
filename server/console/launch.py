"""Starting the console beside a command that runs the federation (``start``, ``serve``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from common.cli_support import fail, stdout

if TYPE_CHECKING:  # the web stack loads only when a console starts
    from server.console.web import ConsoleServer

ConsoleOption = Annotated[
    bool,
    typer.Option(
        "--console/--no-console",
        help="Serve the run's read-only console on 127.0.0.1 while this command runs (its address, "
        "with a token, is printed here; never on the sites' address).",
    ),
]
ConsolePortOption = Annotated[
    int, typer.Option("--console-port", help="The console's port on 127.0.0.1 (default: any free port).")
]


def open_console(run_dir: Path, port: int, sites_port: int) -> ConsoleServer:
    """The console's server, its socket bound (not serving yet): port errors before anything starts."""
    from server.console.web import ConsoleServer

    if port and port == sites_port:
        raise fail(f"--console-port {port}: that is the sites' port; choose another, or 0 for any free port")
    if not 0 <= port <= 65535:
        raise fail(f"--console-port {port}: pass a port number 1-65535, or 0 for any free port")
    return ConsoleServer(run_dir, port, option="--console-port")


def announce_console(web: ConsoleServer, how_long: str) -> None:
    """The console's address, token included, to the owner's terminal only."""
    stdout.print(f"console ({how_long}, this machine only): {web.url}", highlight=False, soft_wrap=True)
    stdout.print(
        f"  from another machine: ssh -N -L 127.0.0.1:{web.port}:127.0.0.1:{web.port} USER@THIS-HOST, "
        "then open the same address there (docs/console.md)",
        highlight=False,
        soft_wrap=True,
    )
