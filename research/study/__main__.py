"""``python -m research.study TABLE... [--config research/study/study.toml]``: the study's command line.

Runs tables of cells (resumable), then writes study.md and its plots. It reuses the progress
display and the resource options of ``python -m simulation`` (:mod:`simulation.cli`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from common.cli_support import stdout, typer_app, user_errors
from common.errors import ConfigError
from simulation.cli import GPUS_PER_SITE_OPTION, RAY_ADDRESS_OPTION, _round_display

app = typer_app(
    "study",
    "The real-data study: federation vs pooling, the cost of DP, distilled students.",
)


STUDY_CONFIG = Path("research/study/study.toml")


@app.command()
@user_errors
def study(
    tables: Annotated[
        list[str],
        typer.Argument(
            help="splits, headline, privacy, students, nih, all, report (only rebuild the report), or "
            "restore (first copy the committed study.json's cells into the work folder, so that a fresh "
            "clone resumes the study)."
        ),
    ],
    config: Annotated[Path, typer.Option(help="The study's TOML file.")] = STUDY_CONFIG,
    out: Annotated[Path | None, typer.Option(help="Work folder (default: `out` in the config).")] = None,
    results: Annotated[
        Path | None, typer.Option(help="Where study.md and the plots go (default: `results` in the config).")
    ] = None,
    seed: Annotated[
        list[int] | None,
        typer.Option("--seed", help="Run only these seeds (repeatable; default: `seeds` in the config)."),
    ] = None,
    gpus_per_site: Annotated[float, GPUS_PER_SITE_OPTION] = 0.0,
    cpus_per_site: Annotated[
        int,
        typer.Option(
            help="Ray's CPUs per simulated site, and its torch threads: 2 on a 2-core machine runs one "
            "site at a time with both cores, which halves the memory of DP cells (Opacus' per-sample "
            "gradients); results change only by floating-point summation order."
        ),
    ] = 1,
    ray_address: Annotated[str, RAY_ADDRESS_OPTION] = "",
) -> None:
    """The real-data study: run tables of cells (resumable), then write study.md and its plots."""
    from research.study.cells import (
        TABLES,
        check_finished_cells,
        load_settings,
        table_cells,
        with_overrides,
        with_resources,
    )
    from research.study.report import build_study_report, restore_cells

    allowed = (*TABLES, "all", "report", "restore")
    for table in tables:
        if table not in allowed:
            raise ConfigError("table", table, "one of " + ", ".join(allowed))
    base = with_overrides(load_settings(config), out, results, None)
    settings = with_resources(
        with_overrides(base, None, None, seed), gpus_per_site, ray_address, cpus_per_site
    )
    chosen = list(TABLES) if "all" in tables else [t for t in tables if t in TABLES]
    if "restore" in tables:
        written = restore_cells(base.out, base.results)
        source = base.results / "study.json"
        stdout.print(f"restored {written} finished cell(s) from {source} into {base.out}")
    for table in TABLES:  # every table's cells resolve, and none of the finished ones is stale,
        check_finished_cells(table_cells(table, base), base)  # before any work starts
    for table in chosen:
        _run_study_table(table, settings)
    path = build_study_report(base)  # the report covers every seed of the config
    stdout.print(f"report: {path}", markup=False, highlight=False, soft_wrap=True)


def _run_study_table(table: str, settings: Any) -> None:
    """Run one table of the study with a progress display (cells, stage, teacher rounds)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from research.study.cells import run_table

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stdout) as progress:
        cells = progress.add_task(f"table {table}", total=None)
        stage = progress.add_task("", total=None)
        rounds, on_round = _round_display(progress, "val AUROC")

        def on_cell(done: int, total: int, cell: Any) -> None:
            progress.update(cells, total=total, completed=done, description=f"table {table}: {cell.name}")
            progress.update(rounds, visible=False, completed=0)
            progress.console.print(
                f"{time.strftime('%H:%M:%S')} table {table}, cell {done + 1}/{total}: {cell.name}"
            )

        def on_stage(text: str) -> None:
            progress.update(stage, description=text)

        run_table(table, settings, on_cell=on_cell, on_stage=on_stage, on_round=on_round)
        progress.update(cells, completed=progress.tasks[cells].total, description=f"table {table}: done")


def main() -> None:
    """Entry point of ``python -m research.study``."""
    from common.processes import exit_on_sigterm

    exit_on_sigterm()  # a SIGTERM stops the Flower and Ray processes of the run, as Ctrl-C does
    app(prog_name="python -m research.study")


if __name__ == "__main__":
    main()
