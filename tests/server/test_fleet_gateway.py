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
    from flower_adapter.fleet_api import PULL_MESSAGES, PULL_OBJECT, no_message_yet, object_not_ready
    from flower_adapter.grid import PollSchedule

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


# -- what a call may cost: the body limit ------------------------------------------------------


def asgi_scope(
    method: str = "POST",
    raw_path: bytes = b"/v1/fleet/push-object",
    headers: list[tuple[bytes, bytes]] | None = None,
    client: tuple[str, int] = ("192.0.2.7", 4242),
) -> dict[str, object]:
    from urllib.parse import unquote

    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": unquote(raw_path.decode("ascii")),
        "raw_path": raw_path,
        "query_string": b"",
        "root_path": "",
        "headers": headers or [],
        "client": client,
        "server": ("127.0.0.1", 9092),
    }


class Call:
    """One call to the gateway's ASGI app, with a body that arrives in ``chunks`` (counted)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.received = 0
        self.sent: list[dict[str, object]] = []

    async def receive(self) -> dict[str, object]:
        if self.received < len(self.chunks):
            self.received += 1
            more = self.received < len(self.chunks)
            return {"type": "http.request", "body": self.chunks[self.received - 1], "more_body": more}
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, object]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])  # type: ignore[call-overload]

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0]["headers"])  # type: ignore[arg-type]


def run_call(app: object, scope: dict[str, object], call: Call) -> None:
    import asyncio

    asyncio.run(app(scope, call.receive, call.send))  # type: ignore[operator]


def test_a_body_announced_over_the_limit_is_refused_413_before_it_is_read() -> None:
    upstream = Upstream()
    app = create_app("https://127.0.0.1:1", None, transport=httpx.MockTransport(upstream))
    call = Call([b"x" * 2**20] * 1024)
    headers = [(b"content-length", b"1073741824"), (b"content-type", b"application/protobuf")]

    run_call(app, asgi_scope(headers=headers), call)

    assert call.status == 413
    assert call.headers[b"connection"] == b"close"  # the rest of the body is never read
    assert call.received == 0  # not one byte of the body was read
    assert upstream.requests == []


def test_a_body_of_unknown_length_is_cut_at_the_limit() -> None:
    """Chunked: read while it comes, never more than the limit (plus one chunk) held or sent."""
    upstream = Upstream()
    app = create_app("https://127.0.0.1:1", None, transport=httpx.MockTransport(upstream))
    call = Call([b"x" * 2**20] * 64)  # 64 MiB in 1 MiB chunks; the default limit is 6 MiB

    run_call(app, asgi_scope(headers=[(b"transfer-encoding", b"chunked")]), call)

    assert call.status == 413
    assert call.received == 7  # the chunk that went over the limit was the last one read
    assert upstream.bodies == []  # the SuperLink never got the whole (oversized) body


@pytest.mark.parametrize("path", ["/v1/fleet/pull-messages", "/v1/fleet/push-messages"])
def test_a_body_at_the_limit_is_forwarded(path: str) -> None:
    upstream = Upstream()
    app = create_app("https://127.0.0.1:1", None, transport=httpx.MockTransport(upstream), body_limit=10_000)
    call = Call([b"x" * 5000, b"y" * 5000])

    run_call(app, asgi_scope(raw_path=path.encode(), headers=[(b"content-length", b"10000")]), call)

    assert call.status == 200
    assert upstream.bodies[0] == b"x" * 5000 + b"y" * 5000


def test_the_default_limit_holds_every_call_a_site_makes_with_a_large_model() -> None:
    """The largest bodies a SuperNode sends for a reply with a 40 MB model (packed as the site
    sends it) and its metrics: every push-object and the push-messages fit the default limit,
    and the limit is no larger than about one array chunk (5 MiB) plus room for the records."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, Metadata, MetricRecord, RecordDict
    from flwr.app.message.message import make_message, remove_content_from_message
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
    from flwr.common.serde import message_to_proto
    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

    from flower_adapter.packed_arrays import pack_content
    from server.fleet_gateway import DEFAULT_BODY_LIMIT

    name = "backbone.layer{}.block{}.conv_with_a_rather_long_name.weight"
    model = ArrayRecord(
        {name.format(i // 10, i % 10): Array(np.zeros((5000,), dtype=np.float32)) for i in range(2000)}
    )  # 2000 tensors: a large layout record
    model["head.weight"] = Array(np.zeros((30_000_000 // 4,), dtype=np.float32))  # 30 MB in one tensor
    metrics = MetricRecord({f"metric_{i}": float(i) / 7 for i in range(200)})
    content, _ = pack_content(RecordDict({"arrays": model, "metrics": metrics}))
    metadata = Metadata(
        run_id=2**63 - 1,
        message_id="",
        src_node_id=2**63 - 1,
        dst_node_id=1,
        reply_to_message_id="f" * 64,
        group_id="1000",
        created_at=1.8e9,
        ttl=43200.0,
        message_type="train",
    )
    reply = make_message(metadata, content)
    metadata.__dict__["_message_id"] = reply.object_id
    node = Node(node_id=2**63 - 1)

    pushes = [
        PushObjectRequest(node=node, run_id=2**63 - 1, object_id=oid, object_content=obj.deflate())
        for oid, obj in get_all_nested_objects(reply).items()
    ]
    push_messages = PushMessagesRequest(
        node=node,
        messages_list=[message_to_proto(remove_content_from_message(reply))],
        message_object_trees=[get_object_tree(reply)],
        clientapp_runtime_list=[12.5],
    )
    sizes = [len(p.SerializeToString()) for p in pushes] + [len(push_messages.SerializeToString())]

    assert max(sizes) <= DEFAULT_BODY_LIMIT
    assert max(sizes) > FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE  # a full chunk was among them
    assert DEFAULT_BODY_LIMIT <= FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE + 2**20


# -- who did what: headers passed on, and the log ----------------------------------------------


def test_forwarding_headers_from_the_client_are_dropped_and_the_real_peer_is_passed_on() -> None:
    upstream = Upstream()
    app = create_app("https://127.0.0.1:1", None, transport=httpx.MockTransport(upstream))
    headers = [
        (b"x-forwarded-for", b"203.0.113.66"),
        (b"X-Forwarded-Host", b"evil.example"),
        (b"x-forwarded-proto", b"http"),
        (b"forwarded", b"for=203.0.113.66"),
        (b"x-real-ip", b"203.0.113.66"),
        (b"flwr-timestamp", b"2026-11-30T00:00:00+00:00"),
        (b"content-length", b"1"),
    ]

    run_call(app, asgi_scope(headers=headers, client=("198.51.100.9", 5555)), Call([b"x"]))

    (forwarded,) = upstream.requests
    assert forwarded.headers.get_list("x-forwarded-for") == ["198.51.100.9"]
    for name in ("x-forwarded-host", "x-forwarded-proto", "forwarded", "x-real-ip"):
        assert name not in forwarded.headers
    assert forwarded.headers["flwr-timestamp"] == "2026-11-30T00:00:00+00:00"


class Refusing:
    """A SuperLink that answers every call with ``status``."""

    def __init__(self, status: int) -> None:
        self.status = status

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        return httpx.Response(self.status, content=arriving(b"no"))


@pytest.mark.parametrize(
    ("method", "raw_path", "upstream_status", "status", "logged_path"),
    [
        ("TRACE", b"/v1/fleet/pull-messages", 200, 405, "/v1/fleet/pull-messages"),
        ("POST", b"/v1/fleet/pull-messages%0A2026-12-05 INFO forged", 200, 404, None),
        ("POST", b"/v1/control/list-runs", 200, 404, "/v1/control/list-runs"),
        ("POST", b"/v1/fleet/push-messages", 401, 401, "/v1/fleet/push-messages"),
        ("POST", b"/v1/fleet/get-run", 500, 500, "/v1/fleet/get-run"),
    ],
)
def test_every_refused_or_failed_call_is_logged_with_the_real_peer(
    caplog: pytest.LogCaptureFixture,
    method: str,
    raw_path: bytes,
    upstream_status: int,
    status: int,
    logged_path: str | None,
) -> None:
    import logging

    app = create_app("https://127.0.0.1:1", None, transport=httpx.MockTransport(Refusing(upstream_status)))
    headers = [(b"x-forwarded-for", b"203.0.113.66"), (b"content-length", b"1")]
    call = Call([b"x"])

    with caplog.at_level(logging.INFO, logger="server.fleet_gateway"):
        run_call(app, asgi_scope(method, raw_path, headers, client=("198.51.100.9", 5555)), call)

    assert call.status == status
    lines = [r.getMessage() for r in caplog.records if r.name == "server.fleet_gateway"]
    assert len(lines) == 1, lines
    (line,) = lines
    assert "198.51.100.9:5555" in line
    assert "203.0.113.66" not in line
    assert f" {status} " in line
    assert f"{method} " in line
    assert "\n" not in line
    assert "\r" not in line
    if logged_path is None:
        assert "/v1/fleet/pull-messages%0A2026-12-05%20INFO%20forged" in line
    else:
        assert f"{method} {logged_path} from" in line


def test_a_successful_call_leaves_no_line(
    caplog: pytest.LogCaptureFixture, gateway: tuple[TestClient, Upstream]
) -> None:
    import logging

    client, _ = gateway
    with caplog.at_level(logging.INFO, logger="server.fleet_gateway"):
        assert client.post("/v1/fleet/pull-object", content=b"x").status_code == 200
    assert [r for r in caplog.records if r.name == "server.fleet_gateway"] == []
