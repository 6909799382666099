"""``cxr-fl-server``: what a coordinating institution runs.

Commands: ``certs`` (CA + server certificate), ``kit`` (a site's onboarding kit, server/kit.py),
``site-key`` (a site's key pair, for tests; a site onboarded with a kit makes its own),
``register-site``, ``revoke-site``, ``start`` (SuperLink with TLS and site authentication, submit
the run, follow it), ``status`` (also the certificate's expiry and the audit log's head),
``stop``, ``serve`` and ``submit`` (a federation that stays up across runs, server/serve_cli.py),
``audit verify``, ``evaluate`` (an evaluation-only run: every site scores one model,
server/evaluate_cli.py), ``console`` (the read-only web page of a run folder, server/console/;
``start`` serves it too), ``pretrain`` (the initial teacher on public data, common/pretrain.py) and
``initial-teacher`` (the weights hash a run started from a file will carry). Commands stay
thin: they check options and hand off to server/security.py and
server/deploy.py; a :class:`~common.errors.CxrFlError` becomes a one-line message and exit
code 2, a failed run exit code 1.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markdown import Markdown

from common.cli_support import fail, stderr, stdout, typer_app
from common.errors import CxrFlError
from common.processes import exit_on_sigterm
from common.run_settings import read_toml
from server.console.launch import ConsoleOption, ConsolePortOption, announce_console, open_console
from server.evaluate_cli import evaluate_command
from server.run_folder import RunFolder
from server.run_following import (
    audit_run_start,
    follow_run,
    progress_bar,
    summary_written,
)
from server.serve_cli import serve_command, submit_command

app = typer_app(
    "cxr-fl-server",
    "Coordinate a federated chest X-ray run: certificates, site keys, SuperLink, progress.",
)
console = stdout
err_console = stderr

RUN_FAILED_EXIT = 1


@app.callback()
def _root() -> None:
    """Coordinate a federated chest X-ray run: certificates, site keys, SuperLink, progress."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def certs(
    out: Annotated[Path, typer.Option("--out", help="Folder for ca.crt, ca.key, server.crt, server.key.")],
    host: Annotated[
        list[str],
        typer.Option("--host", help="Host name or IP the sites use to reach the server (repeatable)."),
    ],
) -> None:
    """Make a CA and a server certificate for the SuperLink (sites get ca.crt only)."""
    from server.security import make_certificates

    try:
        files = make_certificates(out, host)
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    console.print(f"CA certificate:     {files.ca_cert}  (give this file to every site)", highlight=False)
    console.print(f"server certificate: {files.server_cert}  (for {', '.join(host)})", highlight=False)
    console.print(
        f"private keys:       {files.ca_key}, {files.server_key}  (keep them here)",
        highlight=False,
    )


@app.command("site-key")
def site_key(
    out: Annotated[Path, typer.Option("--out", help="Folder for SITE.key and SITE.pub.")],
    site: Annotated[str, typer.Option("--site", help="The site's name, e.g. st-marys.")],
) -> None:
    """Make a site's authentication key pair (ECDSA P-384, OpenSSH format, as Flower reads it)."""
    from server.security import make_site_key

    try:
        files = make_site_key(out, site)
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    console.print(f"private key: {files.private_key}  (stays at the site: --key)", highlight=False)
    console.print(
        f"public key:  {files.public_key}  (coordinator: cxr-fl-server register-site / start --site-key)",
        highlight=False,
    )


RunDirOption = Annotated[Path, typer.Option("--run-dir", help="The run folder.")]


@app.command("register-site")
def register_site(
    public_key: Annotated[Path, typer.Argument(help="The site's public key (SITE.pub).")],
    name: Annotated[str, typer.Option("--name", help="The site's name.")],
    run_dir: RunDirOption = Path("runs/federation"),
) -> None:
    """Register a site's public key with the running SuperLink (sites must be registered to join)."""
    from server.deploy import Coordinator

    try:
        node_id = Coordinator(run_dir).register_site(public_key, name)
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    console.print(f"registered site {name} (Flower node {node_id})", highlight=False)


