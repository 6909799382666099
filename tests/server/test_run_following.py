"""``start``/``submit`` follow a run through its progress events while ``flwr run`` streams its log."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import server.run_following as run_following
from server.progress_events import Progress
from server.run_folder import RunFolder


class FakeCoordinator:
    """Plays a run: each step's event goes to the run folder, then a log line (any wording)."""

    def __init__(self, steps: list[Progress], log_lines: list[str]) -> None:
        self.steps = steps
        self.log_lines = log_lines

    def submit(self, overrides: dict[str, Any], *, on_line: Any, timeout: Any, config_name: Any) -> int:
        folder = RunFolder(Path(overrides["run-dir"]))
        for step, line in zip(self.steps, self.log_lines, strict=True):
            folder.append_event({**step.to_event(), "time": 100.0})
            on_line(line)
        return 0


def test_the_bar_shows_this_starts_events_and_the_logs_warnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(run_following, "console", Console(file=screen, width=200))
    run_dir = tmp_path / "run"
    earlier = Progress(-1, -1, phase="distill", teacher="best")  # of an earlier start: not shown
    RunFolder(run_dir).append_event({**earlier.to_event(), "time": 1.0})
    steps = [
        Progress(1, 3, 2, 3, train_loss=0.9, best_round=1, seconds=5.0),
        Progress(2, 3, 3, 3, "auroc_macro", 0.7, train_loss=0.8, best_round=2, seconds=5.0),
    ]
    coordinator = FakeCoordinator(steps, ["INFO flwr: anything", "WARNING server.rounds: site b slow"])
    shown_steps: list[Progress] = []
    show = run_following.show_progress
    monkeypatch.setattr(
        run_following,
        "show_progress",
        lambda bar, job, step: (shown_steps.append(step), show(bar, job, step)),
    )

    code = run_following.follow_run(coordinator, {"run-dir": str(run_dir)}, 3, started=50.0, timeout=None)

    shown = screen.getvalue()
    assert code == 0
    assert "round 2/3" in shown
    assert "3/3 sites replied, val auroc_macro 0.7000" in shown
    assert "WARNING server.rounds: site b slow" in shown
    assert [(step.phase, step.completed_round) for step in shown_steps] == [("teacher", 1), ("teacher", 2)]
