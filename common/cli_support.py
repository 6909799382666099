"""What the three command lines share: how a typer app is made and how a user's mistake is told.

A mistake (:class:`~common.errors.CxrFlError`: a bad option, a missing file, ...) is printed as
one line on stderr, ``error: ...``, without a traceback, and the command exits with code 2.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from common.errors import CxrFlError

P = ParamSpec("P")
R = TypeVar("R")

USER_ERROR_EXIT = 2
stdout = Console()
stderr = Console(stderr=True)


def typer_app(name: str, help: str, *, no_args_is_help: bool = True) -> typer.Typer:
    """A typer app with the project's settings (no shell completion, no locals in tracebacks)."""
    return typer.Typer(
        name=name,
        help=help,
        no_args_is_help=no_args_is_help,
        add_completion=False,
        pretty_exceptions_enable=False,
    )


def fail(message: str, code: int = USER_ERROR_EXIT) -> typer.Exit:
    """Print ``error: message`` on stderr (taken literally, never as markup); return the Exit."""
    stderr.print(Text("error: ", style="bold red") + Text(message), highlight=False, soft_wrap=True)
    return typer.Exit(code)


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator: a CxrFlError raised by a command becomes :func:`fail` instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except CxrFlError as exc:
            raise fail(str(exc)) from None

    return wrapper
