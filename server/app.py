"""The Flower ServerApp: teacher rounds, then the distillation round, then the run summary.

A run with ``evaluate-model`` is an evaluation-only run instead: every site scores that model
and the coordinator writes the cross-site table (server/cross_site.py).

With ``bn-statistics = "federated"`` the teacher's aggregate of every round and the federated
student's last aggregate get BatchNorm statistics pooled from the sites (server/batchnorm.py).

Wiring only: settings come from ``context.run_config`` (typed on the first lines), the round
loop lives in server/rounds.py, the run folder in server/run_folder.py, the ML in common/.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch.utils.data import DataLoader

from common.checkpoint import save_model
from common.errors import CxrFlError
from common.jsonio import write_json
from common.local import (
    SiteData,
    student_config,
)
from common.models import build_model
from common.protocol import (
    AUDIT_RECORD,
    DISTILL_MESSAGE_TYPE,
    FINISH_MESSAGE_TYPE,
    STUDENT_FINAL_MESSAGE_TYPE,
    STUDENT_ROUND_MESSAGE_TYPE,
    STUDENT_START_KEY,
)
from common.run_settings import FederatedRunConfig, run_settings_from_config
from common.training import seed_everything
from flower_adapter.grid import quick_reply_grid
from server.aggregation import Screened, aggregate_train, screen_train_replies
from server.batchnorm import federated_batchnorm, pool_delivered_teacher
from server.central_dp import CentralDP, with_central_dp
from server.central_evaluation import BestOnHoldout, central_loader, central_scorer
from server.initial_teacher import initial_global_teacher
from server.progress_events import Progress, announce
from server.public_student import distil_public_student, load_public_images
from server.reporting import write_learning_curves, write_summary
from server.rounds import (
    RoundFailedError,
    SiteOutcome,
    TeacherRounds,
    aggregated_counts,
    collect,
    mark_dropped,
    wait_for_sites,
)
from server.run_folder import CoordinatorFolder, ResumeState, RunFolder
from server.site_identity import SiteDirectory
from server.strategies import StrategySettings, build_strategy
from server.tracking import finish_tracking, start_tracking

logger = logging.getLogger(__name__)

app = ServerApp()


FINISH_TIMEOUT = 60.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def attach_run_logging(run_dir: Path) -> None:
    """Send the project's log lines to RUN_DIR/server.log and to the app's stdout (flwr log)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = str(RunFolder(run_dir).log_path)
    for name in ("server", "common"):
        project_logger = logging.getLogger(name)
        project_logger.setLevel(logging.INFO)
        if not any(getattr(h, "baseFilename", None) == log_file for h in project_logger.handlers):
            file_handler = logging.FileHandler(log_file, encoding="utf-8")
            file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
            project_logger.addHandler(file_handler)
        if not any(type(h) is logging.StreamHandler for h in project_logger.handlers):
            console = logging.StreamHandler(sys.stdout)
            console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            project_logger.addHandler(console)
        project_logger.propagate = False


def default_run_dir(context: Context) -> Path:
    return Path.home() / ".cxr-fl" / "runs" / f"run-{context.run_id}"


def initial_teacher(settings: FederatedRunConfig) -> ArrayRecord:
    """The round-1 global teacher; IntegrityError unless it has the run's initial-teacher-sha256."""
    return ArrayRecord(initial_global_teacher(settings).state)


def broadcast(
    grid: Grid,
    arrays: ArrayRecord,
    message_type: str,
    config: dict[str, Any],
    settings: FederatedRunConfig,
    min_sites: int,
    names: dict[int, str],
    extra: dict[str, ArrayRecord] | None = None,
) -> tuple[list[Message], list[SiteOutcome]]:
    """Send the same arrays (and ``extra`` named arrays) to every connected site (a distillation
    phase, waiting up to ``distill-round-timeout``); return the replies and each site's outcome."""
    nodes = wait_for_sites(grid, min_sites, settings.run.site_wait_timeout)
    messages = [
        Message(
            RecordDict({"arrays": arrays, **(extra or {}), "config": ConfigRecord(config)}),
            dst_node_id=node,
            message_type=message_type,
        )
        for node in nodes
    ]
    replies, outcomes = collect(grid, messages, settings.run.distill_round_timeout, names)
    for outcome in outcomes:
        if outcome.status != "ok":
            logger.warning("%s at site %s %s: %s", message_type, outcome.site, outcome.status, outcome.reason)
    return replies, outcomes


