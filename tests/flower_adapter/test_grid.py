"""The ServerApp's grid wrapper: replies pulled on a short, gently growing interval."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from flower_adapter.grid import (
    PULL_ERRORS_TOLERATED,
    PollSchedule,
    QuickReplyGrid,
    quick_reply_grid,
    wait_for_replies,
)

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class FakeClock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


class SlowSites:
    """A grid whose node N answers on the Nth pull; records every call made to it."""

    def __init__(self, answer_on_pull: dict[int, int]) -> None:
        self.answer_on_pull = answer_on_pull
        self.calls: list[str] = []
        self.pulls = 0
        self.sent: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        self.calls.append("get_node_ids")
        return sorted(self.answer_on_pull)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        self.calls.append("push_messages")
        ids = []
        for message in messages:
            message.metadata._message_id = f"to-{message.metadata.dst_node_id}"
            self.sent[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.calls.append("pull_messages")
        self.pulls += 1
        replies = []
        for message_id in message_ids:
            message = self.sent[message_id]
            if self.answer_on_pull[message.metadata.dst_node_id] == self.pulls:
                replies.append(Message(RecordDict({"c": ConfigRecord({"ok": True})}), reply_to=message))
        return replies


def _messages(nodes: Iterable[int]) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=node, message_type="train") for node in nodes]


def test_send_and_receive_pulls_until_every_site_answered_on_a_growing_interval() -> None:
    sites, clock = SlowSites({1: 1, 2: 6}), FakeClock()
    grid = QuickReplyGrid(
        sites, PollSchedule(first=0.05, growth=2.0, longest=0.3), sleep=clock.sleep, clock=clock
    )  # type: ignore[arg-type]

    replies = list(grid.send_and_receive(_messages([1, 2]), timeout=None))

    assert [r.metadata.src_node_id for r in replies] == [1, 2]
    assert sites.calls == ["push_messages"] + ["pull_messages"] * 6
    assert clock.sleeps == pytest.approx([0.05, 0.1, 0.2, 0.3, 0.3])


def test_a_timeout_stops_pulling_and_returns_the_replies_that_came() -> None:
    sites, clock = SlowSites({1: 2, 2: 100}), FakeClock()
    grid = QuickReplyGrid(
        sites, PollSchedule(first=0.1, growth=1.0, longest=0.1), sleep=clock.sleep, clock=clock
    )  # type: ignore[arg-type]

    replies = list(grid.send_and_receive(_messages([1, 2]), timeout=0.35))

    assert [r.metadata.src_node_id for r in replies] == [1]
    assert sites.pulls == 5  # at 0, 0.1, 0.2, 0.3 s and at the deadline (the last sleep is cut to it)
    assert clock.sleeps == pytest.approx([0.1, 0.1, 0.1, 0.05])


def test_replies_already_there_cost_one_pull_and_no_sleep() -> None:
    sites, clock = SlowSites({1: 1, 2: 1}), FakeClock()
    ids = sites.push_messages(_messages([1, 2]))

    replies = wait_for_replies(sites, ids, 0.0, sleep=clock.sleep, clock=clock)  # type: ignore[arg-type]

    assert len(replies) == 2
    assert sites.pulls == 1
    assert clock.sleeps == []


def test_everything_else_is_the_inner_grids() -> None:
    sites = SlowSites({4: 1, 3: 1})
    grid = quick_reply_grid(sites)  # type: ignore[arg-type]

    assert list(grid.get_node_ids()) == [3, 4]
    assert grid.push_messages(_messages([3])) == ["to-3"]
    assert quick_reply_grid(grid) is grid
    assert sites.calls == ["get_node_ids", "push_messages"]


@pytest.mark.parametrize(("first", "growth", "longest"), [(0.0, 1.5, 0.5), (0.6, 1.5, 0.5), (0.05, 0.9, 0.5)])
def test_a_schedule_that_would_spin_or_shrink_is_refused(first: float, growth: float, longest: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        PollSchedule(first=first, growth=growth, longest=longest)


class FlakySuperLink(SlowSites):
    """Pulls fail ``failures`` times in a row (HTTP 500 from a busy SuperLink), then work."""

    def __init__(self, failures: int) -> None:
        super().__init__({1: 1})
        self.failures = failures

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        if self.failures:
            self.failures -= 1
            self.calls.append("pull_messages")
            raise RuntimeError("500 Internal Server Error")
        self.pulls = 0
        return super().pull_messages(message_ids)


def test_a_few_failed_pulls_are_retried() -> None:
    sites, clock = FlakySuperLink(failures=PULL_ERRORS_TOLERATED), FakeClock()
    grid = QuickReplyGrid(sites, sleep=clock.sleep, clock=clock)  # type: ignore[arg-type]

    replies = list(grid.send_and_receive(_messages([1]), timeout=60.0))

    assert [r.metadata.src_node_id for r in replies] == [1]
    assert sites.calls.count("pull_messages") == PULL_ERRORS_TOLERATED + 1


def test_a_superlink_that_keeps_failing_is_an_error() -> None:
    sites, clock = FlakySuperLink(failures=PULL_ERRORS_TOLERATED + 1), FakeClock()
    grid = QuickReplyGrid(sites, sleep=clock.sleep, clock=clock)  # type: ignore[arg-type]

    with pytest.raises(RuntimeError, match="500"):
        grid.send_and_receive(_messages([1]), timeout=60.0)


class UploadingSuperLink:
    """Flower's Runtime API for one reply whose objects are each "still uploading" at the first ask."""

    def __init__(self, reply: Message) -> None:
        from flwr.app.message import remove_content_from_message
        from flwr.common.serde import message_to_proto
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

        reply.metadata.__dict__["_message_id"] = reply.object_id
        self.header = message_to_proto(remove_content_from_message(reply))
        self.tree = get_object_tree(reply)
        self.contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(reply).items()}
        self.asked: dict[str, int] = {}
        self.confirmed: list[str] = []

    def PullMessages(self, request: object) -> object:  # noqa: N802 (Flower's method names)
        from flwr.proto.runtime_pb2 import PullAppMessagesResponse

        return PullAppMessagesResponse(messages_list=[self.header], message_object_trees=[self.tree])

    def PullObject(self, request: object) -> object:  # noqa: N802
        from flwr.proto.message_pb2 import PullObjectResponse

        object_id = request.object_id  # type: ignore[attr-defined]
        self.asked[object_id] = self.asked.get(object_id, 0) + 1
        if self.asked[object_id] == 1:
            return PullObjectResponse(object_found=True, object_available=False)
        return PullObjectResponse(
            object_found=True, object_available=True, object_content=self.contents[object_id]
        )

    def ConfirmMessageReceived(self, request: object) -> object:  # noqa: N802
        self.confirmed.append(request.message_object_id)  # type: ignore[attr-defined]
        return None


