"""The coordinator's federated BatchNorm statistics (server/batchnorm.py): untrusted replies are
dropped with their reason, the others pooled into the model; no usable reply keeps the model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.batchnorm_stats import MEAN_SQ_SUFFIX, MEAN_SUFFIX, expected_channels
from common.checkpoint import load_metadata
from common.config import ModelConfig
from common.models import build_model
from common.protocol import BN_STATISTICS_MESSAGE_TYPE, BN_STATISTICS_RECORD, SITE_RECORD, WEIGHT_KEY
from common.run_settings import run_settings_from_config
from server.batchnorm import FederatedBatchNorm, pool_delivered_teacher, statistics_problem
from server.run_folder import RunFolder
from tests.helpers import flower_run_config

pytestmark = pytest.mark.usefixtures("flower_task_identity")

TINY = ModelConfig(name="tiny-cnn", norm="batch")
Answer = Callable[[np.ndarray], tuple[dict[str, np.ndarray], float]]


def _moments(mean: float, variance: float) -> dict[str, np.ndarray]:
    channels = expected_channels(build_model(TINY, 3))
    out = {}
    for layer, size in channels.items():
        out[f"{layer}{MEAN_SUFFIX}"] = np.full(size, mean)
        out[f"{layer}{MEAN_SQ_SUFFIX}"] = np.full(size, variance + mean**2)
    return out


class StatisticsSites:
    """Sites 10, 20, 30 answering a statistics message with the arrays and count they are given."""

    def __init__(self, answers: dict[int, tuple[dict[str, np.ndarray], float]]) -> None:
        self.answers = answers
        self.sent: list[Message] = []
        self.outbox: dict[str, Message] = {}

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata._message_id = f"m{len(self.sent)}"
            self.sent.append(message)
            arrays, count = self.answers[message.metadata.dst_node_id]
            content = RecordDict(
                {
                    BN_STATISTICS_RECORD: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                    "metrics": MetricRecord({WEIGHT_KEY: count}),
                    SITE_RECORD: ConfigRecord({"name": f"site_{message.metadata.dst_node_id}"}),
                }
            )
            self.outbox[message.metadata.message_id] = Message(content, reply_to=message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        return [self.outbox.pop(i) for i in message_ids if i in self.outbox]

    def get_node_ids(self) -> list[int]:
        return sorted(self.answers)


def _phase(grid: StatisticsSites) -> FederatedBatchNorm:
    phase = FederatedBatchNorm.for_model(grid, "teacher", TINY, 3, 32, timeout=5.0, names={})  # type: ignore[arg-type]
    assert phase is not None
    return phase


def _model() -> ArrayRecord:
    return ArrayRecord(build_model(TINY, 3).state_dict())


def test_bad_replies_are_dropped_with_their_reason_and_the_good_ones_pooled() -> None:
    # Prepare: site 10 and 20 are honest (means 1 and 4, 100 and 300 images), 30 sends NaN
    nan = _moments(0.0, 1.0)
    nan[f"features.0.1{MEAN_SUFFIX}"][0] = np.nan
    grid = StatisticsSites({10: (_moments(1.0, 1.0), 100), 20: (_moments(4.0, 1.0), 300), 30: (nan, 50)})
    sent = _model()

    # Execute
    update = _phase(grid).update(2, sent, {10: 100.0, 20: 300.0, 30: 50.0})

    # Assert
    assert {m.metadata.message_type for m in grid.sent} == {BN_STATISTICS_MESSAGE_TYPE}
    assert grid.sent[0].content["config"]["model"] == "teacher"
    status = {o.node_id: (o.status, o.reason) for o in update.outcomes}
    assert status[10][0] == status[20][0] == "ok"
    assert status[30][0] == "dropped"
    assert "non-finite" in status[30][1]
    state, before = update.arrays.to_torch_state_dict(), sent.to_torch_state_dict()
    # pooled mean 3.25; variance: E[x^2] = (2*100 + 17*300)/400 = 13.25, minus 3.25^2, unbiased
    torch.testing.assert_close(state["features.0.1.running_mean"], torch.full((8,), 3.25))
    values = 400 * 32 * 32
    expected_var = (13.25 - 3.25**2) * values / (values - 1)
    torch.testing.assert_close(state["features.0.1.running_var"], torch.full((8,), expected_var))
    assert torch.equal(state["features.0.1.num_batches_tracked"], before["features.0.1.num_batches_tracked"])
    assert torch.equal(state["features.0.0.weight"], before["features.0.0.weight"])
    assert update.metrics["bn_statistics_sites"] == 2


def test_with_no_usable_reply_the_model_keeps_its_averaged_statistics() -> None:
    negative = _moments(2.0, 1.0)
    negative[f"features.1.1{MEAN_SQ_SUFFIX}"][:] = 0.0  # E[x^2] < E[x]^2
    wrong_shape = _moments(0.0, 1.0)
    wrong_shape[f"features.2.1{MEAN_SUFFIX}"] = np.zeros(3)
    grid = StatisticsSites({10: (negative, 100), 20: (wrong_shape, 100), 30: (_moments(0.0, 1.0), 500)})
    sent = _model()

    update = _phase(grid).update(1, sent, {10: 100.0, 20: 100.0, 30: 200.0})

    reasons = {o.node_id: o.reason for o in update.outcomes}
    assert "negative variance" in reasons[10]
    assert "shape" in reasons[20]
    assert "more than it reported for training" in reasons[30]
    assert all(o.status == "dropped" for o in update.outcomes)
    assert update.arrays is sent
    assert update.metrics["bn_statistics_sites"] == 0


@pytest.mark.parametrize(
    ("count", "trained", "why"),
    [
        (0, 100.0, "not a whole number > 0"),
        (12.5, 100.0, "not a whole number > 0"),
        (float("nan"), 100.0, "not a whole number > 0"),
        (120, 100.0, "more than it reported"),
        (100, None, "more than it reported"),
    ],
)
def test_a_count_must_be_a_whole_number_within_the_training_count(
    count: float, trained: float | None, why: str
) -> None:
    content = RecordDict(
        {
            BN_STATISTICS_RECORD: ArrayRecord({k: Array(v) for k, v in _moments(0.0, 1.0).items()}),
            "metrics": MetricRecord({WEIGHT_KEY: count}),
        }
    )
    problem, _ = statistics_problem(content, trained, expected_channels(build_model(TINY, 3)))
    assert problem is not None
    assert why in problem


def test_a_model_without_batchnorm_has_no_phase() -> None:
    group = ModelConfig(name="tiny-cnn", norm="group")
    assert FederatedBatchNorm.for_model(None, "teacher", group, 3, 32, timeout=5.0, names={}) is None  # type: ignore[arg-type]


def test_the_delivered_teacher_is_pooled_once_and_a_resumed_run_does_not_pool_it_again(
    tmp_path: Path,
) -> None:
    # Prepare: a finished 2-round run whose best round is 1 (best.pt) and last round 2
    settings = run_settings_from_config(
        flower_run_config(teacher_name="tiny-cnn", image_size=32, num_rounds=2)
    )
    folder = RunFolder(tmp_path)
    model = build_model(TINY, 3).state_dict()
    folder.save_round(
        server_round=2,
        state_dict=model,
        strategy_state={},
        is_best=False,
        best_round=1,
        best_metric=0.5,
        seed=0,
    )
    folder.save_best(1, model, seed=0)
    folder.append_metrics(
        [
            {"phase": "train", "round": r, "node_id": n, "status": "ok", WEIGHT_KEY: 100}
            for r in (1, 2)
            for n in (10, 20)
        ]
    )
    grid = StatisticsSites({10: (_moments(1.0, 1.0), 100), 20: (_moments(3.0, 1.0), 100)})

    # Execute: the run ends, then it is resumed (the same call again)
    pool_delivered_teacher(grid, folder, settings, {})  # type: ignore[arg-type]
    pool_delivered_teacher(grid, folder, settings, {})  # type: ignore[arg-type]

    # Assert: one message per site, for round 1's model; best.pt pooled and marked, last.pt not
    assert [(m.metadata.dst_node_id, m.content["config"]["server-round"]) for m in grid.sent] == [
        (10, 1),
        (20, 1),
    ]
    assert load_metadata(folder.checkpoints / "best.pt") == {"round": 1, "seed": 0, "bn_statistics": "pooled"}
    torch.testing.assert_close(folder.load_model("best")["features.0.1.running_mean"], torch.full((8,), 2.0))
    assert "bn_statistics" not in (load_metadata(folder.checkpoints / "last.pt") or {})
    assert [r["site"] for r in folder.read_metrics() if r["phase"] == "bn-statistics"] == [
        "site_10",
        "site_20",
    ]