@app.command("revoke-site")
def revoke_site(
    name: Annotated[str, typer.Argument(help="The registered site's name.")],
    run_dir: RunDirOption = Path("runs/federation"),
) -> None:
    """Revoke a site's key: unregistered from the SuperLink at once, refused from then on."""
    from server.deploy import Coordinator

    try:
        node_id = Coordinator(run_dir).revoke_site(name)
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    console.print(
        f"revoked site {name} (Flower node {node_id}); its key is refused from now on", highlight=False
    )


@app.command()
def kit(
    site: Annotated[str, typer.Argument(help="The site's name, e.g. st-marys.")],
    out: Annotated[Path, typer.Option("--out", help="A new folder for the kit.")],
    server: Annotated[
        str, typer.Option("--server", help="The address the sites connect to, HOST:PORT (as `start --port`).")
    ],
    certs_dir: Annotated[
        Path,
        typer.Option(
            "--certs", help="Folder made by `cxr-fl-server certs` (only ca.crt and server.crt are read)."
        ),
    ],
    app_hash_value: Annotated[
        str | None,
        typer.Option(
            "--app-hash", help="The app hash the runs carry (default: this installation's app bundle)."
        ),
    ] = None,
    max_image_size: Annotated[
        int | None, typer.Option("--max-image-size", help="Largest image side the runs use.")
    ] = None,
    max_local_epochs: Annotated[
        int | None, typer.Option("--max-local-epochs", help="Most local epochs per message.")
    ] = None,
    max_kd_epochs: Annotated[
        int | None, typer.Option("--max-kd-epochs", help="Most KD epochs per message.")
    ] = None,
    max_rounds: Annotated[int | None, typer.Option("--max-rounds", help="Most rounds per run.")] = None,
    max_teacher_parameters: Annotated[
        int | None, typer.Option("--max-teacher-parameters", help="Largest model, in parameters.")
    ] = None,
    cache_max_age_days: Annotated[
        int | None, typer.Option("--cache-max-age-days", help="Suggested retention of decoded images (days).")
    ] = None,
    phases: Annotated[
        str | None,
        typer.Option(
            "--phases", help="Run phases the sites take part in (teacher, distill, federated-student)."
        ),
    ] = None,
) -> None:
    """Write a site's onboarding kit: ca.crt, address, app hash, a policy template, a README."""
    from common.site_limits import PolicyFile
    from server.deploy import PROJECT_ROOT
    from server.kit import app_bundle_hash, split_address, write_kit

    values = {
        "max-image-size": max_image_size,
        "max-local-epochs": max_local_epochs,
        "max-kd-epochs": max_kd_epochs,
        "max-rounds": max_rounds,
        "max-teacher-parameters": max_teacher_parameters,
        "cache-max-age-days": cache_max_age_days,
        "phases": phases,
    }
    try:
        policy = PolicyFile.from_mapping({k: v for k, v in values.items() if v is not None}, "kit option")
        split_address(server)
        if app_hash_value is not None:
            from common.initial_teacher import check_sha256_hex

            digest = check_sha256_hex("--app-hash", app_hash_value)
        else:
            digest = app_bundle_hash(PROJECT_ROOT)
        made = write_kit(site, out, certs_dir, server, digest, policy)
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    console.print(f"kit for {site}: {made.folder}", highlight=False)
    console.print(f"  app hash the runs carry: {made.app_hash}", highlight=False)
    console.print(f"  server certificate expires {made.expires:%Y-%m-%d}", highlight=False)
    console.print(
        f"give the folder to the site; register the {site}.pub it sends back with "
        f"`cxr-fl-server register-site {site}.pub --name {site} --run-dir RUN_DIR`",
        highlight=False,
    )


