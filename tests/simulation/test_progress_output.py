"""`python -m simulation` progress: one plain line per stage and round when stdout is not a terminal."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

import simulation.cli as cli
import simulation.experiment as experiment_module
from server.progress_events import EventFollower, Progress
from server.run_folder import RunFolder

SERVER_EVENTS = [
    Progress(1, 2, 3, 3, "auroc_macro", 0.7512, train_loss=1.02, best_round=1, seconds=18.44),
    Progress(2, 2, 2, 3, train_loss=0.91, best_round=2, seconds=17.0),
    Progress(2, 2, 3, None, "auroc_macro", 0.8123, phase="validation", best_round=2),
    Progress(-1, -1, phase="distill", teacher="best"),
    Progress(1, 1, 3, phase="student", seconds=9.06),
]


class FakeExperiment:
    """Plays a federated run's events through the experiment's own follower (no training)."""

    def __init__(self, config: Any) -> None:
        self.out = Path(config.out)

    def run(self, on_round: Any = None, on_stage: Any = None, on_progress: Any = None) -> Any:
        for text in ("checking settings and partitioning the data", "federated run: 3 sites"):
            if on_stage:
                on_stage(text)
        follow = experiment_module.progress_follower(on_stage or (lambda _: None), on_round, on_progress)
        folder = RunFolder(self.out / "run")
        events = EventFollower(folder, follow)
        for progress in SERVER_EVENTS:
            folder.append_event(progress.to_event())
            events.poll()
        if on_stage:
            on_stage("writing the report")
        return experiment_module.ExperimentResult(self.out, self.out / "report.md", None)  # type: ignore[arg-type]


@pytest.fixture
def fake_experiment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setattr(experiment_module, "Experiment", FakeExperiment)
    monkeypatch.setattr(cli, "_default_out", lambda: tmp_path / "demo")
    return tmp_path / "demo"


def test_a_piped_run_prints_one_plain_line_per_stage_and_round(fake_experiment: Path) -> None:
    result = CliRunner().invoke(cli.app, [])  # CliRunner's stdout is not a terminal

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    expected = [
        "checking settings and partitioning the data",
        "federated run: 3 sites",
        "round 1/2: 3/3 sites, val auroc_macro 0.751, 18.4 s",
        "round 2/2: 2/3 sites, 17.0 s",
        "round 2/2 validation: 3 sites, val auroc_macro 0.812",
        "distilling students at the sites",
        "federated student rounds",
        "student round 1/1: 3 sites, 9.1 s",
        "writing the report",
    ]
    assert [line for line in lines if line in expected] == expected
    assert f"report: {fake_experiment / 'report.md'}" in result.output


def test_a_terminal_keeps_the_progress_bars(fake_experiment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(cli, "stdout", Console(file=screen, force_terminal=True, width=120))

    cli.run_experiment_with_progress(experiment_module.ExperimentConfig(out=fake_experiment))

    shown = screen.getvalue()
    assert "teacher rounds" in shown  # the rich bar's description
    assert "round 1/2: 3/3 sites" not in shown
