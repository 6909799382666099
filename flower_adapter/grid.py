"""A Grid that waits for replies in tenths of a second, not in Flower's fixed 3 s steps.

Flower 1.42's deployed grid (``HttpGrid.send_and_receive``, as in 1.41) sleeps 3 s between two pulls of
the replies, so a round whose sites answer in 0.4 s still takes 3 s; the simulation's
``InMemoryGrid`` pulls every 0.1 s. :class:`QuickReplyGrid` wraps whichever grid Flower hands
the ServerApp (it subclasses the public ``flwr.serverapp.Grid`` base and delegates everything)
and pulls replies on a short schedule that backs off gently: 50 ms at first, growing by half
each time up to 0.5 s, so a site that answers at once is seen within ~50 ms and a site that
trains for minutes costs the SuperLink two pulls a second, not twenty.

The project's own round loop (server/rounds.py) waits for replies through
:func:`wait_for_replies` too, so both paths poll the same way.

A reply is listed by the SuperLink as soon as its site starts uploading it, before its arrays
have arrived; Flower's ``HttpGrid.pull_messages`` then waits for the missing objects with a
backoff of 1 s, 2 s, 4 s... up to 10 s (its ``pull_objects`` defaults), so a resnet18 reply that
takes 5 s to upload was taken up to 10 s late. Against Flower 1.42.0's ``HttpGrid`` (as 1.41.0's),
:class:`QuickReplyGrid` pulls replies as that method does (the same Flower functions, called
with :data:`REPLY_OBJECT_BACKOFF`); with any other grid or Flower version it calls the grid's
own ``pull_messages``.

:class:`QuickReplyGrid` also packs the model of every message it sends into one array per dtype
(flower_adapter/packed_arrays.py: a ResNet18 message is 16 Flower objects instead of 212) and
unpacks the replies; a reply whose model does not unpack, or is not the model its message
carried (names, shapes, dtypes), becomes an error reply saying why, so the round loop logs it and
leaves that site out like any failed site. Strategies and checkpoints see the usual records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import Error, Message, Metadata, RecordDict
from flwr.app.message import make_message
from flwr.serverapp import Grid

from common.packing import Layout, PackedModelError
from common.protocol import SITE_BAD_INPUT
from flower_adapter import FLWR_VERSION
from flower_adapter.packed_arrays import PackCache, pack_content, unpack_content

if TYPE_CHECKING:
    from flwr.proto.node_pb2 import NodeInfo
    from flwr.supercore.run import Run

logger = logging.getLogger(__name__)

PULL_ERRORS_TOLERATED = 5
"""Failed pulls in a row that are logged and retried (a busy SuperLink answers 500 at times)."""
REPLY_OBJECT_BACKOFF = (0.05, 0.5)
"""First and longest pause (s) between two asks for a reply's object still being uploaded."""
QUICK_PULL_FLWR_VERSION = FLWR_VERSION
"""The Flower version whose ``HttpGrid.pull_messages`` :func:`pull_replies` follows."""


@dataclass(frozen=True)
class PollSchedule:
    """How long to sleep between two pulls: ``first``, then times ``growth``, at most ``longest``."""

    first: float = 0.05
    growth: float = 1.5
    longest: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.longest:
            raise ValueError(f"first={self.first} must be > 0 and <= longest={self.longest}")
        if self.growth < 1.0:
            raise ValueError(f"growth={self.growth} must be >= 1")

    def intervals(self) -> Iterator[float]:
        interval = self.first
        while True:
            yield interval
            interval = min(interval * self.growth, self.longest)


DEFAULT_SCHEDULE = PollSchedule()


