"""``cxr-fl-server serve`` and ``submit``: a federation that stays up across runs.

``serve`` starts the run folder's SuperLink and the sites' gateway (server/deploy.py, as
``start`` does), registers the site keys given and again those of ``sites.json`` (registrations
persist in the run folder), and keeps both up until Ctrl-C or SIGTERM. Runs go to it with
``submit`` (training: its own folder ``RUN_DIR/runs/<name>/``, the coordinator's registered
sites and audit log through the run setting ``coordinator-dir``) and ``evaluate``
(server/evaluate_cli.py); ``register-site``/``revoke-site`` act on it while it serves. ``start``
keeps its one-run behaviour. The audit log records ``federation-served`` and
``federation-stopped``, and every submitted run as ``start`` does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from common.cli_support import fail, stderr, stdout
from common.errors import CxrFlError
from server.console.launch import ConsoleOption, ConsolePortOption, announce_console, open_console

POLL_SECONDS = 1.0


def serve_command(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="The coordinator's folder.")] = Path(
        "runs/federation"
    ),
    certs_dir: Annotated[
        Path | None, typer.Option("--certs", help="Folder made by `cxr-fl-server certs` (TLS).")
    ] = None,
    site_key_files: Annotated[
        list[Path] | None, typer.Option("--site-key", help="Register this site public key (repeatable).")
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="Port the sites connect to (default 9092).")
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Interface the sites connect to.")] = "127.0.0.1",
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS, no site authentication (tests).")
    ] = False,
    database: Annotated[
        bool,
        typer.Option(
            "--database/--in-memory",
            help="Keep the SuperLink's state in RUN_DIR/superlink.db, or in memory (default: the sites of "
            "sites.json are registered again at every start, and a restarted coordinator counts no "
            "site as connected before it is back).",
        ),
    ] = False,
    with_console: ConsoleOption = True,
    console_port: ConsolePortOption = 0,
) -> None:
    """Keep the SuperLink and the sites' gateway up across runs until Ctrl-C or SIGTERM; the
    read-only console (server/console/) follows the run submitted last."""
    from common.processes import exit_on_sigterm
    from server.deploy import DEFAULT_PORT, Coordinator, TlsFiles

    run_dir = run_dir.resolve()
    coordinator = Coordinator(run_dir)
    try:
        if coordinator.superlink_running():
            raise fail(f"a SuperLink of {run_dir} already runs: submit runs to it, or `stop` it first")
        if not insecure and certs_dir is None:
            raise fail("--certs DIR is required for TLS (or --insecure for a test on a trusted machine)")
        tls = None if insecure else TlsFiles.from_dir(certs_dir)  # type: ignore[arg-type]
        if site_key_files and tls is None:
            raise fail("--site-key needs TLS: site authentication is off with --insecure")
        exit_on_sigterm()
        port = port or coordinator.read_state().get("port") or DEFAULT_PORT
        web = open_console(run_dir, console_port, port) if with_console else None
        coordinator.start_superlink(port=port, host=host, tls=tls, database=database)
    except CxrFlError as exc:
        coordinator.stop(recorded=False)
        raise fail(str(exc)) from None
    try:
        _register(coordinator, tls is not None, site_key_files or [])
        coordinator.record("federation-served", port=port, tls=tls is not None)
        if web is not None:
            web.start_background()
            announce_console(web, "while the federation is served")
        stdout.print(
            f"SuperLink listening on {host}:{port} ({'TLS + site authentication' if tls else 'INSECURE'}); "
            f"serving {run_dir} until Ctrl-C or SIGTERM: send runs with `cxr-fl-server submit` or "
            "`cxr-fl-server evaluate`",
            highlight=False,
        )
        while coordinator.superlink_running():
            time.sleep(POLL_SECONDS)
        raise fail(f"the SuperLink stopped by itself; see {coordinator.superlink_log}", 1)
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    except (KeyboardInterrupt, SystemExit) as exc:
        if isinstance(exc, SystemExit) and exc.code not in (None, 0, 130, 143):
            raise
        stdout.print("stopping the federation ...", highlight=False)
    finally:
        if web is not None:
            web.stop()
        coordinator.record("federation-stopped")
        coordinator.stop(recorded=False)


def _register(coordinator: Any, tls: bool, key_files: list[Path]) -> None:
    if tls:
        coordinator.reregister_sites()
    for key_file in key_files:
        coordinator.register_site(key_file, key_file.stem)


def submit_command(
    name: Annotated[str, typer.Argument(help="The run's name: its folder is RUN_DIR/runs/NAME.")],
    run_dir: Annotated[
        Path, typer.Option("--run-dir", help="The coordinator's folder `serve` serves.")
    ] = Path("runs/federation"),
    config: Annotated[Path | None, typer.Option("--config", help="TOML file of run settings.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Run setting KEY=VALUE (repeatable).")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Give up after this many seconds.")
    ] = None,
) -> None:
    """Send a training run to the federation `serve` keeps up; follow it; print its summary."""
    from common.pki import check_site_name
    from common.run_settings import check_run_config, load_schema, resolve_run_config
    from server.deploy import Coordinator
    from server.run_folder import CoordinatorFolder, RunFolder
    from server.run_following import audit_run_start, follow_run, summary_written

    run_dir = run_dir.resolve()
    coordinator = Coordinator(run_dir)
    folder = CoordinatorFolder(run_dir).run(name).root
    try:
        check_site_name(name, "NAME")  # the same safe characters as a site's name
        if not coordinator.superlink_running():
            raise fail(f"no `cxr-fl-server serve --run-dir {run_dir}` runs: start it first (or use `start`)")
        if RunFolder(folder).holds_run():
            raise fail(f"{folder} already holds a run: choose another NAME")
        schema = load_schema()
        overrides: dict[str, Any] = resolve_run_config(schema, config, set_)
        overrides.update({"run-dir": str(folder), "coordinator-dir": str(run_dir)})
        check_run_config(overrides)
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    audit_run_start(coordinator, {**overrides, "run-name": name}, False)
    try:
        rounds = int({**schema, **overrides}["num-rounds"])
        code = follow_run(coordinator, overrides, rounds, started, timeout)
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    finished = summary_written(folder, started)
    coordinator.record("run-finished" if finished else "run-stopped", run=name)
    if not finished:
        raise fail(
            f"run {name} ended without a summary (flwr exit code {code}); logs: {coordinator.flower_log}", 1
        )
    stderr.print(f"run {name} finished: {folder}", highlight=False)
    stdout.print(f"[bold green]run finished[/]: {folder}", highlight=False)
