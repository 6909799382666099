"""Sites whose replies differ (issue 24, item 9): every phase aggregates what it can.

A site under its own DP sends its epsilon and no training loss, a site that opted in to
per-class metrics sends more scores than one that did not, and a site may send a model that
cannot be averaged. None of that may stop the run: metrics are averaged per key over the sites
that send them, and a reply that cannot be aggregated is left out with its reason.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

import server.app as server_app
from common.checkpoint import load_model_state
from common.protocol import (
    SITE_DECLINED,
    SITE_RECORD,
    STUDENT_FINAL_MESSAGE_TYPE,
    STUDENT_ROUND_MESSAGE_TYPE,
    VALIDATE_INCOMING_KEY,
    VALIDATION_RECORD,
    WEIGHT_KEY,
    error_reason,
)
from common.run_settings import from_mapping, load_schema, run_settings_from_config
from server.aggregation import weighted_mean_per_key
from server.central_dp import CentralDPSettings, with_central_dp
from server.rounds import RoundFailedError, TeacherRounds
from server.run_folder import RunFolder
from server.strategies import STRATEGIES, StrategySettings, build_strategy

pytestmark = pytest.mark.usefixtures("flower_task_identity")

Spoil = Callable[[RecordDict], None]
"""What a misbehaving site does to its train reply's content (in place)."""


@dataclass
class Site:
    """A fake site: it adds ``shift`` to every float it receives and sends these metrics."""

    name: str
    shift: float
    train: dict[str, float]
    validation: dict[str, float]
    under_dp: bool = False
    spoil: Spoil | None = None
    received: list[str] = field(default_factory=list)

    def answer(self, message: Message) -> Message:
        kind = message.metadata.message_type
        self.received.append(kind)
        if kind == STUDENT_ROUND_MESSAGE_TYPE and self.under_dp:  # as client/app.py's _student_round
            reason = error_reason(self.name, "a site under DP declines federated-student rounds")
            return Message(Error(SITE_DECLINED, reason), reply_to=message)
        content = RecordDict({SITE_RECORD: ConfigRecord({"name": self.name})})
        if kind in ("train", STUDENT_ROUND_MESSAGE_TYPE):
            state = message.content["arrays"].to_torch_state_dict()
            shifted = {k: v + self.shift if v.is_floating_point() else v for k, v in state.items()}
            content["arrays"] = ArrayRecord(shifted)
            content["metrics"] = MetricRecord(dict(self.train))
            if message.content["config"].get(VALIDATE_INCOMING_KEY):
                content[VALIDATION_RECORD] = MetricRecord(dict(self.validation))
            if self.spoil is not None and kind == "train":
                self.spoil(content)
        else:
            content["metrics"] = MetricRecord(dict(self.validation))
        return Message(content, reply_to=message)


class Sites:
    """A grid whose sites (node id -> Site) answer every message at once."""

    def __init__(self, sites: dict[int, Site]) -> None:
        self.sites = sites
        self.outbox: dict[str, Message] = {}
        self.count = 0

    def get_node_ids(self) -> list[int]:
        return sorted(self.sites)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for message in messages:
            self.count += 1
            message.metadata._message_id = f"m{self.count}"
            self.outbox[message.metadata.message_id] = self.sites[message.metadata.dst_node_id].answer(
                message
            )
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        return [self.outbox.pop(i) for i in message_ids if i in self.outbox]


def non_dp_site(**changes: Any) -> Site:
    """A site without DP that opted in to per-class metrics."""
    train = {WEIGHT_KEY: 30, "loss": 0.5, "train_seconds": 2.0, "accuracy": 0.7, "recall/covid-19": 0.4}
    validation = {WEIGHT_KEY: 10, "val_loss": 0.6, "val_auroc_macro": 0.8, "val_recall/covid-19": 0.5}
    return replace(Site("site_a", 1.0, train, validation), **changes)


def dp_site(**changes: Any) -> Site:
    """A site under its own DP: its epsilon and no training loss, timings or per-class scores."""
    train = {WEIGHT_KEY: 10, "dp_epsilon": 1.5, "dp_delta": 1e-5}
    validation = {WEIGHT_KEY: 30, "val_loss": 0.2, "val_auroc_macro": 0.6}
    return replace(Site("site_b", 3.0, train, validation, under_dp=True), **changes)