def distillation_round(
    grid: Grid,
    teacher: ArrayRecord,
    settings: FederatedRunConfig,
    min_sites: int,
    names: dict[int, str],
    student: ArrayRecord | None = None,
) -> list[dict[str, object]]:
    """Send the chosen global teacher (and the students' start, when the coordinator distilled one
    on public images) to every connected site; collect their metrics."""
    extra = {STUDENT_START_KEY: student} if student is not None else None
    _, outcomes = broadcast(
        grid, teacher, DISTILL_MESSAGE_TYPE, {"phase": "distill"}, settings, min_sites, names, extra
    )
    return [o.row(settings.run.num_rounds, "distill") for o in outcomes]


def student_statistics(
    grid: Grid,
    settings: FederatedRunConfig,
    names: dict[int, str],
    student: ArrayRecord,
    last_round: tuple[int, list[SiteOutcome]],
) -> tuple[ArrayRecord, list[dict[str, object]]]:
    """The final global student with BatchNorm statistics pooled from the sites of its last
    round (``bn-statistics = "federated"``), and the sites' rows; as it was otherwise."""
    phase = federated_batchnorm(grid, settings, "student", names)
    if phase is None:
        return student, []
    server_round, outcomes = last_round
    update = phase.update(server_round, student, aggregated_counts(outcomes))
    return update.arrays, [o.row(server_round, "bn-statistics-student") for o in update.outcomes]


def federated_student(
    grid: Grid,
    folder: RunFolder,
    settings: FederatedRunConfig,
    strategy_settings: StrategySettings,
    names: dict[int, str],
    start: ArrayRecord | None = None,
    central: DataLoader | None = None,
) -> list[dict[str, object]]:
    """Aggregate the sites' distilled students into one global student over a few extra rounds,
    from the coordinator's public-image student when there is one (``start``).

    With ``select-on = "coordinator"`` the student delivered is the one of these rounds, the start
    included (round 0), that scores best on the coordinator's hold-out (``central``), not the last.

    The rounds go through the run's configured strategy, a fresh instance of it (the teacher's
    server-side optimiser state is not the student's): FedAvg/FedProx average the students,
    FedMedian and Krum aggregate them robustly, FedAdam/FedYogi take a server optimiser step
    from the round's global student.
    """
    strategy = build_strategy(strategy_settings)
    min_sites = strategy_settings.min_train_sites
    seed_everything(settings.distill.seed)
    config = student_config(settings.distill, settings.teacher, settings.teacher.norm)
    student = start or ArrayRecord(build_model(config, settings.task.num_classes).state_dict())
    rows: list[dict[str, object]] = []
    selection = student_selection(settings, central)
    if selection is not None:
        rows.append(central_row(0, selection.offer(0, student)))
    for student_round in range(1, settings.kd_federated_student_rounds + 1):
        round_started = time.monotonic()
        replies, outcomes = broadcast(
            grid,
            student,
            STUDENT_ROUND_MESSAGE_TYPE,
            {"server-round": student_round},
            settings,
            min_sites,
            names,
        )
        screened = screened_students(student_round, student, replies, outcomes, min_sites)
        rows += [o.row(student_round, "student") for o in outcomes]
        if hasattr(strategy, "current_arrays"):  # FedAdam/FedYogi: the step starts from this round's student
            strategy.current_arrays = {k: array.numpy() for k, array in student.items()}
        aggregated, _ = aggregate_train(strategy, student_round, screened)
        if aggregated is None:
            raise RoundFailedError(f"federated student round {student_round}: no student could be aggregated")
        student = aggregated
        if selection is not None:
            rows.append(central_row(student_round, selection.offer(student_round, student)))
        step = Progress(
            student_round,
            settings.kd_federated_student_rounds,
            replied=len(screened.replies),
            phase="student",
            seconds=time.monotonic() - round_started,
        )
        announce(folder, step, logger)
    student = selected_student(selection, student, settings.kd_federated_student_rounds)
    student, bn_rows = student_statistics(
        grid, settings, names, student, (settings.kd_federated_student_rounds, outcomes)
    )
    rows += bn_rows
    save_model(
        student.to_torch_state_dict(), folder.checkpoint("student"), metadata={"role": "global student"}
    )
    _, outcomes = broadcast(
        grid, student, STUDENT_FINAL_MESSAGE_TYPE, {"phase": "student"}, settings, min_sites, names
    )
    rows += [o.row(settings.kd_federated_student_rounds, "student-final") for o in outcomes]
    return rows


