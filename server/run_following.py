"""How the coordinator's commands follow a submitted training run (``start``, ``submit``).

The run's audit entry (settings and app hash), the progress bar that follows ``flwr run``'s
log, and whether the run wrote its summary. Shared by server/cli.py (``start``) and
server/serve_cli.py (``submit``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common.cli_support import stderr as err_console
from common.cli_support import stdout as console
from common.errors import CxrFlError


def audit_run_start(coordinator: Any, overrides: dict[str, Any], resume: bool) -> None:
    """The run's settings and the app hash it carries, in the coordinator's audit log."""
    from server.deploy import PROJECT_ROOT
    from server.kit import app_bundle_hash

    try:
        app_hash: str | None = app_bundle_hash(PROJECT_ROOT)
    except CxrFlError as exc:  # `flwr run` reports the same failure next
        err_console.print(f"[bold yellow]warning:[/] {exc}", highlight=False)
        app_hash = None
    settings = {key: value for key, value in overrides.items() if key != "run-dir"}
    coordinator.record(
        "run-resumed" if resume else "run-submitted",
        settings=json.dumps(settings, sort_keys=True, default=str),
        app_hash=app_hash,
    )


def summary_written(run_dir: Path, started: float) -> bool:
    summary = run_dir / "summary.json"
    return summary.is_file() and summary.stat().st_mtime >= started


def progress_bar() -> Progress:
    """The coordinator's progress bar: description, bar, n/total, a detail field, elapsed time."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def follow_run(
    coordinator: Any,
    overrides: dict[str, Any],
    num_rounds: int,
    started: float,
    timeout: float | None,
    config_name: str = "run_overrides.toml",
) -> int:
    from server.deploy import FlwrRunTimeoutError
    from server.progress_lines import parse_progress

    with progress_bar() as bar:
        job = bar.add_task("teacher rounds", total=num_rounds, detail="waiting for sites")

        def on_line(line: str) -> None:
            progress = parse_progress(line)
            if progress is not None:
                if progress.phase == "distill":
                    bar.update(job, description="distillation", detail="students training at the sites")
                elif progress.phase == "start":
                    bar.update(job, description="students' start", detail=f"{progress.replied} public images")
                else:
                    detail = ""
                    if progress.replied is not None:
                        detail = f"{progress.replied}/{progress.sampled} sites replied"
                    if progress.metric is not None:
                        detail += f", val {progress.metric_name} {progress.metric:.4f}"
                    bar.update(
                        job,
                        completed=progress.completed_round,
                        total=progress.num_rounds,
                        description=f"round {progress.completed_round}/{progress.num_rounds}",
                        detail=detail,
                    )
            if " WARNING " in f" {line} " or "ERROR" in line:
                bar.console.print(line, highlight=False, markup=False)

        remaining = None if timeout is None else max(1.0, timeout - (time.time() - started))
        try:
            return coordinator.submit(overrides, on_line=on_line, timeout=remaining, config_name=config_name)
        except FlwrRunTimeoutError:
            return -1