def _previous_overrides(run_dir: Path) -> dict[str, Any]:
    path = RunFolder(run_dir).overrides_path
    if not path.is_file():
        raise fail(f"--resume: {run_dir} holds no earlier run (no {path.name}); start it without --resume")
    return read_toml(path, "--resume")


ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="TOML file of run settings (keys of pyproject's schema).")
]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="Run setting KEY=VALUE (repeatable).")]
CertsOption = Annotated[
    Path | None, typer.Option("--certs", help="Folder made by `cxr-fl-server certs` (TLS).")
]
SiteKeyOption = Annotated[
    list[Path] | None,
    typer.Option("--site-key", help="Register this site public key (NAME.pub) on start (repeatable)."),
]
PortOption = Annotated[
    int | None, typer.Option("--port", help="Port the sites connect to (default 9092; Fleet API only).")
]
HostOption = Annotated[
    str,
    typer.Option(
        "--host", help="Interface the sites connect to (the SuperLink itself listens on 127.0.0.1 only)."
    ),
]
InsecureOption = Annotated[
    bool, typer.Option("--insecure", help="No TLS and no site authentication (testing only).")
]
ResumeOption = Annotated[bool, typer.Option("--resume", help="Continue the run in --run-dir.")]
InMemoryOption = Annotated[
    bool,
    typer.Option(
        "--in-memory/--database",
        help="Keep the SuperLink's state (registered site keys, messages in transit) in memory "
        "(default: each model travels without a SQLite transaction per object, and --resume "
        "registers the known sites again), or in RUN_DIR/superlink.db (--database).",
    ),
]
TimeoutOption = Annotated[
    float | None, typer.Option("--timeout", help="Give up after this many seconds (default: never).")
]
TrackOption = Annotated[
    str | None,
    typer.Option(
        "--track",
        help="Log rounds, DP epsilon, distillation and figures to a local tracker: 'tensorboard' "
        "(event files in RUN_DIR/tensorboard; the run setting 'track').",
    ),
]
InitialTeacherOption = Annotated[
    Path | None,
    typer.Option(
        "--initial-teacher",
        help="Start from this weights file at the coordinator (e.g. from `cxr-fl-server pretrain`); "
        "the run carries the initial teacher's weights hash and sites can pin it.",
    ),
]


@dataclass(frozen=True)
class RunRequest:
    """What ``start`` will submit, checked before the SuperLink starts."""

    overrides: dict[str, Any]
    schema: dict[str, Any]
    port: int | None
    prepared: Any
    """The initial teacher given with --initial-teacher, with its notes (None without one)."""

    @property
    def num_rounds(self) -> int:
        return int({**self.schema, **self.overrides}["num-rounds"])


def _run_request(
    coordinator: Any,
    *,
    resume: bool,
    port: int | None,
    config: Path | None,
    set_: list[str] | None,
    track: str | None,
    initial_teacher: Path | None,
) -> RunRequest:
    """The run's settings (a resumed run's earlier ones first), every check of them passed."""
    from common.run_settings import check_run_config, load_schema, resolve_run_config
    from server.initial_teacher import prepare_initial_teacher

    run_dir = coordinator.run_dir
    schema = load_schema()
    overrides: dict[str, Any] = {}
    if resume:
        overrides = _previous_overrides(run_dir)
        if port is None:
            port = coordinator.read_state().get("port")
    elif RunFolder(run_dir).holds_run():
        raise fail(f"{run_dir} already holds a run: continue it with --resume, or choose a new --run-dir")
    overrides.update(resolve_run_config(schema, config, set_))
    overrides["run-dir"] = str(run_dir)
    if track is not None:
        overrides["track"] = track
    check_run_config(overrides)  # every setting and rule, as server/app.py, before the SuperLink
    prepared = prepare_initial_teacher(overrides, schema, initial_teacher)
    return RunRequest(overrides, schema, port, prepared)


def _warn_inside_app_folder(run_dir: Path) -> None:
    from server.deploy import PROJECT_ROOT

    if run_dir.is_relative_to(PROJECT_ROOT) and not run_dir.is_relative_to(PROJECT_ROOT / "runs"):
        err_console.print(
            f"[bold yellow]warning:[/] {run_dir} is inside the app folder {PROJECT_ROOT}: `flwr run` "
            "packs its .json/.toml/.md files into the app bundle (10 MB cap). Use runs/... "
            "(git-ignored) or a folder outside the project.",
            highlight=False,
        )


def _transport_security(insecure: bool, certs_dir: Path | None, site_key_files: list[Path] | None) -> Any:
    """The SuperLink's TLS files (None with --insecure, after a warning)."""
    from server.deploy import TlsFiles

    tls = None
    if insecure:
        err_console.print(
            "[bold yellow]warning:[/] --insecure: no TLS and no site authentication; anyone who can "
            "reach the port can join. Use only for tests on a trusted machine.",
            highlight=False,
        )
    elif certs_dir is None:
        raise fail(
            "--certs DIR is required for TLS (make it with `cxr-fl-server certs --out DIR --host HOST`), "
            "or pass --insecure for a test on a trusted machine"
        )
    else:
        tls = TlsFiles.from_dir(certs_dir)
    if site_key_files and tls is None:
        raise fail("--site-key needs TLS: site authentication is off with --insecure")
    return tls


