"""The coordinator's console, from a synthetic run folder: what the page and /metrics show, who
may see them, and where they are (never on the sites' address)."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from common.errors import ConfigError
from server.cli import app as cli
from server.console.gateway_log import GatewayLog, classify
from server.console.nodes import NodeStatus, NodeWatch
from server.console.page import live
from server.console.prometheus import metrics_text
from server.console.run_state import GLOBAL, RunReader, phase_label
from server.console.web import ConsoleServer, create_app, loopback_host
from server.fleet_gateway import REFUSED_TEXT
from server.fleet_gateway import create_app as create_gateway
from server.progress_events import Progress
from server.run_folder import RunFolder

TOKEN = "test-token-0123456789"
KEY_A = "ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQ="
GATEWAY_LINES = [
    "2026-12-05 16:03:41,352 WARNING server.fleet_gateway: Refused POST /v1/control/list-runs from "
    "10.0.0.9:53674: 404 (not a Fleet API call)",
    "2026-12-05 16:03:42,000 WARNING server.fleet_gateway: Refused GET /%0Aevil from 10.0.0.9:53675: 404 "
    "(not a Fleet API call)",
    "2026-12-05 16:03:43,000 WARNING server.fleet_gateway: Refused POST /v1/fleet/push-object from "
    "[2001:db8::1]:4000: 413 (request body over 6291456 bytes, more than any Fleet call carries)",
    "2026-12-05 16:03:44,000 WARNING server.fleet_gateway: Cut off 10.0.0.7:1234: no complete request "
    "headers within 10 s",
    "2026-12-05 16:03:45,000 WARNING server.fleet_gateway: Refused 5 more connections over a limit "
    "(the last from 10.0.0.7:9: 32 connections open from 10.0.0.7, the most one address may hold)",
    "2026-12-05 16:03:46,000 ERROR server.fleet_gateway: Failed POST /v1/fleet/pull-messages from "
    "127.0.0.1:5: 502 (the SuperLink is not reachable)",
    "INFO:     Started server process [1]",
]


def site_row(site: str, phase: str, server_round: int, node: int, **metrics: Any) -> dict[str, Any]:
    return {"site": site, "phase": phase, "round": server_round, "node_id": node, "status": "ok", **metrics}


def write_run(root: Path, site_b: str = "site-b") -> Path:
    """A run after 3 of 4 teacher rounds (round 3 awaiting validation) and a finished student phase."""
    rows: list[dict[str, Any]] = []
    for r in (1, 2, 3):
        rows += [
            site_row("site-a", "train", r, 1, dp_epsilon=2.0 * r),
            site_row(site_b, "train", r, 2, loss=1.5 - 0.2 * r),
        ]
        if r > 1:  # round r's replies validate model r-1 (in-train validation)
            rows += [
                site_row(s, "evaluate", r - 1, n, val_auroc_macro=0.5 + 0.1 * r)
                for s, n in (("site-a", 1), (site_b, 2))
            ]
            rows.append(
                {
                    "site": "_global",
                    "phase": "aggregate",
                    "round": r - 1,
                    "train_loss": 1.4 - 0.2 * r,
                    "val_auroc_macro": 0.5 + 0.1 * r,
                    "val_balanced_accuracy": 0.4,
                    "seconds": 10.0 + r,
                }
            )
    rows.append(
        {
            "site": "site-a",
            "phase": "student",
            "round": 1,
            "node_id": 1,
            "status": "declined",
            "reason": "a site under DP declines it",
        }
    )
    for site, node in (("site-a", 1), (site_b, 2)):
        rows.append(
            site_row(
                site,
                "student-final",
                1,
                node,
                teacher_op_balanced_accuracy=0.8,
                student_op_balanced_accuracy=0.79,
                delivery_check_ok=1.0,
                teacher_auroc_macro=0.9,
                student_auroc_macro=0.88,
            )
        )
    root.mkdir(parents=True)
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"half a li')
    (root / "checkpoints").mkdir()
    pending = {"site": "_global", "phase": "aggregate", "round": 3, "train_loss": 0.7, "seconds": 9.0}
    (root / "checkpoints" / "state.json").write_text(
        json.dumps({"completed_round": 3, "pending_row": pending})
    )
    (root / "run_config.json").write_text(
        json.dumps({"num-rounds": 4, "dp-enabled": True, "dp-target-epsilon": 8.0})
    )
    sites = [
        {"name": "site-a", "node_id": 1, "public_key": KEY_A},
        {"name": site_b, "node_id": 2, "public_key": "x y"},
    ]
    (root / "sites.json").write_text(json.dumps(sites))
    (root / "deploy.json").write_text(json.dumps({"superlink_port": 1, "tls": True}))
    (root / "gateway.log").write_text("\n".join(GATEWAY_LINES) + "\n")
    RunFolder(root).append_event(Progress(3, 4, 2, 2, train_loss=0.7, best_round=2, seconds=9.0).to_event())
    return root


def online(state: dict[str, Any], run_dir: Path) -> dict[int, NodeStatus]:
    return {
        1: NodeStatus(1, "online", "2026-12-05T16:00:00"),
        2: NodeStatus(2, "offline", "", "2026-12-05T16:01:00"),
    }


@pytest.fixture
def reader(tmp_path: Path) -> RunReader:
    return RunReader(write_run(tmp_path / "run"), NodeWatch(tmp_path / "run", ask=online))


def test_the_snapshot_holds_the_run_as_the_coordinator_has_it(reader: RunReader) -> None:
    snap = reader.snapshot()

    assert (snap.phase, snap.rounds_done, snap.rounds_total) == ("teacher rounds", 3, 4)
    loss = snap.curves[0].series
    assert [r for r, _ in loss[GLOBAL]] == [1, 2, 3]  # round 3's row still awaits validation
    assert [r for r, _ in loss["site-b"]] == [1, 2, 3]
    assert "site-a" not in loss  # a DP site sends no training loss
    assert [r for r, _ in snap.curves[1].series[GLOBAL]] == [1, 2]
    assert snap.round_seconds == [(1, 12.0), (2, 13.0), (3, 9.0)]
    assert [(s.name, s.online, s.phase) for s in snap.sites] == [
        ("site-a", "online", "delivery check"),
        ("site-b", "offline", "delivery check"),
    ]
    assert snap.sites_online == 1
    assert snap.epsilon == {"site-a": (6.0, 3, "train")}
    assert snap.dp_target == 8.0
    assert snap.declines == [
        {"site": "site-a", "phase": "student", "round": 1, "reason": "a site under DP declines it"}
    ]
    assert snap.delivery is not None
    assert [s["verdict"] for s in snap.delivery["sites"]] == ["fit", "fit"]
    assert snap.keys[0]["fingerprint"].startswith("SHA256:")
    assert snap.keys[1]["fingerprint"] == "unreadable key"


def test_refused_calls_are_counted_by_reason_and_peer_and_failures_are_not() -> None:
    found = [classify(line) for line in GATEWAY_LINES]
    assert found == [
        ("404 not a Fleet API call", "10.0.0.9", 1),
        ("404 not a Fleet API call", "10.0.0.9", 1),
        ("413 request body over N bytes, more than any Fleet call carries", "2001:db8::1", 1),
        ("cut off: no complete request headers within N s", "10.0.0.7", 1),
        ("connection over a limit", "(several)", 5),
        None,
        None,
    ]


def test_the_gateway_log_is_read_incrementally_and_again_when_replaced(tmp_path: Path) -> None:
    path = tmp_path / "gateway.log"
    path.write_text(GATEWAY_LINES[0] + "\n" + GATEWAY_LINES[3][:30])  # the last line still being written
    log = GatewayLog(path)
    assert log.read().total == 1
    with path.open("a") as handle:
        handle.write(GATEWAY_LINES[3][30:] + "\n")
    assert log.read().by_reason["cut off: no complete request headers within N s"] == 1
    path.unlink()
    path.write_text(GATEWAY_LINES[0] + "\n")
    assert log.read().total == 1  # a new file: counted from its start


def test_the_page_escapes_what_sites_sent(tmp_path: Path) -> None:
    evil = "<script>alert(1)</script>"
    run = write_run(tmp_path / "run", site_b=evil)
    html = live(RunReader(run, NodeWatch(run, ask=online)).snapshot())
    assert evil not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # one dot per finished round on the global train-loss curve
    chart = re.search(r'data-curve="train loss".*?</svg>', html, re.S)
    assert chart is not None
    assert (
        len(re.findall(r'<g class="series" data-series="_global">((?:(?!</g>).)*)</g>', chart[0], re.S)) == 1
    )
    assert chart[0].count('data-round="') == 3 + 3  # the global model and site b's losses


def test_metrics_are_in_prometheus_text_format(reader: RunReader) -> None:
    text = metrics_text(reader.snapshot())
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert samples["cxr_fl_rounds_completed"] == "3"
    assert samples["cxr_fl_rounds_planned"] == "4"
    assert samples["cxr_fl_round_seconds_count"] == "3"
    assert samples["cxr_fl_round_seconds_sum"] == "34"
    assert samples["cxr_fl_sites_online"] == "1"
    assert samples['cxr_fl_replies_total{site="site-a",status="declined"}'] == "1"
    assert samples['cxr_fl_gateway_refused_total{reason="404 not a Fleet API call"}'] == "2"
    assert samples['cxr_fl_dp_epsilon_spent{site="site-a"}'] == "6"
    assert samples["cxr_fl_run_finished"] == "0"
    assert "# TYPE cxr_fl_replies_total counter" in text
    assert text.endswith("\n")


def test_only_the_token_opens_the_console(reader: RunReader) -> None:
    client = TestClient(create_app(reader, TOKEN), base_url="http://127.0.0.1:8000")
    assert client.get("/").status_code == 401
    assert client.get("/metrics").status_code == 401
    assert client.get("/live", headers={"authorization": "Bearer wrong"}).status_code == 401

    opened = client.get(f"/?token={TOKEN}", follow_redirects=False)
    assert opened.status_code == 303
    assert opened.headers["location"] == "./"
    assert "httponly" in opened.headers["set-cookie"].lower()
    page = client.get("/")  # the cookie now
    assert page.status_code == 200
    assert 'id="rounds-done">3<' in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert page.headers["referrer-policy"] == "no-referrer"
    assert client.post("/").status_code == 405  # read only
    fresh = TestClient(create_app(reader, TOKEN), base_url="http://127.0.0.1:8000")
    metrics = fresh.get(
        "/metrics",  # a Prometheus scrape: the token as a bearer credential
        headers={"authorization": f"Bearer {TOKEN}"},
    )
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")


def test_a_request_for_another_host_name_is_refused(reader: RunReader) -> None:
    client = TestClient(create_app(reader, TOKEN), base_url="http://attacker.example:8000")
    assert client.get(f"/?token={TOKEN}").status_code == 400  # DNS rebinding
    assert loopback_host("localhost:9999")
    assert loopback_host("[::1]:80")
    assert not loopback_host("127.0.0.1.attacker.example")


def test_the_console_listens_on_loopback_only(tmp_path: Path) -> None:
    server = ConsoleServer(tmp_path)
    try:
        assert server.socket.getsockname()[0] == "127.0.0.1"
        assert server.url.startswith(f"http://127.0.0.1:{server.port}/?token=")
        with pytest.raises(ConfigError, match="--port"):
            ConsoleServer(tmp_path, server.port)  # taken
    finally:
        server.socket.close()


def test_the_sites_address_does_not_serve_the_console() -> None:
    reached: list[httpx.Request] = []

    def superlink(request: httpx.Request) -> httpx.Response:
        reached.append(request)
        return httpx.Response(200)

    gateway = TestClient(
        create_gateway("https://127.0.0.1:1", None, transport=httpx.MockTransport(superlink))
    )
    for path in ("/", f"/?token={TOKEN}", "/live", "/metrics", "/console.js"):
        reply = gateway.get(path)
        assert reply.status_code == 404
        assert reply.text == REFUSED_TEXT
    assert reached == []


def test_console_command_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(cli, ["console", "--run-dir", str(tmp_path / "nothing")])
    assert missing.exit_code == 2
    assert "no such folder" in missing.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        busy = runner.invoke(cli, ["console", "--run-dir", str(tmp_path), "--port", str(port)])
    assert busy.exit_code == 2
    assert "--port" in busy.output
    same = runner.invoke(
        cli,
        [
            "start",
            "--run-dir",
            str(tmp_path / "run"),
            "--insecure",
            "--port",
            "9100",
            "--console-port",
            "9100",
        ],
    )
    assert same.exit_code == 2
    assert "sites' port" in same.output
    assert not (tmp_path / "run" / "deploy.json").exists()


def test_a_site_working_on_a_later_phase_says_so_until_its_rows_arrive(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()[:-1])]
    teacher_rows = [r for r in rows if r["phase"] in ("train", "evaluate", "aggregate")]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in teacher_rows))
    RunFolder(run).append_event(Progress(-1, -1, phase="distill", teacher="best").to_event())

    snap = RunReader(run, NodeWatch(run, ask=online)).snapshot()

    assert snap.phase == "distillation"
    assert [s.phase for s in snap.sites] == ["distillation (last answered: validation of round 2)"] * 2
    assert phase_label({"phase": "distill", "status": "ok"}, "federated student") == (
        "federated student (last answered: distillation)"
    )
    assert phase_label({"phase": "student-final"}, "finished") == "delivery check"
    assert phase_label({}, "teacher rounds") == "no reply yet"


def test_a_served_federation_shows_its_newest_run_and_lists_the_earlier_ones(tmp_path: Path) -> None:
    import os
    import shutil

    coordinator = write_run(tmp_path / "fed")  # the coordinator's files: sites, gateway, deploy.json
    first, second = coordinator / "runs" / "first", coordinator / "runs" / "second"
    for run in (first, second):
        run.mkdir(parents=True)
        for name in ("metrics.jsonl", "run_config.json", "events.jsonl"):
            shutil.copy(coordinator / name, run / name)
        shutil.copytree(coordinator / "checkpoints", run / "checkpoints")
    (first / "summary.json").write_text(json.dumps({"task": "t", "rounds_completed": 4}))
    os.utime(first / "run_config.json", (1_000_000, 1_000_000))  # submitted before the second
    (second / "run_config.json").write_text(json.dumps({"num-rounds": 6}))

    snap = RunReader(coordinator, NodeWatch(coordinator, ask=online)).snapshot()

    assert snap.run_dir == second.resolve()
    assert (snap.rounds_done, snap.rounds_total) == (3, 6)
    assert [s["name"] for s in snap.keys] == ["site-a", "site-b"]  # registered with the coordinator
    assert "first" in [r["name"] for r in snap.other_runs]
    assert "second" not in [r["name"] for r in snap.other_runs]
