"""The ServerApp's progress lines read back by the parser that follows a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.progress_lines import (
    RESUME_ADVICE,
    distill_line,
    parse_progress,
    resume_line,
    round_line,
    start_line,
    student_round_line,
    validation_line,
    without_resume_advice,
)


def test_progress_from_round_lines() -> None:
    line = (
        "INFO server.rounds: Round 2/5: 1/2 sites trained, train loss 1.1007, "
        "val auroc_macro 0.6164 (best round 2), 60.4 s"
    )
    progress = parse_progress(line)
    assert progress is not None
    assert (progress.completed_round, progress.num_rounds, progress.replied, progress.sampled) == (2, 5, 1, 2)
    assert progress.metric_name == "auroc_macro"
    assert progress.metric == pytest.approx(0.6164)
    resumed = parse_progress("INFO server.rounds: Resuming run in /x after round 1 of 3 (best so far: ...)")
    assert resumed is not None
    assert (resumed.completed_round, resumed.num_rounds) == (1, 3)
    distill = parse_progress("INFO server.app: Distillation round: sending the best global teacher")
    assert distill is not None
    assert distill.phase == "distill"
    assert parse_progress("INFO :      configure_train: Sampled 2 nodes (out of 2)") is None


def test_the_lines_the_server_writes_are_the_lines_the_parser_reads() -> None:
    progress = parse_progress(
        "INFO server.rounds: " + round_line(3, 7, 2, 3, 0.5, "auroc_macro", 0.75, 3, 9.5)
    )
    assert progress is not None
    assert (progress.completed_round, progress.num_rounds, progress.replied, progress.sampled) == (3, 7, 2, 3)
    assert (progress.metric_name, progress.metric) == ("auroc_macro", 0.75)
    resumed = parse_progress(resume_line(Path("/runs/a"), 2, 7, 1, "loss", 0.3))
    assert resumed is not None
    assert (resumed.completed_round, resumed.num_rounds) == (2, 7)
    distill = parse_progress(distill_line("best"))
    assert distill is not None
    assert distill.phase == "distill"
    start = parse_progress("INFO server.public_student: " + start_line(2160, 6))
    assert start is not None
    assert (start.phase, start.replied) == ("start", 2160)


def test_a_round_validated_later_has_a_line_without_its_metric() -> None:
    progress = parse_progress(
        "INFO server.rounds: " + round_line(2, 4, 2, 2, 0.5, "auroc_macro", None, 1, 3.0)
    )
    assert progress is not None
    assert (progress.completed_round, progress.num_rounds, progress.replied) == (2, 4, 2)
    assert (progress.metric_name, progress.metric) == ("", None)


def test_a_simulation_failure_does_not_advise_resume() -> None:
    details = f"round 2: only 1 site(s) trained, the minimum is 2. site_01: error (x) {RESUME_ADVICE}"
    assert "--resume" not in without_resume_advice(details)
    assert without_resume_advice(details).endswith("site_01: error (x)")


def test_round_lines_carry_their_seconds_and_student_rounds_have_their_own_line() -> None:
    teacher = parse_progress(
        "INFO server.rounds: " + round_line(1, 3, 3, 3, 0.5, "auroc_macro", 0.8, 1, 18.44)
    )
    assert teacher is not None
    assert teacher.seconds == pytest.approx(18.4)
    in_train = parse_progress(round_line(2, 3, 3, 3, 0.5, "auroc_macro", None, 1, 3.0))
    assert in_train is not None
    assert (in_train.metric, in_train.seconds) == (None, 3.0)
    student = parse_progress("INFO server.app: " + student_round_line(2, 4, 3, 9.06))
    assert student is not None
    assert (student.phase, student.completed_round, student.num_rounds, student.replied) == (
        "student",
        2,
        4,
        3,
    )
    assert student.seconds == pytest.approx(9.1)


def test_a_validation_line_reads_back_with_its_round_and_metric() -> None:
    progress = parse_progress("INFO server.rounds: " + validation_line(2, 5, 3, "auroc_macro", 0.81234, 2))
    assert progress is not None
    assert (progress.phase, progress.completed_round, progress.num_rounds, progress.replied) == (
        "validation",
        2,
        5,
        3,
    )
    assert (progress.metric_name, progress.metric) == ("auroc_macro", pytest.approx(0.8123))
