"""How the coordinator's commands follow a submitted training run (``start``, ``submit``).

The run's audit entry (settings and app hash), the progress bar that follows the run's progress
events (server/progress_events.py) while ``flwr run`` streams its log, and whether the run wrote
its summary. Shared by server/cli.py (``start``) and server/serve_cli.py (``submit``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from common.cli_support import stderr as err_console
from common.cli_support import stdout as console
from common.errors import CxrFlError

if TYPE_CHECKING:
    from server.progress_events import Progress as RunProgress


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
    from server.run_folder import RunFolder

    return RunFolder(run_dir).summary_written_since(started)


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


def show_progress(bar: Progress, job: TaskID, progress: RunProgress) -> None:
    """One step of the run (server/progress_events.py) on the coordinator's progress bar."""
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


def follow_run(
    coordinator: Any,
    overrides: dict[str, Any],
    num_rounds: int,
    started: float,
    timeout: float | None,
    config_name: str | None = None,
) -> int:
    """Submit the run and show its progress, read from the run folder's events as its log
    streams in; the log's warnings and errors are shown as they come."""
    from server.deploy import FlwrRunTimeoutError
    from server.progress_events import EventFollower
    from server.run_folder import RunFolder

    with progress_bar() as bar:
        job = bar.add_task("teacher rounds", total=num_rounds, detail="waiting for sites")
        events = EventFollower(
            RunFolder(Path(overrides["run-dir"])), lambda step: show_progress(bar, job, step), since=started
        )

        def on_line(line: str) -> None:
            events.poll()
            if " WARNING " in f" {line} " or "ERROR" in line:
                bar.console.print(line, highlight=False, markup=False)

        remaining = None if timeout is None else max(1.0, timeout - (time.time() - started))
        try:
            return coordinator.submit(overrides, on_line=on_line, timeout=remaining, config_name=config_name)
        except FlwrRunTimeoutError:
            return -1
        finally:
            events.poll()
