"""What the coordinator's Fleet gateway (server/fleet_gateway.py) knows of Flower's Fleet API.

The paths a SuperNode calls (the only ones the gateway forwards), the largest array chunk Flower
puts in one call, and how to tell, from the bytes of a SuperLink's answer, that a pull found
nothing yet (the gateway then holds the site's call a while instead of answering it at once).
These read Flower's protobuf messages: Flower 1.42's (flower_adapter.FLWR_VERSION).
"""

from __future__ import annotations

from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
from flwr.proto.fleet_pb2 import PullMessagesResponse  # pylint: disable=E0611
from flwr.proto.message_pb2 import PullObjectResponse  # pylint: disable=E0611
from google.protobuf.message import DecodeError

FLEET_ROUTES = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
"""Every path a SuperNode calls (all POST). Nothing else is forwarded."""

PULL_MESSAGES = "/v1/fleet/pull-messages"
PULL_OBJECT = "/v1/fleet/pull-object"
MAX_ARRAY_CHUNK_SIZE: int = FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
"""Flower cuts an array into chunks of this many bytes (5 MiB), one push-object call each."""


def no_message_yet(content: bytes) -> bool:
    """Is this pull-messages answer an empty one (no message, no reconnect instruction)?"""
    try:
        reply = PullMessagesResponse.FromString(content)
    except DecodeError:
        return False
    return not reply.messages_list and not reply.HasField("reconnect")


def object_not_ready(content: bytes) -> bool:
    """Is this pull-object answer "found, but still being uploaded"?"""
    try:
        reply = PullObjectResponse.FromString(content)
    except DecodeError:
        return False
    return reply.object_found and not reply.object_available