def _show_initial_teacher(prepared: Any) -> None:
    if prepared is None:
        return
    teacher, notes = prepared
    console.print(teacher.describe(), highlight=False)
    for note in notes:
        err_console.print(f"[bold yellow]note:[/] {note}", highlight=False)
    console.print(
        f"sites may pin it: cxr-fl-client start --initial-teacher-sha256 {teacher.sha256} ...",
        highlight=False,
    )


def _open_federation(
    coordinator: Any, key_files: list[Path], *, host: str, tls: Any, resume: bool, in_memory: bool
) -> None:
    """Register the sites' keys with the running SuperLink and say how sites join."""
    if resume and in_memory and tls is not None:
        coordinator.reregister_sites()
    for key_file in key_files:
        coordinator.register_site(key_file, key_file.stem)
    state = coordinator.read_state()
    console.print(
        f"SuperLink listening on {host}:{state['port']} "
        f"({'TLS + site authentication' if tls else 'INSECURE'}, Fleet API only; runs and site keys "
        f"are managed from this machine, by this user only, on 127.0.0.1:{state['superlink_port']}); "
        f"run folder {coordinator.run_dir}",
        highlight=False,
    )
    if tls is not None:
        console.print(
            f"sites join with: cxr-fl-client start --server HOST:{state['port']} --ca ca.crt "
            "--key SITE.key "
            "--site NAME --data PATH --format FORMAT --out DIR",
            highlight=False,
        )


def _close_run(coordinator: Any, started: float, gateway_offset: int, web: Any) -> None:
    """Whatever became of the run: tell the sites when it stopped, audit it, stop every process."""
    finished = summary_written(coordinator.run_dir, started)
    if not finished:
        _tell_sites_the_run_stopped(coordinator)
    coordinator.audit_refused_calls(gateway_offset)
    coordinator.record(
        "run-finished" if finished else "run-stopped",
        flower_run_id=coordinator.read_state().get("flower_run_id"),
    )
    coordinator.stop(recorded=False)
    if web is not None:
        web.stop()


def _report_run_end(coordinator: Any, started: float, code: int) -> None:
    """The summary of a finished run; otherwise why it ended, how to resume, exit code 1."""
    run_dir = coordinator.run_dir
    folder = RunFolder(run_dir)
    if folder.summary_written_since(started):
        if folder.summary_markdown_path.is_file():
            console.print(Markdown(folder.summary_markdown_path.read_text(encoding="utf-8")))
        console.print(f"[bold green]run finished[/]: {run_dir}", highlight=False)
        return
    reason = "timed out" if code == -1 else coordinator.failure_reason()
    raise fail(
        f"the run ended without a summary ({reason}); logs: {coordinator.flower_log}. "
        f"Checkpoints are kept: continue with `cxr-fl-server start --run-dir {run_dir} --resume ...`",
        RUN_FAILED_EXIT,
    )


