"""The ServerApp's progress events read back by every follower, and the log lines worded for people."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

from server.progress_events import EventFollower, Progress, announce, last_progress
from server.progress_lines import RESUME_ADVICE, without_resume_advice
from server.run_folder import RunFolder


def round_trip(progress: Progress) -> Progress:
    back = Progress.from_event(progress.to_event())
    assert back is not None
    return back


def teacher_round(server_round: int, rounds: int, metric: float | None, seconds: float = 9.5) -> Progress:
    return Progress(
        server_round,
        rounds,
        replied=2,
        sampled=3,
        train_loss=0.5,
        metric_name="auroc_macro" if metric is not None else "",
        metric=metric,
        best_round=server_round,
        seconds=seconds,
    )


def test_a_round_event_reads_back_with_its_sites_metric_and_seconds() -> None:
    progress = round_trip(teacher_round(3, 7, 0.75, seconds=18.44))

    assert (progress.completed_round, progress.num_rounds, progress.replied, progress.sampled) == (3, 7, 2, 3)
    assert (progress.phase, progress.metric_name, progress.metric) == ("teacher", "auroc_macro", 0.75)
    assert progress.seconds == pytest.approx(18.44)
    assert Progress.from_event({"phase": "teacher", "round": "2", "rounds": 5}) is None  # not a number
    assert Progress.from_event({"phase": "gossip", "round": 2, "rounds": 5}) is None


def test_the_log_lines_keep_their_wording(tmp_path: Path) -> None:
    assert teacher_round(3, 7, 0.75).line(tmp_path) == (
        "Round 3/7: 2/3 sites trained, train loss 0.5000, val auroc_macro 0.7500 (best round 3), 9.5 s"
    )
    assert teacher_round(2, 4, None, seconds=3.0).line(tmp_path) == (
        "Round 2/4: 2/3 sites trained, train loss 0.5000, 3.0 s"
    )
    validation = Progress(
        2, 5, replied=3, metric_name="auroc_macro", metric=0.81234, phase="validation", best_round=2
    )
    assert validation.line(tmp_path) == "Round 2/5 validation: 3 site(s), auroc_macro 0.8123 (best round 2)"
    resume = Progress(2, 7, phase="resume", metric_name="loss", best_round=1, best_metric=0.3)
    assert resume.line(Path("/runs/a")) == (
        "Resuming run in /runs/a after round 2 of 7 (best so far: round 1, loss = 0.3000)"
    )
    assert Progress(-1, -1, replied=2160, phase="start", epochs=6).line(tmp_path) == (
        "Students' start: distilling the teacher on 2160 public images (6 epochs)"
    )
    assert Progress(-1, -1, phase="distill", teacher="best").line(tmp_path) == (
        "Distillation round: sending the best global teacher to every site"
    )
    student = Progress(2, 4, replied=3, phase="student", seconds=9.06)
    assert student.line(tmp_path) == "Federated student round 2/4: 3 sites, 9.1 s"


def test_a_round_validated_later_has_no_metric_and_an_undefined_one_stays_undefined() -> None:
    later = round_trip(teacher_round(2, 4, None))
    assert (later.metric_name, later.metric) == ("", None)
    undefined = round_trip(teacher_round(1, 4, math.nan))
    assert undefined.metric is not None
    assert math.isnan(undefined.metric)


def test_a_simulation_failure_does_not_advise_resume() -> None:
    details = f"round 2: only 1 site(s) trained, the minimum is 2. site_01: error (x) {RESUME_ADVICE}"
    assert "--resume" not in without_resume_advice(details)
    assert without_resume_advice(details).endswith("site_01: error (x)")


def test_student_and_validation_events_have_their_own_phase() -> None:
    student = round_trip(Progress(2, 4, replied=3, phase="student", seconds=9.06))
    assert (student.phase, student.completed_round, student.num_rounds, student.replied) == (
        "student",
        2,
        4,
        3,
    )
    assert student.seconds == pytest.approx(9.06)
    validation = round_trip(
        Progress(2, 5, replied=3, metric_name="auroc_macro", metric=0.8123, phase="validation", best_round=2)
    )
    assert (validation.phase, validation.completed_round, validation.replied) == ("validation", 2, 3)
    assert (validation.metric_name, validation.metric) == ("auroc_macro", pytest.approx(0.8123))


def test_announce_writes_the_event_before_its_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = RunFolder(tmp_path / "run")
    log = logging.getLogger("server.rounds")
    seen_on_log: list[int] = []

    class Witness(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen_on_log.append(len(folder.read_events()))

    witness = Witness()
    log.addHandler(witness)
    try:
        with caplog.at_level(logging.INFO, logger="server.rounds"):
            announce(folder, teacher_round(1, 2, 0.7), log)
    finally:
        log.removeHandler(witness)

    assert seen_on_log == [1]
    assert "Round 1/2: 2/3 sites trained" in caplog.text
    latest = last_progress(folder)
    assert latest is not None
    assert (latest.completed_round, latest.metric) == (1, 0.7)


def test_a_follower_hears_each_new_event_once_and_skips_a_line_being_written(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    folder.append_event({**teacher_round(1, 3, 0.6).to_event(), "time": 10.0})  # an earlier start
    heard: list[Progress] = []
    follower = EventFollower(folder, heard.append, since=20.0)

    folder.append_event({**teacher_round(2, 3, 0.7).to_event(), "time": 21.0})
    follower.poll()
    with folder.events_path.open("a") as events:
        events.write('{"phase": "teach')
    follower.poll()

    assert [p.completed_round for p in heard] == [2]


def test_a_resume_keeps_the_events_of_what_it_does_not_do_again(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    steps = [
        teacher_round(1, 3, None),
        Progress(1, 3, replied=2, metric_name="auroc_macro", metric=0.6, phase="validation", best_round=1),
        teacher_round(2, 3, None),
        Progress(2, 3, replied=2, metric_name="auroc_macro", metric=0.7, phase="validation", best_round=2),
        teacher_round(3, 3, None),
        Progress(-1, -1, phase="distill", teacher="best"),
    ]
    for step in steps:
        folder.append_event(step.to_event())

    folder.drop_events_after(3, validated_round=2)  # round 3 awaits its validation

    kept = [(e["phase"], e["round"]) for e in folder.read_events()]
    assert kept == [("teacher", 1), ("validation", 1), ("teacher", 2), ("validation", 2), ("teacher", 3)]
    folder.drop_events_after(0, 0)  # a fresh start
    assert folder.read_events() == []
