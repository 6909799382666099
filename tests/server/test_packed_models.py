"""The coordinator's grid sends models packed and checks the ones that come back; every strategy
aggregates replies that travelled packed exactly as the same replies sent tensor by tensor."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.protocol import SITE_BAD_INPUT, WEIGHT_KEY
from flower_adapter.grid import QuickReplyGrid
from flower_adapter.packed_arrays import pack_content
from server.central_dp import CentralDP, CentralDPSettings
from server.rounds import describe
from server.strategies import STRATEGIES, StrategySettings, build_strategy

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(5, 3))
    model[1].running_mean.normal_()
    model[1].num_batches_tracked += 10 + seed
    return model.state_dict()


class Sites:
    """An inner grid that records what it was asked to send and answers with ``answer(message)``."""

    def __init__(self, answer: Callable[[Message], Message]) -> None:
        self.answer = answer
        self.pushed: list[Message] = []

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata._message_id = f"to-{message.metadata.dst_node_id}"
            self.pushed.append(message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        return [self.answer(m) for m in self.pushed if m.metadata.message_id in wanted]


def _site_reply(state: dict[str, torch.Tensor], examples: int) -> Callable[[Message], Message]:
    """What a site's ClientApp (with packed_arrays_mod) sends back: its model, packed."""

    def answer(message: Message) -> Message:
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({WEIGHT_KEY: examples})})
        return Message(pack_content(content)[0], reply_to=message)

    return answer


def _train_messages(state: dict[str, torch.Tensor], nodes: list[int]) -> list[Message]:
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": 1})})
    return [Message(content, dst_node_id=node, message_type="train") for node in nodes]


def test_the_grid_sends_one_packed_model_and_hands_back_unpacked_replies() -> None:
    sites = Sites(_site_reply(_state(1), 10))
    grid = QuickReplyGrid(sites)  # type: ignore[arg-type]

    replies = list(grid.send_and_receive(_train_messages(_state(0), [1, 2]), timeout=None))

    assert [sorted(m.content) for m in sites.pushed] == [["arrays.layout", "arrays.packed", "config"]] * 2
    assert sites.pushed[0].content["arrays.packed"] is sites.pushed[1].content["arrays.packed"]
    assert len(replies) == 2
    assert not any(r.has_error() for r in replies)
    state = replies[0].content["arrays"].to_torch_state_dict()  # type: ignore[union-attr]
    for name, tensor in _state(1).items():
        assert state[name].dtype == tensor.dtype
        assert torch.equal(state[name], tensor)
    assert grid._sent == {}  # nothing kept once every reply came


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda s: {**s, "2.bias": torch.zeros(4)}, r"'2.bias' has shape \[4\], the model's is \[3\]"),
        (lambda s: {k: v for k, v in s.items() if k != "0.bias"}, "missing '0.bias'"),
        (lambda s: {**s, "0.weight": s["0.weight"].double()}, "dtype float64, the model's is float32"),
    ],
)
def test_a_reply_whose_model_is_not_the_one_sent_becomes_a_failed_site_with_the_reason(
    edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], reason: str
) -> None:
    sites = Sites(_site_reply(edit(_state(1)), 10))
    grid = QuickReplyGrid(sites)  # type: ignore[arg-type]
    messages = _train_messages(_state(0), [5])

    replies = list(grid.send_and_receive(messages, timeout=None))

    assert replies[0].has_error()
    assert replies[0].error.code == SITE_BAD_INPUT
    _accepted, outcomes = describe(replies, {"to-5": 5}, {5: "site-e"})
    assert [(o.site, o.status) for o in outcomes] == [("site-e", "failed")]
    assert "its reply was refused" in outcomes[0].reason
    assert re.search(reason, outcomes[0].reason)


def test_a_site_may_answer_an_averaged_float64_counter_with_its_own_integer_one() -> None:
    """After one FedAvg round Flower's average holds num_batches_tracked as float64."""
    sent = {k: (v.double() if k.endswith("num_batches_tracked") else v) for k, v in _state(0).items()}
    grid = QuickReplyGrid(Sites(_site_reply(_state(1), 10)))  # type: ignore[arg-type]

    replies = list(grid.send_and_receive(_train_messages(sent, [1]), timeout=None))

    assert not replies[0].has_error()


def _replies(packed: bool) -> list[Message]:
    """Three sites' train replies (different weights, sizes, counters), as the strategy gets them."""
    replies = []
    for node, examples in ((1, 30), (2, 50), (3, 20)):
        sent = _train_messages(_state(0), [node])[0]
        sent.metadata._message_id = f"to-{node}"
        content = RecordDict(
            {
                "arrays": ArrayRecord(_state(node)),
                "metrics": MetricRecord({WEIGHT_KEY: examples, "loss": 0.5}),
            }
        )
        reply = Message(content, reply_to=sent)
        if packed:  # sent packed by the site, unpacked and checked by the grid
            grid = QuickReplyGrid(
                Sites(lambda _m, c=content, s=sent: Message(pack_content(c)[0], reply_to=s))
            )  # type: ignore[arg-type]
            reply = next(iter(grid.send_and_receive([sent], timeout=None)))
        replies.append(reply)
    return replies


STRATEGY_CASES = [
    *(
        (StrategySettings(strategy=name, **({"proximal_mu": 0.1} if name == "fedprox" else {})), False)
        for name in STRATEGIES.names()
    ),
    (StrategySettings(strategy="krum", krum_malicious=1), False),
    (StrategySettings(), True),  # Flower's client-side fixed clipping wrapper: FedAvg plus seeded noise
]


@pytest.mark.parametrize(
    ("settings", "central_dp"),
    STRATEGY_CASES,
    ids=lambda case: case.strategy if isinstance(case, StrategySettings) else ("central-dp" if case else ""),
)
def test_every_strategy_aggregates_packed_replies_exactly_as_per_tensor_ones(
    settings: StrategySettings, central_dp: bool
) -> None:
    results = []
    for packed in (False, True):
        strategy = build_strategy(settings)
        if central_dp:
            strategy = CentralDP(strategy, CentralDPSettings(noise_multiplier=1.0, clipping_norm=0.5), 3)  # type: ignore[assignment]
        if hasattr(strategy, "current_arrays"):  # FedAdam/FedYogi: the server model of this round
            strategy.current_arrays = {k: v.numpy() for k, v in ArrayRecord(_state(0)).items()}
        np.random.seed(3)  # Flower's DP noise draws from numpy's global generator
        arrays, metrics = strategy.aggregate_train(1, _replies(packed))
        assert arrays is not None
        results.append((arrays, metrics))
    (plain, plain_metrics), (packed_arrays, packed_metrics) = results
    assert list(packed_arrays) == list(plain)
    for name in plain:
        a, b = plain[name].numpy(), packed_arrays[name].numpy()
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b, err_msg=name)  # bit for bit
    assert dict(packed_metrics or {}) == dict(plain_metrics or {})