@app.command()
def start(
    run_dir: RunDirOption = Path("runs/federation"),
    config: ConfigOption = None,
    set_: SetOption = None,
    certs_dir: CertsOption = None,
    site_key_files: SiteKeyOption = None,
    port: PortOption = None,
    host: HostOption = "127.0.0.1",
    insecure: InsecureOption = False,
    resume: ResumeOption = False,
    in_memory: InMemoryOption = True,
    timeout: TimeoutOption = None,
    track: TrackOption = None,
    initial_teacher: InitialTeacherOption = None,
    with_console: ConsoleOption = True,
    console_port: ConsolePortOption = 0,
) -> None:
    """Start the SuperLink, submit the run, follow it, print the summary when it ends."""
    from server.deploy import DEFAULT_PORT, Coordinator

    run_dir = run_dir.resolve()
    coordinator = Coordinator(run_dir)
    try:
        request = _run_request(
            coordinator,
            resume=resume,
            port=port,
            config=config,
            set_=set_,
            track=track,
            initial_teacher=initial_teacher,
        )
        port = request.port
        _warn_inside_app_folder(run_dir)
        tls = _transport_security(insecure, certs_dir, site_key_files)
        web = open_console(run_dir, console_port, port or DEFAULT_PORT) if with_console else None
    except CxrFlError as exc:
        raise fail(str(exc)) from None

    _show_initial_teacher(request.prepared)
    started = time.time()
    exit_on_sigterm()
    if web is not None:
        web.start_background()
        announce_console(web, "while this command runs")
    try:
        coordinator.start_superlink(port=port or DEFAULT_PORT, host=host, tls=tls, database=not in_memory)
    except CxrFlError as exc:
        # Only what this process started: another coordinator's SuperLink must survive.
        coordinator.stop(recorded=False)
        raise fail(str(exc)) from None
    gateway_offset = coordinator.gateway_log.stat().st_size if coordinator.gateway_log.is_file() else 0
    try:
        _open_federation(
            coordinator, site_key_files or [], host=host, tls=tls, resume=resume, in_memory=in_memory
        )
        audit_run_start(coordinator, request.overrides, resume)
        code = follow_run(coordinator, request.overrides, request.num_rounds, started, timeout)
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    except (KeyboardInterrupt, SystemExit) as exc:
        how = "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else f"signal, exit code {exc.code}"
        raise fail(
            f"stopped ({how}); the last completed round is checkpointed: continue with "
            f"`cxr-fl-server start --run-dir {run_dir} --resume ...`",
            130,
        ) from None
    finally:
        _close_run(coordinator, started, gateway_offset, web)
    _report_run_end(coordinator, started, code)


@app.command("console")
def console_command(
    run_dir: RunDirOption = Path("runs/federation"),
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1 (default: any free port).")] = 0,
) -> None:
    """Serve the read-only console of a run folder on 127.0.0.1, live while its run goes on."""
    from server.console.web import ConsoleServer

    if not run_dir.is_dir():
        raise fail(f"--run-dir {run_dir}: no such folder; pass the run folder of `cxr-fl-server start`")
    if not 0 <= port <= 65535:
        raise fail(f"--port {port}: pass a port number 1-65535, or 0 for any free port")
    try:
        web = ConsoleServer(run_dir.resolve(), port)
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    announce_console(web, "until Ctrl-C")
    web.serve()


def _tell_sites_the_run_stopped(coordinator: Any) -> None:
    """Mark the run stopped and give the sites a moment to learn it, so that they stop its work;
    a second Ctrl-C or SIGTERM skips the wait, never the teardown that follows."""
    try:
        if not coordinator.superlink_running():
            return
        err_console.print("telling the sites that the run stopped ...", highlight=False)
        coordinator.stop_run_for_sites()
    except (KeyboardInterrupt, SystemExit):
        pass
    except Exception as exc:  # the processes must still be stopped
        err_console.print(f"could not tell the sites that the run stopped: {exc}", highlight=False)