def _initial() -> ArrayRecord:
    return ArrayRecord({"w": torch.zeros(2), "b": torch.tensor(0.0)})


def _rounds(
    grid: Sites, folder: RunFolder, *, mode: str = "in-train", strategy: Any = None, min_train: int = 2
) -> TeacherRounds:
    return TeacherRounds(
        grid,  # type: ignore[arg-type]
        strategy or build_strategy(StrategySettings()),
        folder,
        num_rounds=2,
        round_timeout=5.0,
        site_wait_timeout=5.0,
        selection_metric="auroc_macro",
        seed=1,
        min_train_sites=min_train,
        min_evaluate_sites=2,
        validation_mode=mode,
    )


def _aggregates(folder: RunFolder) -> list[dict[str, Any]]:
    return [r for r in folder.read_metrics() if r["phase"] == "aggregate"]


def test_metrics_are_averaged_per_key_over_the_replies_that_carry_them() -> None:
    # Prepare: three replies with different key sets
    replies = [
        {WEIGHT_KEY: 30.0, "loss": 0.5, "auroc": 0.8},
        {WEIGHT_KEY: 10.0, "dp_epsilon": 1.5, "auroc": 0.6},
        {WEIGHT_KEY: 60.0, "loss": 1.0, "auroc": math.nan},
        {WEIGHT_KEY: 30.0, "dp_epsilon": 0.9},
    ]

    # Execute
    mean = weighted_mean_per_key(replies)

    # Assert: each key weighted over its carriers; NaN skipped; the total count of all replies;
    # epsilon the largest
    assert mean["loss"] == pytest.approx((30 * 0.5 + 60 * 1.0) / 90)
    assert mean["auroc"] == pytest.approx((30 * 0.8 + 10 * 0.6) / 40)
    assert mean["dp_epsilon"] == pytest.approx(1.5)  # the most any site spent, not an average
    assert mean[WEIGHT_KEY] == 130


@pytest.mark.parametrize("mode", ["in-train", "separate"])
def test_a_dp_site_and_a_site_without_dp_train_and_validate_together(tmp_path: Path, mode: str) -> None:
    # Prepare
    folder = RunFolder(tmp_path)

    # Execute
    result = _rounds(Sites({10: non_dp_site(), 20: dp_site()}), folder, mode=mode).run(_initial(), None)

    # Assert: both rounds trained with both sites; each metric averaged over the sites sending it
    aggregates = _aggregates(folder)
    assert [(r["round"], r["sites_trained"]) for r in aggregates] == [(1, 2), (2, 2)]
    for row in aggregates:
        assert row["train_loss"] == pytest.approx(0.5)  # the DP site sends no training loss
        assert row["train_dp_epsilon"] == pytest.approx(1.5)
        assert row["train_recall/covid-19"] == pytest.approx(0.4)
        assert row["val_auroc_macro"] == pytest.approx((10 * 0.8 + 30 * 0.6) / 40)
        assert row["val_recall/covid-19"] == pytest.approx(0.5)
    # the model is the weighted average of both sites' models: w += (30 * 1 + 10 * 3) / 40 a round
    np.testing.assert_allclose(result.arrays["w"].numpy(), [3.0, 3.0], rtol=1e-6)
    train_rows = [r for r in folder.read_metrics() if r["phase"] == "train"]
    assert {r["status"] for r in train_rows} == {"ok"}
    assert not any("loss" in r for r in train_rows if r["site"] == "site_b")


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_aggregates_sites_with_different_metric_keys(tmp_path: Path, name: str) -> None:
    # Prepare
    options = {"proximal_mu": 0.1} if name == "fedprox" else {}
    strategy = build_strategy(StrategySettings(strategy=name, **options))  # type: ignore[arg-type]

    # Execute
    _rounds(Sites({10: non_dp_site(), 20: dp_site()}), RunFolder(tmp_path), strategy=strategy).run(
        _initial(), None
    )

    # Assert
    aggregates = _aggregates(RunFolder(tmp_path))
    assert [(r["round"], r["sites_trained"]) for r in aggregates] == [(1, 2), (2, 2)]
    assert all(r["train_dp_epsilon"] == pytest.approx(1.5) for r in aggregates)


def _float64_and_integer_buffer(content: RecordDict) -> None:
    _arrays(content)["w"] = Array(_arrays(content)["w"].numpy().astype(np.float64))
    _arrays(content)["b"] = Array(np.asarray(_arrays(content)["b"].numpy(), dtype=np.int64))


