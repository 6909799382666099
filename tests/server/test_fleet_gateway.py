"""The Fleet gateway forwards exactly the SuperNode's Fleet calls, unchanged, and nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.testclient import TestClient

from server.fleet_gateway import FLEET_ROUTES, create_app


class Upstream:
    """Stands in for the loopback SuperLink: records what reached it."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(await request.aread())
        self.requests.append(request)
        return httpx.Response(
            200, headers={"content-type": "application/protobuf", "x-reply": "1"}, content=chunks()
        )


async def chunks() -> AsyncIterator[bytes]:
    """A reply body that arrives in pieces, as from the network."""
    for _ in range(1000):
        yield b"ok"


@pytest.fixture
def gateway() -> tuple[TestClient, Upstream]:
    upstream = Upstream()
    app = create_app("https://127.0.0.1:1", None, transport=httpx.MockTransport(upstream))
    return TestClient(app), upstream


def test_the_supernodes_calls_are_the_fleet_clients_paths() -> None:
    """The allow-list is the set of paths Flower's SuperNode HTTP client calls, no more."""
    import inspect

    from flwr.supernode import fleet_http_client

    source = inspect.getsource(fleet_http_client)
    called = {line.split('"')[1] for line in source.splitlines() if 'path="/v1/' in line}
    assert called == FLEET_ROUTES


def test_a_fleet_call_is_forwarded_with_its_signed_headers_and_body(
    gateway: tuple[TestClient, Upstream],
) -> None:
    client, upstream = gateway
    body = bytes(range(256)) * 4096  # 1 MiB, binary
    headers = {
        "content-type": "application/protobuf",
        "flwr-public-key": "cHVibGlj",
        "flwr-signature": "c2lnbmF0dXJl",
        "flwr-timestamp": "2026-11-30T00:00:00+00:00",
    }
    reply = client.post("/v1/fleet/push-object", content=body, headers=headers)
    assert reply.status_code == 200
    assert reply.content == b"ok" * 1000
    assert reply.headers["x-reply"] == "1"
    (forwarded,) = upstream.requests
    assert forwarded.url.path == "/v1/fleet/push-object"
    assert upstream.bodies == [body]
    for key, value in headers.items():
        assert forwarded.headers[key] == value


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/control/stop-run"),
        ("POST", "/v1/runtime/pull-messages"),
        ("POST", "/v1/runtime/acquire-task"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/health"),
        ("GET", "/v1/fleet/pull-messages"),
        ("PUT", "/v1/fleet/push-messages"),
        ("POST", "/v1/fleet/../control/list-runs"),
        ("POST", "/v1/fleet/pull-messages/extra"),
        ("POST", "/v1/fleet"),
    ],
)
def test_everything_else_is_refused_here(
    gateway: tuple[TestClient, Upstream], method: str, path: str
) -> None:
    client, upstream = gateway
    reply = client.request(method, path, content=b"x")
    assert reply.status_code == 404
    assert upstream.requests == []  # never reached the SuperLink


class Answers:
    """A SuperLink whose answers to one call are given in order (the last one repeats)."""

    def __init__(self, *answers: bytes) -> None:
        self.answers = list(answers)
        self.calls: list[bytes] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(await request.aread())
        answer = self.answers[min(len(self.calls), len(self.answers)) - 1]
        headers = {"content-type": "application/protobuf", "content-length": str(len(answer))}
        return httpx.Response(200, headers=headers, content=arriving(answer))


async def arriving(answer: bytes) -> AsyncIterator[bytes]:
    """A reply body as it comes from the network, in pieces."""
    for start in range(0, len(answer), 1000):
        yield answer[start : start + 1000]


def held_gateway(answers: Answers, hold: float = 5.0) -> TestClient:
    from server.fleet_gateway import PULL_MESSAGES, PULL_OBJECT, no_message_yet, object_not_ready
    from server.grid import PollSchedule

    app = create_app(
        "https://127.0.0.1:1",
        None,
        transport=httpx.MockTransport(answers),
        held_calls={PULL_MESSAGES: (hold, no_message_yet), PULL_OBJECT: (hold, object_not_ready)},
        schedule=PollSchedule(first=0.01, growth=1.0, longest=0.01),
    )
    return TestClient(app)


def test_an_empty_pull_messages_is_held_until_a_message_is_there() -> None:
    """Flower's SuperNode sleeps 3 s after an empty pull: the gateway answers when there is work."""
    from flwr.proto.fleet_pb2 import PullMessagesResponse
    from flwr.proto.message_pb2 import Message as MessageProto

    empty = PullMessagesResponse().SerializeToString()
    one = PullMessagesResponse(messages_list=[MessageProto()]).SerializeToString()
    answers = Answers(empty, empty, empty, one)
    signed = {"flwr-signature": "c2lnbmF0dXJl", "flwr-timestamp": "2026-11-30T00:00:00+00:00"}

    reply = held_gateway(answers).post("/v1/fleet/pull-messages", content=b"node 7", headers=signed)

    assert reply.status_code == 200
    assert reply.content == one
    assert answers.calls == [b"node 7"] * 4  # the site's own request, asked again


def test_an_empty_pull_messages_is_answered_empty_when_the_hold_ends() -> None:
    from flwr.proto.fleet_pb2 import PullMessagesResponse

    empty = PullMessagesResponse().SerializeToString()
    answers = Answers(empty)

    reply = held_gateway(answers, hold=0.2).post("/v1/fleet/pull-messages", content=b"node 7")

    assert reply.status_code == 200
    assert reply.content == empty
    assert len(answers.calls) > 1


def test_a_reconnect_instruction_is_passed_on_at_once() -> None:
    from flwr.proto.fleet_pb2 import PullMessagesResponse, Reconnect

    reconnect = PullMessagesResponse(reconnect=Reconnect(reconnect=5)).SerializeToString()
    answers = Answers(reconnect)

    reply = held_gateway(answers).post("/v1/fleet/pull-messages", content=b"node 7")

    assert reply.content == reconnect
    assert len(answers.calls) == 1


def test_an_object_still_being_uploaded_is_held_until_it_is_available() -> None:
    """The SuperNode would back off 1 s, 2 s, 4 s... for an object that the server still uploads."""
    from flwr.proto.message_pb2 import PullObjectResponse

    uploading = PullObjectResponse(object_found=True, object_available=False).SerializeToString()
    there = PullObjectResponse(object_found=True, object_available=True, object_content=b"x" * 10_000)
    answers = Answers(uploading, uploading, there.SerializeToString())

    reply = held_gateway(answers).post("/v1/fleet/pull-object", content=b"object 1")

    assert PullObjectResponse.FromString(reply.content) == there
    assert len(answers.calls) == 3


def test_an_unknown_object_is_answered_at_once() -> None:
    from flwr.proto.message_pb2 import PullObjectResponse

    unknown = PullObjectResponse(object_found=False).SerializeToString()
    answers = Answers(unknown)

    reply = held_gateway(answers).post("/v1/fleet/pull-object", content=b"object 1")

    assert reply.content == unknown
    assert len(answers.calls) == 1
