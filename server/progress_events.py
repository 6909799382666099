"""The run's progress as structured events: what the ServerApp writes, what its followers read.

The ServerApp announces each step of a run (a teacher round, its validation, a resume, the
students' start, the distillation, a federated-student round) with :func:`announce`: one JSON
object per line in the run folder's events file (server/run_folder.py), then the same step as a
log line for people (server/progress_lines.py words it). ``cxr-fl-server start``/``submit``
(server/run_following.py), the console (server/console/run_state.py) and the simulation
(simulation/experiment.py) read the events, never the log's wording.

An event's keys: ``phase`` (teacher | validation | resume | start | distill | student),
``round``, ``rounds`` (-1 outside the rounds), ``sites`` (sites that replied, or the public
images of the students' start), ``sampled``, ``metric_name``, ``metric`` (null: not validated
yet, or undefined when ``validated``), ``seconds``, ``time`` (wall clock when written) and what
the log line also says (``train_loss``, ``best_round``, ``best_metric``, ``epochs``, ``teacher``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.progress_lines import (
    distill_line,
    resume_line,
    round_line,
    start_line,
    student_round_line,
    validation_line,
)

if TYPE_CHECKING:
    from server.run_folder import RunFolder

PHASES = frozenset({"teacher", "validation", "resume", "start", "distill", "student"})


@dataclass(frozen=True)
class Progress:
    """One step of a run (None fields: not part of this step)."""

    completed_round: int
    num_rounds: int
    replied: int | None = None
    sampled: int | None = None
    metric_name: str = ""
    metric: float | None = None
    phase: str = "teacher"
    """teacher | validation (of a teacher round) | resume | start (the coordinator distils the
    students' start; ``replied`` is its number of public images) | distill | student (a
    federated-student round)"""
    seconds: float | None = None
    """How long the round took."""
    train_loss: float | None = None
    best_round: int | None = None
    best_metric: float | None = None
    epochs: int | None = None
    teacher: str = ""
    """Which global teacher the distillation sends (best | last)."""
    time: float = 0.0

    def to_event(self) -> dict[str, Any]:
        """The event's JSON object (non-finite numbers as null, ``validated`` says which)."""
        return {
            "phase": self.phase,
            "round": self.completed_round,
            "rounds": self.num_rounds,
            "sites": self.replied,
            "sampled": self.sampled,
            "metric_name": self.metric_name,
            "metric": _finite(self.metric),
            "validated": self.metric is not None,
            "seconds": _finite(self.seconds),
            "train_loss": _finite(self.train_loss),
            "best_round": self.best_round,
            "best_metric": _finite(self.best_metric),
            "epochs": self.epochs,
            "teacher": self.teacher,
            "time": self.time,
        }

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Progress | None:
        """The step an event describes; None for anything that is not a well-formed event."""
        phase, server_round, rounds = event.get("phase"), _int(event.get("round")), _int(event.get("rounds"))
        if phase not in PHASES or server_round is None or rounds is None:
            return None
        metric = _float(event.get("metric"))
        if metric is None and event.get("validated") is True:
            metric = math.nan
        return cls(
            completed_round=server_round,
            num_rounds=rounds,
            replied=_int(event.get("sites")),
            sampled=_int(event.get("sampled")),
            metric_name=str(event.get("metric_name") or ""),
            metric=metric,
            phase=str(phase),
            seconds=_float(event.get("seconds")),
            train_loss=_float(event.get("train_loss")),
            best_round=_int(event.get("best_round")),
            best_metric=_float(event.get("best_metric")),
            epochs=_int(event.get("epochs")),
            teacher=str(event.get("teacher") or ""),
            time=_float(event.get("time")) or 0.0,
        )

    def line(self, run_dir: Path) -> str:
        """The log line that says the same for people (server/progress_lines.py's wording)."""
        nan = math.nan
        if self.phase == "teacher":
            return round_line(
                self.completed_round,
                self.num_rounds,
                self.replied or 0,
                self.sampled or 0,
                nan if self.train_loss is None else self.train_loss,
                self.metric_name,
                self.metric,
                self.best_round or 0,
                self.seconds or 0.0,
            )
        if self.phase == "validation":
            metric = nan if self.metric is None else self.metric
            return validation_line(
                self.completed_round,
                self.num_rounds,
                self.replied or 0,
                self.metric_name,
                metric,
                self.best_round or 0,
            )
        if self.phase == "resume":
            best = nan if self.best_metric is None else self.best_metric
            return resume_line(
                run_dir, self.completed_round, self.num_rounds, self.best_round or 0, self.metric_name, best
            )
        if self.phase == "start":
            return start_line(self.replied or 0, self.epochs or 0)
        if self.phase == "distill":
            return distill_line(self.teacher)
        return student_round_line(
            self.completed_round, self.num_rounds, self.replied or 0, self.seconds or 0.0
        )


def announce(folder: RunFolder, progress: Progress, log: logging.Logger) -> None:
    """Write ``progress`` as an event of the run folder, then log its line (event first: a
    follower that hears the line finds the event)."""
    stamped = replace(progress, time=time.time())
    folder.append_event(stamped.to_event())
    log.info("%s", stamped.line(folder.root))


class EventFollower:
    """Hands each new event of a run folder, as :class:`Progress`, to ``on_progress``.

    Only events written at or after ``since`` (wall clock) count: a resumed run's earlier
    events are not heard again. Call :meth:`poll` whenever there may be news (each log line of
    the run, and once at its end)."""

    def __init__(
        self, folder: RunFolder, on_progress: Callable[[Progress], None], since: float = 0.0
    ) -> None:
        self.folder = folder
        self.on_progress = on_progress
        self.since = since
        self.heard = 0

    def poll(self) -> None:
        recent = [p for p in run_steps(self.folder) if p.time >= self.since]
        for progress in recent[self.heard :]:
            self.on_progress(progress)
        self.heard = max(self.heard, len(recent))


def run_steps(folder: RunFolder) -> list[Progress]:
    """The run's steps so far, in order (lines that are not well-formed events left out)."""
    return [p for p in map(Progress.from_event, folder.read_events()) if p is not None]


def last_progress(folder: RunFolder) -> Progress | None:
    """The run's latest step (None before the first)."""
    steps = run_steps(folder)
    return steps[-1] if steps else None


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _int(value: Any) -> int | None:
    number = _float(value)
    return int(number) if number is not None and number == int(number) else None
