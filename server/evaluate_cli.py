"""``cxr-fl-server evaluate MODEL``: an evaluation-only run, every site scores one model.

The model is read and checked before anything starts (common/model_exchange.py: weights or a
standard-operator ONNX file; TorchScript, a missing file or a model of another task than the
run folder's are one-line errors, exit 2). The run then goes to the run folder's SuperLink: the
one ``cxr-fl-server serve`` keeps up, or, when none runs, one started for this run alone (as
``start`` does; the sites join it with their one-run ``start``), with the registered sites'
keys registered again. The cross-site table and the forest plot land in
``RUN_DIR/evaluations/run-<flower run id>/`` (server/cross_site.py); the coordinator's audit log
records ``evaluation-submitted`` (the model's hash, the sites asked) and ``evaluation-finished``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from common.cli_support import fail, stderr, stdout
from common.errors import CxrFlError

EVALUATION_OVERRIDES = "evaluation_overrides.toml"


def _federation_task(run_dir: Path) -> str | None:
    """The task of the run folder's training run (None when it holds none)."""
    from server.run_folder import RunFolder

    path = RunFolder(run_dir).config_path
    if not path.is_file():
        return None
    try:
        task = json.loads(path.read_text(encoding="utf-8")).get("task")
    except (OSError, json.JSONDecodeError):
        return None
    return str(task) if task else None


def evaluation_overrides(
    model_path: Path, run_dir: Path, sites: list[str], bootstrap: int, task: str | None
) -> tuple[dict[str, Any], Any]:
    """The evaluation run's settings and the checked model; CxrFlError for any bad input."""
    from common.model_exchange import check_model_task, read_evaluation_model
    from common.run_settings import check_run_config
    from server.security import check_site_name

    model = read_evaluation_model(model_path)
    check_model_task(model, task or _federation_task(run_dir))
    for site in sites:
        check_site_name(site)
    overrides: dict[str, Any] = {
        **model.settings,
        "evaluate-model": str(model.path.resolve()),
        "evaluate-sites": ",".join(sites),
        "evaluate-bootstrap": bootstrap,
        "run-dir": str(run_dir),
    }
    if sites:
        overrides["min-available-sites"] = max(len(sites), 1)
        overrides["min-train-sites"] = overrides["min-evaluate-sites"] = 1
    check_run_config(overrides)
    return overrides, model


def evaluate_command(
    model: Annotated[
        Path,
        typer.Argument(
            help="The model every site scores: an exported student .onnx (with its .preprocessing.json) "
            "or weights (RUN_DIR/checkpoints/best.pt, student.pt, a site export's .pt with its .json).",
        ),
    ],
    run_dir: Annotated[Path, typer.Option("--run-dir", help="The coordinator's run folder.")] = Path(
        "runs/federation"
    ),
    site: Annotated[
        list[str] | None, typer.Option("--site", help="Only this site (registered name; repeatable).")
    ] = None,
    task: Annotated[
        str | None, typer.Option("--task", help="The federation's task (default: the run folder's).")
    ] = None,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", min=1, max=10_000, help="Bootstrap resamples of the 95% intervals.")
    ] = 1000,
    certs_dir: Annotated[
        Path | None,
        typer.Option(
            "--certs", help="TLS folder, when no `serve` runs and a SuperLink is started for this run."
        ),
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="The sites' port (default: the run folder's).")
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Interface the sites connect to.")] = "127.0.0.1",
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS (testing only).")] = False,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Give up after this many seconds.")
    ] = None,
) -> None:
    """Every site scores MODEL on its own labelled test split; writes the cross-site table and forest plot."""
    from server.deploy import Coordinator

    run_dir = run_dir.resolve()
    try:
        overrides, checked = evaluation_overrides(model, run_dir, site or [], bootstrap, task)
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    coordinator = Coordinator(run_dir)
    started = time.time()
    serving = coordinator.superlink_running()
    if not serving:
        _start_superlink(coordinator, certs_dir, port, host, insecure)
    try:
        coordinator.record(
            "evaluation-submitted",
            model=checked.path.name,
            model_sha256=_sha256(checked.path),
            sites=",".join(site or []) or "all",
        )
        stdout.print(f"evaluating {checked.describe()} at {', '.join(site or []) or 'every site'} ...")
        code = coordinator.submit(
            overrides, on_line=_echo_warnings, timeout=timeout, config_name=EVALUATION_OVERRIDES
        )
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    finally:
        if not serving:
            coordinator.stop(recorded=False)
    _report(coordinator, run_dir, started, code)


def _sha256(path: Path) -> str:
    from common.checkpoint import sha256_file

    return sha256_file(path)


def _echo_warnings(line: str) -> None:
    if " WARNING " in f" {line} " or "ERROR" in line:
        stderr.print(line, highlight=False, markup=False)


def _start_superlink(
    coordinator: Any, certs_dir: Path | None, port: int | None, host: str, insecure: bool
) -> None:
    """A SuperLink for this run alone (no `serve` runs), the known sites' keys registered again."""
    from server.deploy import DEFAULT_PORT, TlsFiles

    try:
        if insecure:
            tls = None
        elif certs_dir is None:
            raise fail(
                "no `cxr-fl-server serve` runs for this run folder: give --certs DIR (or --insecure for a "
                "test) to start a SuperLink for this evaluation"
            )
        else:
            tls = TlsFiles.from_dir(certs_dir)
        port = port or coordinator.read_state().get("port") or DEFAULT_PORT
        coordinator.start_superlink(port=port, host=host, tls=tls, database=False)
        if tls is not None:
            coordinator.reregister_sites()
        stdout.print(
            f"SuperLink listening on {host}:{coordinator.read_state()['port']} for this evaluation; "
            "the sites join with their `start`",
            highlight=False,
        )
    except CxrFlError as exc:
        coordinator.stop(recorded=False)
        raise fail(str(exc)) from None


def _report(coordinator: Any, run_dir: Path, started: float, code: int) -> None:
    from server.cross_site import evaluation_folder

    run_id = coordinator.read_state().get("flower_run_id")
    table = evaluation_folder(run_dir, int(run_id)) / "cross_site.md" if run_id is not None else None
    if table is None or not table.is_file() or table.stat().st_mtime < started:
        coordinator.record("evaluation-stopped", flower_run_id=run_id)
        raise fail(
            f"the evaluation ended without a cross-site table (flwr exit code {code}: "
            f"{coordinator.failure_reason()}); logs: {coordinator.flower_log}",
            1,
        )
    coordinator.record("evaluation-finished", flower_run_id=run_id)
    from rich.markdown import Markdown

    stdout.print(Markdown(table.read_text(encoding="utf-8")))
    stdout.print(f"cross-site table: {table} (+ cross_site.json, forest_plot.png)", highlight=False)
