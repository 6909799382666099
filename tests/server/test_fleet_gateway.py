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
