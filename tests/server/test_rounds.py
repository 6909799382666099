"""How the server collects the sites' replies in a round, and validates each round's model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.protocol import SITE_RECORD, VALIDATE_INCOMING_KEY, VALIDATION_RECORD, WEIGHT_KEY
from server.rounds import TeacherRounds, collect
from server.run_folder import RunFolder
from server.strategies import StrategySettings, build_strategy

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class ArrivalOrderGrid:
    """A grid whose replies arrive in the order given (as a SuperLink returns whatever came first)."""

    def __init__(self, site_of_node: dict[int, str], arrival: list[int]) -> None:
        self.site_of_node = site_of_node
        self.arrival = arrival
        self.sent: dict[int, Message] = {}

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for message in messages:
            node = message.metadata.dst_node_id
            message.metadata._message_id = f"message-{node}"  # what the SuperLink assigns
            self.sent[node] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        replies = []
        for node in self.arrival:
            if f"message-{node}" in message_ids:
                name = ConfigRecord({"name": self.site_of_node[node]})
                replies.append(Message(RecordDict({SITE_RECORD: name}), reply_to=self.sent[node]))
        return replies


@pytest.mark.parametrize("arrival", [[30, 10, 20], [20, 30, 10], [10, 20, 30]])
def test_replies_are_aggregated_in_site_order_whatever_order_they_arrive_in(arrival: list[int]) -> None:
    grid = ArrivalOrderGrid({10: "site_c", 20: "site_a", 30: "site_b"}, arrival)
    messages = [Message(RecordDict(), dst_node_id=node, message_type="train") for node in (10, 20, 30)]

    replies, outcomes = collect(grid, messages, timeout=5.0, names={})  # type: ignore[arg-type]

    assert [reply.metadata.src_node_id for reply in replies] == [20, 30, 10]
    assert [o.site for o in outcomes] == ["site_a", "site_b", "site_c"]
    assert all(o.status == "ok" for o in outcomes)


class ScoredSites:
    """Two sites that answer at once. Training adds 1 to the single weight ``w`` (so the global
    model of round r has w == r); a model's validation score is ``scores[w]`` at every site."""

    def __init__(self, scores: dict[int, float]) -> None:
        self.scores = scores
        self.names = {10: "site_a", 20: "site_b"}
        self.sent: list[Message] = []
        self.outbox: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return sorted(self.names)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata._message_id = f"m{len(self.sent)}"
            self.sent.append(message)
            self.outbox[message.metadata.message_id] = self._answer(message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        return [self.outbox.pop(i) for i in message_ids if i in self.outbox]

    def _scores(self, w: int) -> MetricRecord:
        return MetricRecord(
            {WEIGHT_KEY: 5, "val_auroc_macro": self.scores[w], "val_loss": 1.0 - self.scores[w]}
        )

    def _answer(self, message: Message) -> Message:
        w = int(message.content["arrays"].to_torch_state_dict()["w"].item())
        site = ConfigRecord({"name": self.names[message.metadata.dst_node_id]})
        if message.metadata.message_type == "train":
            content = RecordDict(
                {
                    "arrays": ArrayRecord({"w": torch.tensor(float(w + 1))}),
                    "metrics": MetricRecord({WEIGHT_KEY: 10, "loss": 1.0 / (w + 1)}),
                    SITE_RECORD: site,
                }
            )
            if message.content["config"][VALIDATE_INCOMING_KEY]:
                content[VALIDATION_RECORD] = self._scores(w)
        else:
            content = RecordDict({"metrics": self._scores(w), SITE_RECORD: site})
        return Message(content, reply_to=message)

    def message_kinds(self) -> list[tuple[int, str, bool | None]]:
        """(round, type, validate-incoming) of every message sent, in order."""
        kinds = []
        for message in self.sent:
            config = message.content["config"]
            kinds.append(
                (
                    int(config["server-round"]),
                    message.metadata.message_type,
                    config.get(VALIDATE_INCOMING_KEY),
                )
            )
        return kinds


SCORES = {0: 0.99, 1: 0.6, 2: 0.8, 3: 0.7}  # the initial model (w=0) must never be a candidate


def _rounds(
    grid: ScoredSites, folder: RunFolder, mode: str, num_rounds: int = 3, **extra: Any
) -> TeacherRounds:
    return TeacherRounds(
        grid,  # type: ignore[arg-type]
        build_strategy(StrategySettings()),
        folder,
        num_rounds=num_rounds,
        round_timeout=5.0,
        site_wait_timeout=5.0,
        selection_metric="auroc_macro",
        seed=1,
        min_train_sites=2,
        min_evaluate_sites=2,
        validation_mode=mode,
        **extra,
    )


def _initial() -> ArrayRecord:
    return ArrayRecord({"w": torch.tensor(0.0)})


def _comparable(folder: RunFolder) -> list[dict[str, object]]:
    """metrics.jsonl rows without wall times, in a canonical order."""
    rows = [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in folder.read_metrics()]
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))