def test_tensors_of_another_real_dtype_are_aggregated(tmp_path: Path) -> None:
    # Prepare: site_b sends float64 weights and an integer tensor where the global model has
    # float32 (FedAvg itself turns BatchNorm's integer num_batches_tracked into float64)
    sites = Sites({10: non_dp_site(), 20: non_dp_site(name="site_b", spoil=_float64_and_integer_buffer)})

    # Execute
    result = _rounds(sites, RunFolder(tmp_path)).run(_initial(), None)

    # Assert: both sites in both rounds; w moves by the mean shift (1 + 1) / 2 each round
    assert [r["sites_trained"] for r in _aggregates(RunFolder(tmp_path))] == [2, 2]
    np.testing.assert_allclose(result.arrays["w"].numpy(), [2.0, 2.0], rtol=1e-6)


def _model_under_another_name(content: RecordDict) -> None:
    content["weights"] = content.pop("arrays")


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_a_model_under_another_record_name_is_aggregated(tmp_path: Path, name: str) -> None:
    # Prepare
    options = {"proximal_mu": 0.1} if name == "fedprox" else {}
    strategy = build_strategy(StrategySettings(strategy=name, **options))  # type: ignore[arg-type]
    sites = Sites({10: non_dp_site(), 20: non_dp_site(name="site_b", spoil=_model_under_another_name)})

    # Execute
    _rounds(sites, RunFolder(tmp_path), strategy=strategy).run(_initial(), None)

    # Assert
    assert [r["sites_trained"] for r in _aggregates(RunFolder(tmp_path))] == [2, 2]


def test_central_dp_aggregates_sites_with_different_metric_keys(tmp_path: Path) -> None:
    # Prepare
    central = CentralDPSettings(noise_multiplier=0.1, clipping_norm=10.0)
    strategy = with_central_dp(build_strategy(StrategySettings()), central, 2)

    # Execute
    _rounds(Sites({10: non_dp_site(), 20: dp_site()}), RunFolder(tmp_path), strategy=strategy).run(
        _initial(), None
    )

    # Assert: the strategy's own metric (central DP's epsilon) beside the sites' averages
    aggregates = _aggregates(RunFolder(tmp_path))
    assert [r["sites_trained"] for r in aggregates] == [2, 2]
    assert all(
        r["train_central_dp_epsilon"] > 0 and r["train_loss"] == pytest.approx(0.5) for r in aggregates
    )


def _arrays(content: RecordDict) -> ArrayRecord:
    return content["arrays"]  # type: ignore[return-value]


def _wrong_shape(content: RecordDict) -> None:
    _arrays(content)["w"] = Array(np.ones(1, dtype=np.float32))


def _missing_tensor(content: RecordDict) -> None:
    del _arrays(content)["b"]


def _extra_tensor(content: RecordDict) -> None:
    _arrays(content)["extra"] = Array(np.ones(2, dtype=np.float32))


def _complex_values(content: RecordDict) -> None:
    _arrays(content)["w"] = Array(np.ones(2, dtype=np.complex64))


def _non_finite(content: RecordDict) -> None:
    _arrays(content)["w"] = Array(np.array([1.0, math.nan], dtype=np.float32))


def _two_models(content: RecordDict) -> None:
    content["more-arrays"] = ArrayRecord({"w": torch.ones(2), "b": torch.tensor(1.0)})


def _no_example_count(content: RecordDict) -> None:
    content["metrics"] = MetricRecord({"loss": 0.1})


def _non_finite_example_count(content: RecordDict) -> None:
    content["metrics"] = MetricRecord({WEIGHT_KEY: math.inf})


def _zero_examples(content: RecordDict) -> None:
    content["metrics"] = MetricRecord({WEIGHT_KEY: 0})


SPOILED = {
    "wrong shape": (_wrong_shape, "'w' has shape (1,), the global model's (2,)"),
    "missing tensor": (_missing_tensor, "missing ['b']"),
    "extra tensor": (_extra_tensor, "extra ['extra']"),
    "complex values": (_complex_values, "'w' holds complex64 values, not real numbers"),
    "non-finite values": (_non_finite, "'w' holds non-finite values"),
    "two models": (_two_models, "2 model records"),
    "no example count": (_no_example_count, "no example count"),
    "infinite example count": (_non_finite_example_count, "not a finite number > 0"),
    "zero examples": (_zero_examples, "not a finite number > 0"),
}