def wait_for_replies(
    grid: Grid,
    message_ids: Iterable[str],
    timeout: float | None,
    *,
    schedule: PollSchedule = DEFAULT_SCHEDULE,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[Message]:
    """Pull the replies to ``message_ids`` until all arrived or ``timeout`` seconds passed.

    ``timeout=None`` waits for all of them. The grid is pulled at least once, even with a
    timeout of 0, and last at the deadline. The replies come back in order of arrival.

    A pull that fails (a busy SuperLink answered an HTTP error) is retried on the schedule;
    more than ``PULL_ERRORS_TOLERATED`` failures in a row raise the last one.
    """
    pending = {message_id for message_id in message_ids if message_id}
    replies: list[Message] = []
    deadline = None if timeout is None else clock() + timeout
    intervals = schedule.intervals()
    errors = 0
    while pending:
        try:
            pulled = list(grid.pull_messages(sorted(pending)))
            errors = 0
        except Exception as exc:  # the grid's transport: httpx errors in deployment
            errors += 1
            if errors > PULL_ERRORS_TOLERATED:
                raise
            logger.warning("Pulling replies failed (%s: %s); trying again", type(exc).__name__, exc)
            pulled = []
        for reply in pulled:
            if reply.metadata.reply_to_message_id in pending:
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
        if not pending:
            break
        pause = next(intervals)
        if deadline is not None:
            left = deadline - clock()
            if left <= 0:
                break
            pause = min(pause, left)
        sleep(pause)
    return replies


class QuickReplyGrid(Grid):
    """Delegates to Flower's grid; only ``send_and_receive`` polls on :class:`PollSchedule`."""

    def __init__(
        self,
        inner: Grid,
        schedule: PollSchedule = DEFAULT_SCHEDULE,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.schedule = schedule
        self._sleep = sleep
        self._clock = clock
        # the layouts of the models each message carried, by message id, until its reply is taken
        self._sent: dict[str, dict[str, Layout]] = {}

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push ``messages`` with their models packed (see flower_adapter/packed_arrays.py)."""
        outgoing = list(messages)
        cache: PackCache = {}
        layouts: list[dict[str, Layout]] = []
        for message in outgoing:
            sent: dict[str, Layout] = {}
            if message.has_content() and message.content.array_records:
                message.content, sent = pack_content(message.content, cache)
            layouts.append(sent)
        message_ids = list(self.inner.push_messages(outgoing))
        for message_id, sent in zip(message_ids, layouts, strict=True):
            if message_id and sent:
                self._sent[message_id] = sent
        return message_ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies that arrived, their models unpacked and checked (see :func:`checked_reply`)."""
        if quick_pull_supported(self.inner):
            replies = pull_replies(self.inner, message_ids)
        else:
            replies = list(self.inner.pull_messages(message_ids))
        return [
            checked_reply(reply, self._sent.pop(reply.metadata.reply_to_message_id, {})) for reply in replies
        ]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        message_ids = list(self.push_messages(messages))
        return self.wait(message_ids, timeout)

    def wait(self, message_ids: Iterable[str], timeout: float | None) -> list[Message]:
        """The replies to ``message_ids`` (see :func:`wait_for_replies`)."""
        return wait_for_replies(
            self, message_ids, timeout, schedule=self.schedule, sleep=self._sleep, clock=self._clock
        )


def checked_reply(reply: Message, sent: dict[str, Layout]) -> Message:
    """``reply`` with its packed models unpacked, or an error reply in its place when a model does
    not unpack or is not the one its message carried (``sent``: layouts by record name)."""
    if reply.has_error() or not reply.has_content():
        return reply
    try:
        reply.content = unpack_content(reply.content, sent)
    except PackedModelError as exc:
        node = reply.metadata.src_node_id
        logger.error("Refused the reply of node %s: %s", node, exc)
        return error_reply(reply, f"its reply was refused: {exc}")
    return reply


def error_reply(reply: Message, reason: str) -> Message:
    """An error message that stands for ``reply`` (same sender, same message answered)."""
    metadata = Metadata(
        run_id=reply.metadata.run_id,
        message_id="",
        src_node_id=reply.metadata.src_node_id,
        dst_node_id=reply.metadata.dst_node_id,
        message_type=reply.metadata.message_type,
        group_id=reply.metadata.group_id,
        ttl=reply.metadata.ttl,
        reply_to_message_id=reply.metadata.reply_to_message_id,
        created_at=reply.metadata.created_at,
    )
    return make_message(metadata=metadata, error=Error(SITE_BAD_INPUT, reason))


def quick_reply_grid(grid: Grid) -> QuickReplyGrid:
    """``grid`` wrapped once (a grid that is already a QuickReplyGrid is returned as it is)."""
    return grid if isinstance(grid, QuickReplyGrid) else QuickReplyGrid(grid)


def quick_pull_supported(grid: Grid) -> bool:
    """Is ``grid`` the Flower 1.42.0 ``HttpGrid`` that :func:`pull_replies` was written against?"""
    import flwr
    from flwr.superlink.grid.http_grid import HttpGrid

    return type(grid) is HttpGrid and flwr.__version__ == QUICK_PULL_FLWR_VERSION


def pull_replies(grid: Grid, message_ids: Iterable[str]) -> list[Message]:
    """The replies to ``message_ids`` that the SuperLink lists, as ``HttpGrid.pull_messages`` of
    Flower 1.42.0 pulls them, except that objects still being uploaded are asked for again after
    :data:`REPLY_OBJECT_BACKOFF` (50 ms, growing to 0.5 s), not after 1 s growing to 10 s."""
    from typing import cast

    import httpx
    from flwr.app import Error, Metadata
    from flwr.app.message import make_message
    from flwr.common.constant import ErrorCode
    from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # pylint: disable=E0611
    from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE
    from flwr.supercore.date import now
    from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
    from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
    from flwr.supercore.inflatable.inflatable_utils import (
        ObjectPullError,
        inflate_object_from_contents,
        pull_objects,
    )

    client = grid._runtime_client  # type: ignore[attr-defined]  # Flower 1.42.0 only
    node = grid.node  # type: ignore[attr-defined]
    run_id = grid.run.run_id
    first, longest = REPLY_OBJECT_BACKOFF
    try:
        listed = client.PullMessages(PullAppMessagesRequest(message_ids=list(message_ids)))
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == httpx.codes.REQUEST_ENTITY_TOO_LARGE:
            logger.error("Pulling replies: the SuperLink's answer is too large (HTTP 413)")
            return []
        raise
    replies: list[Message] = []
    for header, tree in zip(listed.messages_list, listed.message_object_trees, strict=True):
        message_id = header.metadata.message_id
        try:
            contents = pull_objects(
                [subtree.object_id for subtree in iterate_object_tree(tree)],
                make_pull_object_fn_protobuf(client.PullObject, node, run_id),
                initial_backoff=first,
                backoff_cap=longest,
            )
        except ObjectPullError as exc:  # as Flower: an error reply in its place
            metadata = Metadata(
                run_id=run_id,
                message_id="",
                src_node_id=node.node_id,
                dst_node_id=node.node_id,
                message_type=SYSTEM_MESSAGE_TYPE,
                group_id="",
                ttl=0,
                reply_to_message_id=header.metadata.reply_to_message_id,
                created_at=now().timestamp(),
            )
            reason = f"Reply message objects are unavailable (the site's upload did not complete). {exc}"
            replies.append(
                make_message(metadata=metadata, error=Error(ErrorCode.MESSAGE_UNAVAILABLE, reason))
            )
            continue
        client.ConfirmMessageReceived(
            ConfirmMessageReceivedRequest(node=node, run_id=run_id, message_object_id=message_id)
        )
        message = cast(Message, inflate_object_from_contents(message_id, contents))
        message.metadata.__dict__["_message_id"] = message_id  # as Flower: not part of the content
        replies.append(message)
    return replies
