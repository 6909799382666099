"""Federated-student rounds aggregate through the run's configured strategy (issue 14, item 7)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

import server.app as server_app
from common.checkpoint import load_model_state
from common.protocol import WEIGHT_KEY
from common.run_settings import from_mapping, load_schema, run_settings_from_config
from server.rounds import SiteOutcome
from server.run_folder import RunFolder
from server.strategies import StrategySettings

SITE_OFFSETS = (0.0, 1.0, 10.0)


class _Reply:
    """A site's reply as the strategy reads it (a real Message needs a running Flower task)."""

    def __init__(self, content: RecordDict) -> None:
        self.content = content

    def has_error(self) -> bool:
        return False


def _students_of_the_sites(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each site answers with the student it was sent, every float shifted by its offset."""

    def broadcast(grid: Any, arrays: ArrayRecord, message_type: str, *args: Any) -> tuple[list, list]:
        state = arrays.to_torch_state_dict()
        replies, outcomes = [], []
        for node, offset in enumerate(SITE_OFFSETS, start=1):
            shifted = {k: v + offset if v.is_floating_point() else v for k, v in state.items()}
            content = RecordDict({"arrays": ArrayRecord(shifted), "metrics": MetricRecord({WEIGHT_KEY: 100})})
            replies.append(_Reply(content))
            outcomes.append(SiteOutcome(node, f"site_{node:02d}", "ok"))
        return replies, outcomes

    monkeypatch.setattr(server_app, "broadcast", broadcast)


@pytest.mark.parametrize(("strategy", "shift"), [("fedavg", 11.0 / 3), ("fedmedian", 1.0)])
def test_student_rounds_aggregate_with_the_runs_strategy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str, shift: float
) -> None:
    # Prepare
    config = {
        **load_schema(),
        "strategy": strategy,
        "min-train-sites": 3,
        "min-available-sites": 3,
        "min-evaluate-sites": 3,
        "kd-federated-student-rounds": 1,
        "kd-width-mult": 0.35,
    }
    settings = run_settings_from_config(config)
    folder = RunFolder(tmp_path)
    folder.checkpoints.mkdir(parents=True)
    _students_of_the_sites(monkeypatch)
    sent: list[dict[str, torch.Tensor]] = []
    real_broadcast = server_app.broadcast

    def recording(grid: Any, arrays: ArrayRecord, *args: Any) -> tuple[list, list]:
        sent.append(arrays.to_torch_state_dict())
        return real_broadcast(grid, arrays, *args)

    monkeypatch.setattr(server_app, "broadcast", recording)

    # Execute
    server_app.federated_student(None, folder, settings, from_mapping(StrategySettings, config), {})

    # Assert: the global student is the strategy's aggregate (the mean, or the median site)
    initial, delivered = sent[0], load_model_state(folder.checkpoints / "student.pt")
    for key, value in initial.items():
        if value.is_floating_point():
            torch.testing.assert_close(delivered[key], value + shift, rtol=1e-5, atol=1e-4)


def test_the_federated_student_is_skipped_under_dp_and_a_failed_one_ends_only_its_phase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.rounds import RoundFailedError

    # Prepare
    config = {**load_schema(), "kd-width-mult": 0.35}
    settings = run_settings_from_config(config)
    assert settings.kd_federated_student_rounds > 0  # the product default delivers a federated student
    strategy = from_mapping(StrategySettings, config)
    folder = RunFolder(tmp_path)
    folder.checkpoints.mkdir(parents=True)
    calls: list[int] = []

    def failing(*_args: Any) -> list[dict[str, object]]:
        calls.append(1)
        raise RoundFailedError("federated student round 1: 1 site(s) replied, the minimum is 2")

    monkeypatch.setattr(server_app, "federated_student", failing)
    dp = run_settings_from_config({**config, "dp-enabled": True, "teacher-norm": "group"})

    # Execute
    under_dp = server_app.federated_student_phase(None, folder, dp, strategy, {})
    under_central_dp = server_app.federated_student_phase(
        None, folder, settings, strategy, {}, central_dp=True
    )
    failed = server_app.federated_student_phase(None, folder, settings, strategy, {})

    # Assert: no round under DP; a failed phase is reported, not raised, and writes no student
    assert "skipped under DP" in under_dp
    assert "skipped under DP" in under_central_dp
    assert calls == [1]
    assert failed.startswith("not completed (federated student round 1: 1 site(s) replied")
    assert not (tmp_path / "federated_student.json").exists()


@pytest.mark.parametrize(("scores", "delivered_round"), [((0.9, 0.5, 0.7), 0), ((0.5, 0.9, 0.7), 1)])
def test_the_coordinator_delivers_the_student_that_scores_best_on_its_hold_out_start_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scores: tuple[float, ...], delivered_round: int
) -> None:
    config = {
        **load_schema(),
        "kd-federated-student-rounds": 2,
        "kd-width-mult": 0.35,
        "select-on": "coordinator",
        "central-eval-manifest": str(tmp_path / "holdout.csv"),
    }
    settings = run_settings_from_config(config)
    folder = RunFolder(tmp_path / "run")
    folder.checkpoints.mkdir(parents=True)
    _students_of_the_sites(monkeypatch)
    offered = iter(scores)  # the start, then each round's global student
    monkeypatch.setattr(
        server_app, "central_scorer", lambda *a, **k: lambda state: {"auroc_macro": next(offered)}
    )
    start = ArrayRecord(
        server_app.build_model(
            server_app.student_config(settings.distill, settings.teacher, settings.teacher.norm), 3
        ).state_dict()
    )

    rows = server_app.federated_student(
        None, folder, settings, from_mapping(StrategySettings, config), {}, start, central=object()
    )

    shift = delivered_round * 11.0 / 3  # each round moves every float by the sites' mean offset
    delivered = load_model_state(folder.checkpoints / "student.pt")
    for key, value in start.to_torch_state_dict().items():
        if value.is_floating_point() and "running" not in key:
            torch.testing.assert_close(delivered[key], value + shift, rtol=1e-5, atol=1e-4)
    central = [r for r in rows if r["phase"] == "student-central"]
    assert [(r["round"], r["central_auroc_macro"], r["central_best"]) for r in central] == [
        (0, scores[0], 1.0),
        (1, scores[1], float(scores[1] > scores[0])),
        (2, scores[2], 0.0),
    ]