@pytest.mark.parametrize("bad_node", [10, 20])  # the spoiled reply first or second in the average
@pytest.mark.parametrize("spoil", SPOILED, ids=list(SPOILED))
def test_a_reply_that_cannot_be_aggregated_is_left_out_with_its_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, spoil: str, bad_node: int
) -> None:
    # Prepare: the spoiled site is site_a or site_b; the other one trains as it should. Both
    # send the same metric keys: Flower's key check alone would not catch the spoiled model.
    function, reason = SPOILED[spoil]
    sites = {10: non_dp_site(), 20: non_dp_site(name="site_b", shift=3.0)}
    sites[bad_node].spoil = function
    good = sites[30 - bad_node]
    folder = RunFolder(tmp_path)

    # Execute
    with caplog.at_level(logging.WARNING, logger="server"):
        result = _rounds(Sites(sites), folder, min_train=1).run(_initial(), None)

    # Assert: the run completed with the good site's model; the bad reply reported and logged
    np.testing.assert_allclose(result.arrays["w"].numpy(), [2 * good.shift] * 2, rtol=1e-6)
    assert [r["sites_trained"] for r in _aggregates(folder)] == [1, 1]
    rows = [r for r in folder.read_metrics() if r["phase"] == "train" and r["site"] == sites[bad_node].name]
    assert [r["status"] for r in rows] == ["dropped", "dropped"]
    assert all(reason in r["reason"] for r in rows)
    logged = [m for m in caplog.messages if "not aggregated" in m]
    assert [m.split(":")[0] for m in logged] == ["Round 1", "Round 2"]
    assert reason in logged[0]


def test_a_round_without_enough_aggregatable_replies_fails_with_the_reason(tmp_path: Path) -> None:
    # Prepare
    sites = {10: non_dp_site(spoil=_wrong_shape), 20: dp_site()}

    # Execute
    with pytest.raises(RoundFailedError) as failure:
        _rounds(Sites(sites), RunFolder(tmp_path)).run(_initial(), None)

    # Assert: a round failure naming the site and why (resume advice), not Flower's exception
    assert "only 1 site(s) trained" in str(failure.value)
    assert "site_a: dropped (reply not aggregated: its tensor 'w' has shape (1,)" in str(failure.value)


def test_a_validation_without_example_count_is_left_out_of_the_average(tmp_path: Path) -> None:
    # Prepare
    dp = dp_site()
    dp.validation = {"val_loss": 0.2, "val_auroc_macro": 0.6}
    folder = RunFolder(tmp_path)

    # Execute
    _rounds(Sites({10: non_dp_site(), 20: dp}), folder).run(_initial(), None)

    # Assert
    assert all(r["val_auroc_macro"] == pytest.approx(0.8) for r in _aggregates(folder))
    evaluate = [r for r in folder.read_metrics() if r["phase"] == "evaluate" and r["site"] == "site_b"]
    assert evaluate
    assert all(r["status"] == "dropped" and "no example count" in r["reason"] for r in evaluate)


def _student_settings(min_train_sites: int) -> tuple[Any, StrategySettings]:
    config = {
        **load_schema(),
        "min-train-sites": min_train_sites,
        "min-evaluate-sites": 1,
        "min-available-sites": 2,
        "kd-federated-student-rounds": 2,
        "kd-width-mult": 0.35,
    }
    return run_settings_from_config(config), from_mapping(StrategySettings, config)


def _students(site_a: Site, site_b: Site, site_c: Site | None = None) -> Sites:
    site_a.train = {WEIGHT_KEY: 30, "student_loss": 0.5, "student_recall/covid-19": 0.4}
    site_b.train = {WEIGHT_KEY: 10, "student_loss": 0.7}
    return Sites({10: site_a, 20: site_b, **({30: site_c} if site_c else {})})


