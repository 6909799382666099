"""The progress lines the ServerApp logs, and the parser that follows a run through them.

``cxr-fl-server start`` and the simulation read a run's progress from its log (``flwr log
--stream``); the ServerApp writes it. Both sides use this module, so a change of wording cannot
break the progress bars: :func:`round_line`, :func:`resume_line`, :func:`distill_line` and
:func:`validation_line` and :func:`student_round_line` make the lines, :func:`parse_progress` reads them back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROUND_LINE = re.compile(
    r"Round (?P<round>\d+)/(?P<rounds>\d+): (?P<replied>\d+)/(?P<sampled>\d+) sites trained, "
    r"train loss (?P<loss>[^,\s]+)(?:, val (?P<metric_name>\S+) (?P<metric>\S+))?"
    r"(?:.*, (?P<seconds>\d+(?:\.\d+)?) s\s*$)?"
)
VALIDATION_LINE = re.compile(
    r"Round (?P<round>\d+)/(?P<rounds>\d+) validation: (?P<sites>\d+) site\(s\), "
    r"(?P<metric_name>\S+) (?P<metric>\S+)"
)
STUDENT_LINE = re.compile(
    r"Federated student round (?P<round>\d+)/(?P<rounds>\d+): (?P<sites>\d+) sites"
    r"(?:, (?P<seconds>\d+(?:\.\d+)?) s)?"
)
RESUME_LINE = re.compile(r"Resuming run in .* after round (?P<round>\d+) of (?P<rounds>\d+)")
DISTILL_MARKER = "Distillation round:"
START_LINE = re.compile(r"Students' start: distilling the teacher on (?P<images>\d+) public images")
RESUME_ADVICE = (
    "The last completed round is checkpointed; start the server again with --resume once sites are back."
)
"""What a failed round tells the coordinator (a simulation drops it: there is no server to resume)."""


def round_line(
    server_round: int,
    num_rounds: int,
    trained: int,
    sampled: int,
    train_loss: float,
    metric_name: str,
    metric: float | None,
    best_round: int,
    seconds: float,
) -> str:
    """A teacher round's line; ``metric`` None: the round's model is validated later (in-train mode)."""
    validated = "" if metric is None else f", val {metric_name} {metric:.4f} (best round {best_round})"
    return (
        f"Round {server_round}/{num_rounds}: {trained}/{sampled} sites trained, train loss {train_loss:.4f}"
        f"{validated}, {seconds:.1f} s"
    )


def validation_line(
    server_round: int, num_rounds: int, sites: int, metric_name: str, metric: float, best_round: int
) -> str:
    """A teacher round's validation (in in-train mode it arrives with the next round's replies)."""
    return (
        f"Round {server_round}/{num_rounds} validation: {sites} site(s), {metric_name} {metric:.4f} "
        f"(best round {best_round})"
    )


def resume_line(
    run_dir: Path, completed: int, num_rounds: int, best_round: int, metric_name: str, best_metric: float
) -> str:
    return (
        f"Resuming run in {run_dir} after round {completed} of {num_rounds} "
        f"(best so far: round {best_round}, {metric_name} = {best_metric:.4f})"
    )


def start_line(images: int, epochs: int) -> str:
    """The coordinator starts distilling the students' start (its images count as ``replied``)."""
    return f"Students' start: distilling the teacher on {images} public images ({epochs} epochs)"


def distill_line(which: str) -> str:
    return f"{DISTILL_MARKER} sending the {which} global teacher to every site"


def student_round_line(student_round: int, num_rounds: int, sites: int, seconds: float) -> str:
    """A federated-student round's line (``sites``: those whose student was aggregated)."""
    return f"Federated student round {student_round}/{num_rounds}: {sites} sites, {seconds:.1f} s"


@dataclass(frozen=True)
class Progress:
    """What one log line says about the run's progress (None fields: not in this line)."""

    completed_round: int
    num_rounds: int
    replied: int | None = None
    sampled: int | None = None
    metric_name: str = ""
    metric: float | None = None
    phase: str = "teacher"
    """teacher | validation (of a teacher round) | start (the coordinator distils the students'
    start) | distill | student (a federated-student round)"""
    seconds: float | None = None
    """How long the round took, where the line says."""


def parse_progress(line: str) -> Progress | None:
    """Progress from one line of the ServerApp's log (None: the line says nothing about it)."""
    if match := ROUND_LINE.search(line):
        return Progress(
            completed_round=int(match["round"]),
            num_rounds=int(match["rounds"]),
            replied=int(match["replied"]),
            sampled=int(match["sampled"]),
            metric_name=match["metric_name"] or "",
            metric=float(match["metric"]) if match["metric"] else None,
            seconds=float(match["seconds"]) if match["seconds"] else None,
        )
    if match := VALIDATION_LINE.search(line):
        return Progress(
            completed_round=int(match["round"]),
            num_rounds=int(match["rounds"]),
            replied=int(match["sites"]),
            metric_name=match["metric_name"],
            metric=float(match["metric"]),
            phase="validation",
        )
    if match := STUDENT_LINE.search(line):
        return Progress(
            completed_round=int(match["round"]),
            num_rounds=int(match["rounds"]),
            replied=int(match["sites"]),
            phase="student",
            seconds=float(match["seconds"]) if match["seconds"] else None,
        )
    if match := RESUME_LINE.search(line):
        return Progress(int(match["round"]), int(match["rounds"]))
    if DISTILL_MARKER in line:
        return Progress(-1, -1, phase="distill")
    if match := START_LINE.search(line):
        return Progress(-1, -1, replied=int(match["images"]), phase="start")
    return None


def without_resume_advice(text: str) -> str:
    """``text`` without :data:`RESUME_ADVICE` (for runs that cannot be resumed, e.g. simulations)."""
    return " ".join(text.replace(RESUME_ADVICE, "").split())