def _state(folder: RunFolder) -> dict[str, object]:
    return json.loads((folder.checkpoints / "state.json").read_text())


def test_in_train_validation_sends_one_message_per_site_per_round_and_one_final_evaluation(
    tmp_path: Path,
) -> None:
    grid = ScoredSites(SCORES)

    _rounds(grid, RunFolder(tmp_path), "in-train").run(_initial(), None)

    assert grid.message_kinds() == [
        (1, "train", False),
        (1, "train", False),
        (2, "train", True),
        (2, "train", True),
        (3, "train", True),
        (3, "train", True),
        (3, "evaluate", None),
        (3, "evaluate", None),
    ]


def test_in_train_validation_scores_each_round_with_its_own_model_and_keeps_the_best(tmp_path: Path) -> None:
    in_train, separate = RunFolder(tmp_path / "in-train"), RunFolder(tmp_path / "separate")
    fast, slow = ScoredSites(SCORES), ScoredSites(SCORES)

    result = _rounds(fast, in_train, "in-train").run(_initial(), None)
    _rounds(slow, separate, "separate").run(_initial(), None)

    assert len(fast.sent) == 8
    assert len(slow.sent) == 12
    aggregates = [r for r in in_train.read_metrics() if r["phase"] == "aggregate"]
    assert [(r["round"], r["val_auroc_macro"], r["is_best"]) for r in aggregates] == [
        (1, 0.6, True),
        (2, 0.8, True),
        (3, 0.7, False),
    ]
    assert all(r["train_loss"] == pytest.approx(1.0 / r["round"]) for r in aggregates)
    train_rows = [r for r in in_train.read_metrics() if r["phase"] == "train"]
    assert train_rows
    assert all("val_auroc_macro" not in r for r in train_rows)
    assert _comparable(in_train) == _comparable(separate)
    assert result.best_round == 2
    for folder in (in_train, separate):
        assert folder.load_model("best")["w"].item() == 2.0
        assert folder.load_model("last")["w"].item() == 3.0
        state = _state(folder)
        assert (state["completed_round"], state["best_round"], state["pending_row"]) == (3, 2, None)
        assert state["best_metric"] == pytest.approx(0.8)


class KilledBeforeCheckpoint(RunFolder):
    """A server killed after writing round ``kill_round``'s metrics, before its checkpoint."""

    def __init__(self, root: Path, kill_round: int) -> None:
        super().__init__(root)
        self.kill_round = kill_round

    def save_round(self, **kwargs: Any) -> None:
        if kwargs["server_round"] == self.kill_round:
            raise KeyboardInterrupt("killed")
        super().save_round(**kwargs)


@pytest.mark.parametrize("kill_round", [2, 3])
def test_a_resumed_in_train_run_writes_what_the_straight_run_wrote(tmp_path: Path, kill_round: int) -> None:
    straight = RunFolder(tmp_path / "straight")
    _rounds(ScoredSites(SCORES), straight, "in-train").run(_initial(), None)

    killed = KilledBeforeCheckpoint(tmp_path / "resumed", kill_round)
    with pytest.raises(KeyboardInterrupt):
        _rounds(ScoredSites(SCORES), killed, "in-train").run(_initial(), None)
    resumed = RunFolder(tmp_path / "resumed")
    state = resumed.resume_state()
    assert state is not None
    assert state.completed_round == kill_round - 1
    assert state.validated_round == kill_round - 2  # the last checkpointed model awaits validation
    resumed.drop_metrics_after(state.completed_round, state.validated_round)
    grid = ScoredSites(SCORES)
    _rounds(grid, resumed, "in-train").run(_initial(), state)

    assert grid.message_kinds()[0] == (kill_round, "train", True)
    assert _comparable(resumed) == _comparable(straight)
    assert _state(resumed) == _state(straight)
    assert resumed.load_model("best")["w"].item() == 2.0


def test_a_run_stopped_before_its_final_evaluation_only_evaluates_on_resume(tmp_path: Path) -> None:
    straight = RunFolder(tmp_path / "straight")
    _rounds(ScoredSites(SCORES), straight, "in-train").run(_initial(), None)
    folder = RunFolder(tmp_path / "stopped")

    class NoSitesAtTheEnd(ScoredSites):
        def get_node_ids(self) -> list[int]:
            evaluating = any(
                m.metadata.message_type == "train" and m.content["config"]["server-round"] == 3
                for m in self.sent
            )
            if evaluating:
                raise KeyboardInterrupt("killed before the final evaluation")
            return super().get_node_ids()

    with pytest.raises(KeyboardInterrupt):
        _rounds(NoSitesAtTheEnd(SCORES), folder, "in-train").run(_initial(), None)
    state = folder.resume_state()
    assert state is not None
    assert (state.completed_round, state.validated_round) == (3, 2)
    folder.drop_metrics_after(state.completed_round, state.validated_round)
    grid = ScoredSites(SCORES)
    _rounds(grid, folder, "in-train").run(_initial(), state)

    assert grid.message_kinds() == [(3, "evaluate", None), (3, "evaluate", None)]
    assert _comparable(folder) == _comparable(straight)
    assert _state(folder) == _state(straight)


