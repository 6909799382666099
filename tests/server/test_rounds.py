"""How the server collects the sites' replies in a round."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from common.protocol import SITE_RECORD
from server.rounds import collect

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