def screened_students(
    student_round: int,
    student: ArrayRecord,
    replies: list[Message],
    outcomes: list[SiteOutcome],
    min_sites: int,
) -> Screened:
    """The round's replies that can be aggregated (the others marked dropped in ``outcomes``);
    RoundFailedError when fewer than ``min_sites`` are left."""
    screened = screen_train_replies(replies, student)
    mark_dropped(outcomes, screened.dropped)
    for outcome in outcomes:
        if outcome.node_id in screened.dropped:
            reason = outcome.reason
            logger.warning("Federated student round %d: site %s: %s", student_round, outcome.site, reason)
    if len(screened.replies) < min_sites:
        reasons = "".join(f"; {o.site}: {o.status} ({o.reason})" for o in outcomes if o.status != "ok")
        raise RoundFailedError(
            f"federated student round {student_round}: {len(screened.replies)} site(s) sent a student "
            f"that can be aggregated, the minimum is {min_sites}{reasons}"
        )
    return screened


def selected_student(selection: BestOnHoldout | None, last: ArrayRecord, rounds: int) -> ArrayRecord:
    """The student to deliver: the last round's, or the coordinator's choice on its hold-out."""
    if selection is None or selection.best is None:
        return last
    logger.info(
        "Federated student: round %d of %d delivered (best %s on the coordinator's hold-out, %.4f)",
        selection.best_round,
        rounds,
        selection.metric,
        selection.best_metric,
    )
    return selection.best


def student_selection(settings: FederatedRunConfig, central: DataLoader | None) -> BestOnHoldout | None:
    """The coordinator's choice among the federated students (``select-on = "coordinator"``)."""
    if settings.run.select_on != "coordinator" or central is None:
        return None
    return BestOnHoldout(central_scorer(settings, central, student=True), settings.run.selection_metric)


def central_row(student_round: int, metrics: dict[str, float]) -> dict[str, object]:
    """metrics.jsonl's row of a global student on the coordinator's hold-out."""
    return {"round": student_round, "phase": "student-central", "site": "_global", **metrics}


def federated_student_phase(
    grid: Grid,
    folder: RunFolder,
    settings: FederatedRunConfig,
    strategy_settings: StrategySettings,
    names: dict[int, str],
    *,
    central_dp: bool = False,
    start: ArrayRecord | None = None,
    central: DataLoader | None = None,
) -> str:
    """Run the federated student when the run asks for it; say what became of it (summary.json).

    It is skipped under DP, DP-SGD at the sites or central DP of the teacher's rounds (its
    rounds send weights trained on the sites' images, which no privacy budget covers), and a
    federated student that cannot be completed (too few sites replied) ends the phase, not the
    run: every site keeps its own distilled student, which its ``delivered.json`` already names.
    """
    rounds = settings.kd_federated_student_rounds
    if rounds < 1:
        return "off (kd-federated-student-rounds = 0): each site delivers its own student"
    if settings.uses_dp or central_dp:
        logger.warning(
            "Federated student skipped: its rounds would send weights trained on the sites' images "
            "without DP. Each site delivers the student it distilled locally "
            "(set kd-federated-student-rounds = 0 to silence this)."
        )
        return "skipped under DP: each site delivers its own student"
    try:
        student_rows = federated_student(grid, folder, settings, strategy_settings, names, start, central)
    except RoundFailedError as exc:
        logger.warning("Federated student not completed (%s): each site keeps its own student.", exc)
        return f"not completed ({exc}): each site delivers its own student"
    folder.append_metrics(student_rows)
    write_json(folder.federated_student_path, student_rows)
    return f"delivered after {rounds} round(s): see each site's delivered.json"


def announce_finish(grid: Grid, settings: FederatedRunConfig, names: dict[int, str]) -> None:
    """Tell every connected site that the run is over (sites' CLIs stop on it)."""
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"phase": "finish"})}),
            dst_node_id=node,
            message_type=FINISH_MESSAGE_TYPE,
        )
        for node in sorted(grid.get_node_ids())
    ]
    replies, outcomes = collect(grid, messages, min(settings.run.round_timeout, FINISH_TIMEOUT), names)
    for outcome in outcomes:
        if outcome.status != "ok":
            logger.warning("Site %s did not acknowledge the end of the run: %s", outcome.site, outcome.reason)
    if settings.run.run_dir:
        record_site_audit_heads(coordinator_root(settings), replies, names)