def test_replies_still_uploading_are_pulled_on_a_short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's HttpGrid waits 1 s, 2 s, 4 s... for a reply's objects; ours asks again after 50 ms."""
    import types

    from flwr.app import ArrayRecord, MetricRecord
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable import inflatable_utils

    from flower_adapter import grid as grid_module

    content = RecordDict(
        {"arrays": ArrayRecord([np.arange(6, dtype=np.float32)]), "metrics": MetricRecord({"n": 3})}
    )
    superlink = UploadingSuperLink(Message(content, dst_node_id=0, message_type="train"))
    fake_grid = types.SimpleNamespace(
        _runtime_client=superlink, node=Node(node_id=0), run=types.SimpleNamespace(run_id=1)
    )
    backoffs: list[tuple[float, float]] = []
    flower_pull = inflatable_utils.pull_objects

    def recording_pull(ids: list[str], fn: object, **kwargs: float) -> dict[str, bytes]:
        backoffs.append((kwargs["initial_backoff"], kwargs["backoff_cap"]))
        return flower_pull(ids, fn, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(inflatable_utils, "pull_objects", recording_pull)

    (reply,) = grid_module.pull_replies(fake_grid, ["instruction-1"])  # type: ignore[arg-type]

    assert backoffs == [grid_module.REPLY_OBJECT_BACKOFF]
    assert max(backoffs[0]) <= 0.5
    assert np.array_equal(reply.content["arrays"].to_numpy_ndarrays()[0], np.arange(6, dtype=np.float32))
    assert reply.content["metrics"]["n"] == 3
    assert superlink.confirmed == [superlink.header.metadata.message_id]
    assert all(count == 2 for count in superlink.asked.values())  # each asked again once it was there


def test_only_flowers_own_http_grid_is_pulled_by_hand() -> None:
    from flwr.superlink.grid.http_grid import HttpGrid

    from flower_adapter.grid import quick_pull_supported

    assert quick_pull_supported(HttpGrid(token="not used: nothing connects"))
    assert not quick_pull_supported(SlowSites({}))  # type: ignore[arg-type]