def test_the_federated_student_goes_on_without_a_dp_site_and_with_different_keys(tmp_path: Path) -> None:
    # Prepare: a DP site (declines), and two sites without DP whose metric keys differ
    settings, strategy = _student_settings(min_train_sites=1)
    dp = dp_site()
    dp.name = "site_c"
    grid = _students(non_dp_site(), Site("site_b", 3.0, {}, {WEIGHT_KEY: 10}), dp)
    folder = RunFolder(tmp_path)
    folder.checkpoints.mkdir(parents=True)

    # Execute
    rows = server_app.federated_student(grid, folder, settings, strategy, {})  # type: ignore[arg-type]

    # Assert: two rounds of the two non-DP sites; the DP site declined and still got the final student
    student_rows = [r for r in rows if r["phase"] == "student"]
    assert sorted((r["round"], r["site"], r["status"]) for r in student_rows) == [
        (1, "site_a", "ok"),
        (1, "site_b", "ok"),
        (1, "site_c", "declined"),
        (2, "site_a", "ok"),
        (2, "site_b", "ok"),
        (2, "site_c", "declined"),
    ]
    assert STUDENT_FINAL_MESSAGE_TYPE in dp.received
    assert (folder.checkpoints / "student.pt").is_file()


def test_a_student_that_cannot_be_aggregated_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: site_b sends a student with one tensor of another shape
    settings, strategy = _student_settings(min_train_sites=1)

    class WrongStudent(Site):
        def answer(self, message: Message) -> Message:
            reply = super().answer(message)
            if message.metadata.message_type == STUDENT_ROUND_MESSAGE_TYPE:
                arrays = _arrays(reply.content)
                key = next(k for k, a in arrays.items() if len(a.shape) == 4)
                arrays[key] = Array(np.ones((1, 1, 1, 1), dtype=np.float32))
            return reply

    grid = _students(non_dp_site(), WrongStudent("site_b", 3.0, {}, {WEIGHT_KEY: 10}))
    folder = RunFolder(tmp_path)
    folder.checkpoints.mkdir(parents=True)
    initial: list[dict[str, torch.Tensor]] = []
    real_broadcast = server_app.broadcast

    def recording(grid: Any, arrays: ArrayRecord, *args: Any) -> Any:
        initial.append(arrays.to_torch_state_dict())
        return real_broadcast(grid, arrays, *args)

    monkeypatch.setattr(server_app, "broadcast", recording)

    # Execute
    rows = server_app.federated_student(grid, folder, settings, strategy, {})  # type: ignore[arg-type]

    # Assert: the global student is site_a's alone (shifted by 1 in each of the 2 rounds)
    statuses = sorted((r["round"], r["site"], r["status"]) for r in rows if r["phase"] == "student")
    assert statuses == [
        (1, "site_a", "ok"),
        (1, "site_b", "dropped"),
        (2, "site_a", "ok"),
        (2, "site_b", "dropped"),
    ]
    delivered = load_model_state(folder.checkpoints / "student.pt")
    for key, value in initial[0].items():
        if value.is_floating_point():
            torch.testing.assert_close(delivered[key], value + 2.0, rtol=1e-5, atol=1e-4)


def test_the_run_summary_and_curves_take_rows_with_different_keys(tmp_path: Path) -> None:
    # Prepare: a federation whose sites are all under DP (no training loss anywhere), a site
    # row without validation scores, and an aggregate row that lacks the selection metric
    from server.reporting import write_learning_curves, write_summary

    folder = RunFolder(tmp_path)
    folder.append_metrics(
        [
            {"round": 1, "phase": "train", "site": "site_a", "status": "ok", "dp_epsilon": 1.2},
            {"round": 1, "phase": "train", "site": "site_b", "status": "dropped", "reason": "its tensor"},
            {"round": 1, "phase": "aggregate", "site": "_global", "sites_trained": 1, "sites_sampled": 2},
            {"round": 2, "phase": "aggregate", "site": "_global", "val_auroc_macro": 0.7, "val_loss": 0.4},
        ]
    )
    settings = run_settings_from_config(load_schema())

    # Execute
    write_learning_curves(folder, "auroc_macro")
    summary = write_summary(
        folder,
        settings=settings,
        strategy="fedavg",
        best_round=2,
        distill_rows=[{"site": "site_a", "status": "ok", "student_auroc_macro": 0.6}],
        seconds=1.0,
    )

    # Assert
    assert (tmp_path / "learning_curves.png").is_file()
    assert summary["dp_epsilon_spent"] == {"site_a": 1.2}
    assert summary["best_validation"] == {"val_auroc_macro": 0.7, "val_loss": 0.4}
    markdown = (tmp_path / "summary.md").read_text()
    assert "| 1 | 1/2 | - | - | - | - |" in markdown