def coordinator_root(settings: FederatedRunConfig) -> Path:
    """The coordinator's folder (registered sites, audit log): ``coordinator-dir``, else the run's."""
    return Path(settings.run.coordinator_dir or settings.run.run_dir)


def record_site_audit_heads(run_dir: Path, replies: list[Message], names: dict[int, str]) -> None:
    """Each deployed site's audit head (its finish reply's hash) in the coordinator's audit log:
    the anchor its log is verified against later. A value that is no hash is left out, logged."""
    from common.audit import AUDIT_FILE, AuditLog

    log = AuditLog(run_dir / AUDIT_FILE)
    for reply in replies:
        record = reply.content.config_records.get(AUDIT_RECORD) if reply.has_content() else None
        if record is None:
            continue
        site = names.get(reply.metadata.src_node_id, f"node-{reply.metadata.src_node_id}")
        head = record.get("head")
        if not (isinstance(head, str) and len(head) == 64 and all(c in "0123456789abcdef" for c in head)):
            logger.warning("Site %s sent an audit head that is not a SHA-256; not recorded", site)
            continue
        try:
            log.append("site-audit-head", site=site, head=head)
        except (CxrFlError, OSError) as exc:
            logger.error("could not record site %s's audit head in %s: %s", site, log.path, exc)


def evaluate_only(
    grid: Grid,
    context: Context,
    settings: FederatedRunConfig,
    strategy_settings: StrategySettings,
    run_dir: Path,
) -> None:
    """Every site scores the run's ``evaluate-model``; the cross-site table goes to the run folder."""
    from server.cross_site import evaluate_everywhere

    torch.set_num_threads(settings.train.num_threads)
    names = SiteDirectory(CoordinatorFolder(run_dir).sites_path)
    folder = evaluate_everywhere(
        grid, settings, run_dir, context.run_id, strategy_settings.min_available_sites
    )
    announce_finish(grid, settings, names)
    logger.info("Evaluation finished; cross-site table in %s", folder)


def open_run_folder(run_dir: Path, run_config: Mapping[str, Any]) -> tuple[RunFolder, ResumeState | None]:
    """The run folder, checked against an earlier start's settings; on a resume, its metrics and
    events trimmed to what the resumed run does not do again (a fresh start keeps no events)."""
    folder = RunFolder(run_dir)
    resume = folder.prepare(dict(run_config))
    if resume is not None:
        folder.drop_metrics_after(resume.completed_round, resume.validated_round)
    folder.drop_events_after(*((resume.completed_round, resume.validated_round) if resume else (0, 0)))
    logger.info("Run folder: %s", run_dir)
    return folder, resume


def coordinator_strategy(settings: FederatedRunConfig, resume: ResumeState | None) -> FedAvg:
    """The run's strategy, wrapped in central DP when the run asks for it."""
    strategy = build_strategy(settings.strategy)
    strategy = with_central_dp(strategy, settings.central_dp, settings.strategy.min_train_sites)
    if isinstance(strategy, CentralDP) and resume is not None:  # epsilon counts every released round
        strategy.releases = resume.completed_round
    return strategy


def teacher_phase(
    grid: Grid,
    folder: RunFolder,
    settings: FederatedRunConfig,
    strategy_settings: StrategySettings,
    strategy: FedAvg,
    resume: ResumeState | None,
    central: DataLoader | None = None,
) -> tuple[TeacherRounds, int]:
    """The teacher rounds (those a resumed run has not completed), the learning curves and the
    delivered teacher's pooled BatchNorm statistics; returns the rounds and the best round."""
    rounds = TeacherRounds(
        grid,
        strategy,
        folder,
        num_rounds=settings.run.num_rounds,
        round_timeout=settings.run.round_timeout,
        site_wait_timeout=settings.run.site_wait_timeout,
        selection_metric=settings.run.selection_metric,
        seed=settings.train.seed,
        min_train_sites=strategy_settings.min_train_sites,
        min_evaluate_sites=strategy_settings.min_evaluate_sites,
        central_evaluate=central_scorer(settings, central) if central is not None else None,
        validation_mode=settings.run.validation_mode,
        select_on_coordinator=settings.run.select_on == "coordinator",
    )
    if settings.run.coordinator_dir:  # a run submitted to `serve`: the sites it registered
        rounds.site_names = SiteDirectory(CoordinatorFolder(coordinator_root(settings)).sites_path)
    if settings.run.bn_statistics == "every-round":
        teacher_statistics = federated_batchnorm(grid, settings, "teacher", rounds.site_names)
        rounds.batchnorm = teacher_statistics.update if teacher_statistics is not None else None
    if resume is not None and resume.validated_round >= settings.run.num_rounds:
        logger.info("All %d teacher rounds already completed in %s", settings.run.num_rounds, folder.root)
        best_round = resume.best_round
    else:
        best_round = rounds.run(initial_teacher(settings), resume).best_round
    write_learning_curves(folder, settings.run.selection_metric)
    pool_delivered_teacher(grid, folder, settings, rounds.site_names)
    return rounds, best_round