def test_a_site_that_sends_no_validation_is_reported_and_left_out_of_the_average(tmp_path: Path) -> None:
    class OneSiteSkipsValidation(ScoredSites):
        def _answer(self, message: Message) -> Message:
            reply = super()._answer(message)
            if message.metadata.dst_node_id == 20 and VALIDATION_RECORD in reply.content:
                reply.content.pop(VALIDATION_RECORD)
            return reply

    folder = RunFolder(tmp_path)
    _rounds(OneSiteSkipsValidation(SCORES), folder, "in-train", num_rounds=2).run(_initial(), None)

    evaluate = [r for r in folder.read_metrics() if r["phase"] == "evaluate" and r["round"] == 1]
    assert [(r["site"], r["status"]) for r in evaluate] == [("site_a", "ok"), ("site_b", "failed")]
    assert "no validation" in evaluate[1]["reason"]
    aggregate = next(r for r in folder.read_metrics() if r["phase"] == "aggregate" and r["round"] == 1)
    assert aggregate["val_auroc_macro"] == pytest.approx(0.6)


def test_every_round_statistics_reach_validation_the_next_round_and_the_checkpoints(tmp_path: Path) -> None:
    # Prepare: a hook standing in for the sites' pooled BatchNorm statistics (bn-statistics =
    # "every-round"): it moves w by 0.25, which the sites' int(w) scoring ignores
    from server.batchnorm import BatchNormUpdate

    calls: list[tuple[int, float, dict[int, float]]] = []

    def pooled(server_round: int, arrays: ArrayRecord, counts: dict[int, float]) -> BatchNormUpdate:
        w = float(arrays.to_torch_state_dict()["w"].item())
        calls.append((server_round, w, dict(counts)))
        return BatchNormUpdate(ArrayRecord({"w": torch.tensor(w + 0.25)}), [], {"bn_statistics_sites": 2.0})

    grid, folder = ScoredSites(SCORES), RunFolder(tmp_path)
    rounds = _rounds(grid, folder, "in-train")
    rounds.batchnorm = pooled

    # Execute
    rounds.run(_initial(), None)

    # Assert: each aggregate went through the hook before it was sent, validated or saved
    assert calls == [
        (1, 1.0, {10: 10.0, 20: 10.0}),
        (2, 2.0, {10: 10.0, 20: 10.0}),
        (3, 3.0, {10: 10.0, 20: 10.0}),
    ]
    sent = [float(m.content["arrays"].to_torch_state_dict()["w"].item()) for m in grid.sent]
    assert sent == [0.0, 0.0, 1.25, 1.25, 2.25, 2.25, 3.25, 3.25]
    assert folder.load_model("last")["w"].item() == 3.25
    assert folder.load_model("best")["w"].item() == 2.25
    aggregates = [r for r in folder.read_metrics() if r["phase"] == "aggregate"]
    assert [r["bn_statistics_sites"] for r in aggregates] == [2.0, 2.0, 2.0]


def _run_central(folder: RunFolder, mode: str, central: dict[int, float]) -> int:
    """Three rounds selected on a coordinator's hold-out that scores the model w as ``central[w]``;
    the best round."""
    score = lambda state: {"auroc_macro": central[int(state["w"].item())]}  # noqa: E731
    rounds = _rounds(ScoredSites(SCORES), folder, mode, central_evaluate=score, select_on_coordinator=True)
    return rounds.run(_initial(), None).best_round


@pytest.mark.parametrize("mode", ["in-train", "separate"])
def test_the_coordinator_keeps_the_initial_teacher_unless_a_round_beats_it_on_its_hold_out(
    tmp_path: Path, mode: str
) -> None:
    kept, beaten = RunFolder(tmp_path / "kept"), RunFolder(tmp_path / "beaten")

    assert _run_central(kept, mode, {0: 0.9, 1: 0.6, 2: 0.8, 3: 0.7}) == 0
    # the sites' validation would pick round 2 (SCORES); the coordinator's hold-out picks round 1
    assert _run_central(beaten, mode, {0: 0.5, 1: 0.9, 2: 0.6, 3: 0.7}) == 1

    assert kept.load_model("best")["w"].item() == 0.0
    start = [r for r in kept.read_metrics() if r["phase"] == "start"]
    assert start == [{"round": 0, "phase": "start", "site": "_global", "central_auroc_macro": 0.9}]
    assert _state(kept)["best_round"] == 0
    assert beaten.load_model("best")["w"].item() == 1.0
    aggregates = [r for r in beaten.read_metrics() if r["phase"] == "aggregate"]
    assert [(r["round"], r["central_auroc_macro"], r["is_best"]) for r in aggregates] == [
        (1, 0.9, True),
        (2, 0.6, False),
        (3, 0.7, False),
    ]


def test_selecting_on_the_coordinator_needs_its_hold_out(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="central_evaluate"):
        _rounds(ScoredSites(SCORES), RunFolder(tmp_path), "in-train", select_on_coordinator=True)
