"""``cxr-fl-client``: the command a hospital runs next to its images.

This module holds the typer app and the ``check`` command (read a site's data through its
source adapter, decode every image into the cache, print what the site has). Other commands
(``start``, ``predict``, ``explain``) are added to the same ``app``. Commands stay thin: they
check options, call library code in ``common/``, and turn a :class:`~common.errors.CxrFlError`
into a one-line message and exit code 2 (no traceback).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from common.errors import CxrFlError

app = typer.Typer(
    name="cxr-fl-client",
    help="Federated chest X-ray client: check a site's data, join a federation, predict, explain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

USER_ERROR_EXIT = 2


def fail(message: str) -> typer.Exit:
    """Print a user error (no traceback) and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(USER_ERROR_EXIT)


@app.callback()
def _root() -> None:
    """Federated chest X-ray client: check a site's data, join a federation, predict, explain."""


def _parse_options(values: list[str] | None) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise fail(f"--option {item!r}: expected KEY=VALUE, e.g. --option drop-unmapped=true")
        options[key.strip()] = value.strip()
    return options


@app.command()
def check(
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="Source format: image-folder, covid19-radiography, ieee8023, nih14, chexpert, medmnist, "
            "manifest, synthetic.",
        ),
    ],
    data: Annotated[
        Path | None, typer.Option("--data", help="The site's data folder or file (not needed for synthetic).")
    ] = None,
    task: Annotated[str, typer.Option("--task", help="Task whose classes the labels map onto.")] = (
        "normal-pneumonia-covid"
    ),
    image_size: Annotated[int, typer.Option("--image-size", help="Cache size in pixels (square).")] = 64,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on the first unreadable image.")] = False,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", help="Source option KEY=VALUE (repeatable), e.g. drop-unmapped=true."),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option("--cache-dir", help="Image cache folder (default $CXR_FL_CACHE_DIR or ~/.cache)."),
    ] = None,
) -> None:
    """Read every image of a site's data set and print counts per class, view and patient."""
    from common.data.cache import build_cache
    from common.data.sources import load_catalog
    from common.tasks import get_task

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        task_obj = get_task(task)
        catalog = load_catalog(fmt, data, task_obj, options=_parse_options(option), strict=strict)
        with Progress(
            TextColumn("decoding images"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=True,
        ) as bar:
            job = bar.add_task("decode", total=len(catalog))
            cached = build_cache(
                catalog,
                image_size,
                cache_dir,
                strict=strict,
                progress=lambda done, _t: bar.update(job, completed=done),
            )
    except CxrFlError as exc:
        raise fail(str(exc)) from None

    usable = cached.catalog
    where = f" at {data}" if data is not None else ""
    console.print(
        f"[bold]{fmt}{where}[/]: {len(usable)} readable images, task {task_obj.name}",
        highlight=False,
        soft_wrap=True,
    )
    table = Table()
    table.add_column("finding" if task_obj.is_multilabel else "class")
    table.add_column("images", justify="right")
    table.add_column("share", justify="right")
    for name, count in usable.class_counts().items():
        table.add_row(name, str(count), f"{count / max(len(usable), 1):.1%}")
    if task_obj.is_multilabel:
        none = int((usable.primary_labels() == task_obj.num_classes).sum())
        table.add_row("(no finding)", str(none), f"{none / max(len(usable), 1):.1%}")
    console.print(table)

    facts = Table(show_header=False, title="site facts", title_justify="left")
    patients = {r.patient_id for r in usable.records if r.patient_id is not None}
    unknown_patient = sum(r.patient_id is None for r in usable.records)
    facts.add_row(
        "patients",
        f"{len(patients)}" + (f" (+{unknown_patient} images without id)" if unknown_patient else ""),
    )
    views = Counter(r.view or "unknown" for r in usable.records)
    facts.add_row("views", ", ".join(f"{v} {n}" for v, n in views.most_common()))
    sites = Counter(r.site for r in usable.records if r.site)
    if sites:
        facts.add_row("sources/sites", ", ".join(f"{s} {n}" for s, n in sites.most_common(5)))
    facts.add_row("unreadable files", str(len(cached.skipped)))
    facts.add_row("cache", f"{cached.path} ({cached.nbytes_on_disk / 1e6:.1f} MB, {image_size} px)")
    console.print(facts)
    for skipped in cached.skipped[:20]:
        err_console.print(
            f"[yellow]unreadable:[/] {skipped.key}: {skipped.reason}", highlight=False, soft_wrap=True
        )


def main() -> None:
    """Console-script entry point (``cxr-fl-client``)."""
    app()


if __name__ == "__main__":
    main()