@dataclass(frozen=True)
class StudentsOutcome:
    """What the students' phases leave for the summary."""

    distill_rows: list[dict[str, object]] = field(default_factory=list)
    start_record: dict[str, object] | None = None
    federated_student: str = "off (kd-enabled = false)"


def students_phase(
    grid: Grid,
    folder: RunFolder,
    settings: FederatedRunConfig,
    strategy_settings: StrategySettings,
    names: dict[int, str],
    public: SiteData | None,
    *,
    central_dp: bool,
    central: DataLoader | None = None,
) -> StudentsOutcome:
    """The students' start at the coordinator (with public images), the sites' distillation and
    the federated student."""
    teacher = ArrayRecord(folder.load_model(settings.run.distill_teacher))
    student_start, start_record = (
        distil_public_student(folder, settings, teacher, public) if public is not None else (None, None)
    )
    announce(folder, Progress(-1, -1, phase="distill", teacher=settings.run.distill_teacher), logger)
    distill_rows = distillation_round(
        grid, teacher, settings, strategy_settings.min_available_sites, names, student_start
    )
    folder.append_metrics(distill_rows)
    write_json(folder.distillation_path, distill_rows)
    note = federated_student_phase(
        grid,
        folder,
        settings,
        strategy_settings,
        names,
        central_dp=central_dp,
        start=student_start,
        central=central,
    )
    return StudentsOutcome(distill_rows, start_record, note)


@app.main()
def main(grid: Grid, context: Context) -> None:
    grid = quick_reply_grid(grid)  # Flower's deployed grid waits 3 s between reply pulls
    settings = run_settings_from_config(context.run_config)
    strategy_settings = settings.strategy
    run_dir = Path(settings.run.run_dir) if settings.run.run_dir else default_run_dir(context)
    attach_run_logging(run_dir)
    if settings.run.evaluate_model:  # an evaluation-only run (server/cross_site.py)
        evaluate_only(grid, context, settings, strategy_settings, run_dir)
        return
    folder, resume = open_run_folder(run_dir, context.run_config)
    tracker = start_tracking(folder, context.run_config)
    torch.set_num_threads(settings.train.num_threads)
    public = load_public_images(settings, run_dir) if settings.kd_enabled else None
    central = central_loader(settings)

    strategy = coordinator_strategy(settings, resume)
    started = time.monotonic()
    rounds, best_round = teacher_phase(grid, folder, settings, strategy_settings, strategy, resume, central)
    students = StudentsOutcome()
    if settings.kd_enabled:
        central_dp = isinstance(strategy, CentralDP)
        students = students_phase(
            grid,
            folder,
            settings,
            strategy_settings,
            rounds.site_names,
            public,
            central_dp=central_dp,
            central=central,
        )

    if settings.run.cross_site_matrix and settings.kd_enabled and not settings.uses_dp:
        from server.cross_site import cross_site_matrix

        cross_site_matrix(grid, settings, run_dir, rounds.site_names)
    announce_finish(grid, settings, rounds.site_names)
    write_summary(
        folder,
        settings=settings,
        strategy=strategy_settings.strategy,
        best_round=best_round,
        distill_rows=students.distill_rows,
        seconds=time.monotonic() - started,
        federated_student=students.federated_student,
        students_start=students.start_record,
    )
    finish_tracking(tracker, folder)
    logger.info("Run finished; summary in %s", folder.summary_path)