PretrainOutOption = Annotated[
    Path, typer.Option("--out", help="Weights file to write (FILE.json and FILE.sha256 beside).")
]
PublicSourceOption = Annotated[
    list[str],
    typer.Option("--source", help="Public data source format (repeatable; pairs in order with --data)."),
]
PublicDataOption = Annotated[
    list[Path] | None,
    typer.Option("--data", help="Data folder or file of each --source (omit for synthetic)."),
]
SourceOptionOption = Annotated[
    list[str] | None,
    typer.Option("--source-option", "-o", help="Source option KEY=VALUE, or FORMAT.KEY=VALUE (repeatable)."),
]
PretrainTaskOption = Annotated[
    str | None, typer.Option("--task", help="Task to pretrain for (default: the run setting 'task').")
]
PretrainEpochsOption = Annotated[int, typer.Option("--epochs", help="Passes over the pretraining images.")]
PretrainConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="TOML file of run settings (teacher, image size, optimiser...)."),
]
PretrainSetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Run setting KEY=VALUE (repeatable), e.g. teacher-norm=group."),
]
ExcludeManifestOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--exclude-manifest",
        help="Manifest CSV of images that must not be pretrained on (a training pool, a held-out "
        "test set); exact copies are an error (repeatable).",
    ),
]
DropOverlapOption = Annotated[
    bool, typer.Option("--drop-overlap", help="Leave exact copies of --exclude-manifest images out.")
]
PretrainCacheOption = Annotated[
    Path | None, typer.Option("--cache-dir", help="Image cache (default: beside --out, in cache/).")
]
StrictOption = Annotated[bool, typer.Option("--strict", help="Unreadable or missing images are errors.")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")]


def _pretraining_settings(config: Path | None, set_: list[str] | None, task: str | None, epochs: int) -> Any:
    """The run settings pretraining uses (no DP: the images are public), checked."""
    from common.run_settings import (
        check_run_config,
        load_schema,
        resolve_run_config,
        run_settings_from_config,
    )

    overrides = resolve_run_config(load_schema(), config, set_)
    if task is not None:
        overrides["task"] = task
    settings = run_settings_from_config(check_run_config(overrides))
    if settings.privacy.enabled:
        raise fail(
            "dp-enabled = true: pretraining is on public data and runs without DP; drop dp-enabled "
            "from --config/--set (the federation's sites apply DP to their own data)"
        )
    if epochs < 1:
        raise fail(f"--epochs {epochs}: pass an integer >= 1")
    return settings


@app.command()
def pretrain(
    out: PretrainOutOption,
    source: PublicSourceOption,
    data: PublicDataOption = None,
    source_option: SourceOptionOption = None,
    task: PretrainTaskOption = None,
    epochs: PretrainEpochsOption = 5,
    config: PretrainConfigOption = None,
    set_: PretrainSetOption = None,
    exclude_manifest: ExcludeManifestOption = None,
    drop_overlap: DropOverlapOption = False,
    cache_dir: PretrainCacheOption = None,
    strict: StrictOption = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Train the initial teacher on public data; start a federation from it with `start --initial-teacher`."""
    from common.pretrain import check_output

    out = out.resolve()
    try:
        check_output(out, overwrite)
        for manifest in exclude_manifest or []:
            if not manifest.is_file():
                raise fail(f"--exclude-manifest {manifest}: no such file; pass a manifest CSV (path,label)")
        settings = _pretraining_settings(config, set_, task, epochs)
        from common.data.source_pairs import load_sources

        catalog, paths, options = load_sources(
            source, list(data or []), settings.task.name, option_pairs=source_option, strict=strict
        )
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    sources = {
        sid: {"format": sid.split(":")[0], "path": paths[sid], "options": options[sid]} for sid in paths
    }
    _run_pretraining(
        catalog,
        sources,
        settings,
        out,
        epochs=epochs,
        cache_dir=(cache_dir or out.parent / "cache").resolve(),
        exclude=[m.resolve() for m in exclude_manifest or []],
        drop_overlap=drop_overlap,
        strict=strict,
    )


@app.command("initial-teacher")
def initial_teacher_command(
    weights: Annotated[Path, typer.Argument(help="The weights file the federation will start from.")],
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML file of run settings (as given to `start`).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Run setting KEY=VALUE (repeatable), as given to `start`."),
    ] = None,
) -> None:
    """Print the weights hash of the initial teacher a run would start from (for the sites to pin)."""
    from common.run_settings import check_run_config, load_schema, resolve_run_config
    from server.initial_teacher import prepare_initial_teacher

    try:
        schema = load_schema()
        overrides = resolve_run_config(schema, config, set_)
        check_run_config(overrides)
        prepared = prepare_initial_teacher(overrides, schema, weights)
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    if prepared is None:  # not reached: a weights file always gives a teacher
        raise fail(f"{weights}: no initial teacher could be built from it")
    teacher, notes = prepared
    console.print(teacher.describe(), highlight=False)
    for note in notes:
        err_console.print(f"[bold yellow]note:[/] {note}", highlight=False)
    console.print(
        f"sites pin it with: cxr-fl-client start --initial-teacher-sha256 {teacher.sha256} ...",
        highlight=False,
    )


def _run_pretraining(catalog: Any, sources: dict[str, Any], settings: Any, out: Path, **kwargs: Any) -> None:
    import math

    from common.pretrain import pretrain_teacher
    from common.progress import ProgressEvent

    with progress_bar() as bar:
        job = bar.add_task("decoding images", total=len(catalog), detail="(once; cached for later runs)")
        epochs = kwargs["epochs"]

        def on_cached(n_train: int, n_val: int) -> None:
            steps = epochs * math.ceil(n_train / settings.train.batch_size)
            bar.update(
                job,
                description="pretraining",
                total=steps,
                completed=0,
                detail=f"{n_train} train, {n_val} val",
            )

        def on_step(event: ProgressEvent) -> None:
            if event.phase == "train":
                detail = "" if math.isnan(event.loss) else f"loss {event.loss:.4f}"
                bar.update(job, advance=1, detail=detail)

        try:
            result = pretrain_teacher(
                catalog,
                sources,
                settings,
                out,
                progress=on_step,
                on_cached=on_cached,
                on_decoded=lambda done, total: bar.update(job, completed=done, total=total),
                **kwargs,
            )
        except CxrFlError as exc:
            raise fail(str(exc)) from None
    meta = result.metadata
    images = meta["images"]
    console.print(
        f"pretrained {meta['teacher']['name']} ({meta['teacher']['norm']} norm) for task {meta['task']} "
        f"on {images['train']} images ({images['val']} held out for validation"
        + (
            f", {images['dropped_overlap']} dropped as copies of excluded images"
            if images["dropped_overlap"]
            else ""
        )
        + ")",
        highlight=False,
    )
    for row in meta["sources"]:
        console.print(
            f"  {row['id']}: {row['images']} images from {row['path'] or '(generated)'}", highlight=False
        )
    for check in meta["overlap_checks"]:
        console.print(
            f"  overlap with {check['manifest']}: {check['overlapping_images']} of its "
            f"{check['manifest_images']} images",
            highlight=False,
        )
    if meta["val_metrics"]:
        shown = ", ".join(
            f"{k} {v:.4f}" for k, v in meta["val_metrics"].items() if k in ("val_loss", "val_auroc_macro")
        )
        console.print(f"  validation: {shown}", highlight=False)
    console.print(f"weights: {result.weights}", highlight=False)
    console.print(f"sidecar: {result.sidecar}", highlight=False)
    console.print(f"weights sha256: {result.weights_sha256}", highlight=False)
    console.print(
        f"start a federation from it: cxr-fl-server start --initial-teacher {result.weights} ...",
        highlight=False,
    )


@app.command()
def status(run_dir: RunDirOption = Path("runs/federation")) -> None:
    """Is the SuperLink of a run folder up, which Flower run, the last completed round."""
    from server.deploy import LOOPBACK, Coordinator

    coordinator = Coordinator(run_dir)
    state = coordinator.read_state()
    if not state:
        raise fail(f"{run_dir} holds no deployment (no deploy.json); start one with `cxr-fl-server start`")
    up = coordinator.superlink_running() and ("superlink_port" not in state or coordinator.gateway_running())
    console.print(
        f"SuperLink {state['host']}:{state['port']}: "
        + (f"[green]up[/] (PID {state['superlink_pid']})" if up else "[red]down[/]"),
        highlight=False,
    )
    if "superlink_port" in state:
        gateway_up = coordinator.gateway_running()
        console.print(
            f"  sites' address {state['host']}:{state['port']}: Fleet API only "
            + (f"(gateway PID {state['gateway_pid']})" if gateway_up else "[red](gateway down)[/]")
            + f"; Control API on {LOOPBACK}:{state['superlink_port']} (this machine only)",
            highlight=False,
        )
    console.print(f"Flower run: {state.get('flower_run_id') or '-'}", highlight=False)
    folder = RunFolder(run_dir)
    checkpoint = folder.state_path
    if checkpoint.is_file():
        saved = json.loads(checkpoint.read_text(encoding="utf-8"))
        console.print(
            f"last completed round: {saved['completed_round']} (best round {saved['best_round']})",
            highlight=False,
        )
    else:
        console.print("last completed round: none yet", highlight=False)
    console.print(f"sites registered: {', '.join(s['name'] for s in coordinator.read_sites()) or '-'}")
    if folder.summary_path.is_file():
        console.print(f"finished: summary in {folder.summary_path}", highlight=False)
    _certificate_status(state)
    _audit_status(coordinator)


def _certificate_status(state: dict[str, Any]) -> None:
    """When the sites' certificate expires; a warning within EXPIRY_WARNING_DAYS."""
    from common.pki import EXPIRY_WARNING_DAYS, days_left, load_certificate

    if not state.get("server_cert"):
        return
    try:
        cert = load_certificate(Path(state["server_cert"]), "server certificate")
    except CxrFlError as exc:
        err_console.print(f"[bold yellow]warning:[/] {exc}", highlight=False)
        return
    left = days_left(cert)
    line = f"server certificate: expires {cert.not_valid_after_utc:%Y-%m-%d} ({left:.0f} days)"
    if left < EXPIRY_WARNING_DAYS:
        err_console.print(
            f"[bold yellow]warning:[/] {line}: make new ones with `cxr-fl-server certs` and send the sites "
            "new kits before then"
            if left > 0
            else f"[bold red]error:[/] {line}: sites cannot connect",
            highlight=False,
        )
    else:
        console.print(line, highlight=False)


def _audit_status(coordinator: Any) -> None:
    """The audit log's head, to be kept elsewhere as an anchor (`audit verify --anchor`)."""
    from common.audit import AuditChainError

    try:
        head = coordinator.audit.head()
    except AuditChainError as exc:
        err_console.print(f"[bold red]audit log broken:[/] {exc}", highlight=False)
        return
    console.print(
        f"audit head: {head or '-'} (keep it: `cxr-fl-server audit verify --anchor ...`)", highlight=False
    )


def _cmdline(pid: int) -> str:
    """The command line of a process (to make sure a recorded PID was not reused by another)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@app.command()
def stop(run_dir: RunDirOption = Path("runs/federation")) -> None:
    """Stop the coordinator and SuperLink of a run folder (by the PIDs recorded in it)."""
    from common.processes import pid_alive, stop_pid_tree
    from server.deploy import Coordinator

    coordinator = Coordinator(run_dir)
    _tell_sites_the_run_stopped(coordinator)  # first, while its SuperLink still answers them

    state = coordinator.read_state()
    stopped = False
    for key, programs in (
        ("coordinator_pid", ("cxr-fl-server",)),
        ("gateway_pid", ("server.fleet_gateway",)),
        # flower_adapter.superlink_owner_only runs the SuperLink; older run folders recorded
        # server.superlink_owner_only or flower-superlink
        (
            "superlink_pid",
            ("flower_adapter.superlink_owner_only", "server.superlink_owner_only", "flower-superlink"),
        ),
    ):
        pid = state.get(key)
        if (
            pid
            and int(pid) != os.getpid()
            and pid_alive(int(pid))
            and any(program in _cmdline(int(pid)) for program in programs)
        ):
            stop_pid_tree(int(pid))
            stopped = True
    if stopped:
        coordinator.record("run-stopped", flower_run_id=state.get("flower_run_id"), by="cxr-fl-server stop")
    console.print("stopped" if stopped else "nothing was running", highlight=False)


audit_app = typer_app("audit", "The coordinator's hash-chained audit log.")
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(
    run_dir: RunDirOption = Path("runs/federation"),
    anchor: Annotated[
        str | None,
        typer.Option(
            "--anchor", help="A head kept elsewhere (SEQ:HASH, from `status`): finds a cut tail or a rewrite."
        ),
    ] = None,
) -> None:
    """Check every entry of RUN_DIR/audit.jsonl: edited, removed or reordered entries fail (exit 1)."""
    from common.audit import AUDIT_FILE, AuditChainError, AuditHead, verify_chain

    try:
        report = verify_chain(run_dir / AUDIT_FILE, AuditHead.parse(anchor) if anchor else None)
    except AuditChainError as exc:
        raise fail(f"audit log NOT intact: {exc}", RUN_FAILED_EXIT) from None
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    console.print(
        f"audit log intact: {len(report.entries)} entries, head {report.head or '-'}"
        + (" (matches the anchor)" if anchor else ""),
        highlight=False,
    )


app.command("evaluate")(evaluate_command)
app.command("serve")(serve_command)
app.command("submit")(submit_command)


def main() -> None:
    """Console-script entry point (``cxr-fl-server``)."""
    app()


if __name__ == "__main__":
    sys.exit(main())
