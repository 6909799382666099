"""A real federation on loopback: `cxr-fl-server` and two `cxr-fl-client` processes.

Every test runs the installed commands as a coordinator and hospitals would (TLS and site
authentication on, fresh certificates and keys made by the commands), on the `synthetic`
source (no files), with a tiny teacher at 32 px. Every process started here is stopped by its
PID tree in the fixture's teardown, even when a test fails.
"""

from __future__ import annotations

import json

import pytest

from common.processes import free_port, stop_process_tree
from tests.e2e.harness import CLIENT, SERVER, Federation, completed_round, wait_for


def test_two_sites_train_and_distil_over_tls(federation: Federation) -> None:
    federation.prepare("site-a", "site-b")
    server = federation.start_server("--config", str(federation.write_config("num-rounds = 2\n")))
    federation.wait_listening()
    clients = [federation.start_client(site) for site in ("site-a", "site-b")]

    assert federation.wait(server, "server", 420) == 0, federation.output("server")
    for site, client in zip(("site-a", "site-b"), clients, strict=True):
        assert federation.wait(client, site, 60) == 0, federation.output(site)
        student = federation.root / site / "student"
        assert (student / "student.onnx").is_file()
        card = json.loads((student / "model_card.json").read_text())
        assert card  # the model card was written and parses
        assert "readable images" in federation.output(site)  # the data check ran first
    rows = federation.metrics()
    aggregates = [r for r in rows if r["phase"] == "aggregate"]
    assert [r["round"] for r in aggregates] == [1, 2]
    assert all(r["sites_trained"] == 2 for r in aggregates)
    distilled = sorted(r["site"] for r in rows if r["phase"] == "distill" and r["status"] == "ok")
    assert distilled == ["site-a", "site-b"]
    # the default delivered student: the federated one, exported and named at every site
    for site in ("site-a", "site-b"):
        delivered = json.loads((federation.root / site / "delivered.json").read_text())
        assert delivered["folder"] == "global_student"
        assert (federation.root / site / delivered["onnx"]).is_file()
    summary = json.loads((federation.run_dir / "summary.json").read_text())
    assert summary["federated_student"].startswith("delivered after 1 round")
    assert "run finished" in federation.output("server")


@pytest.mark.slow
def test_a_site_killed_in_round_one_rejoins(federation: Federation) -> None:
    federation.prepare("site-a", "site-b")
    config = federation.write_config(
        "num-rounds = 5\nkd-enabled = false\nround-timeout = 25.0\n"
        "min-train-sites = 1\nmin-evaluate-sites = 1\nmin-available-sites = 2\n"
    )
    server = federation.start_server("--config", str(config))
    federation.wait_listening()
    federation.start_client("site-a")
    victim = federation.start_client("site-b")
    log_b = federation.root / "site-b" / "supernode.log"
    wait_for(
        lambda: log_b.is_file() and "Receiving: train message" in log_b.read_text(errors="replace"),
        240,
        "site-b to receive its round-1 train message",
    )
    stop_process_tree(victim)  # killed mid-round, with its ClientApp
    federation.start_client("site-b", "--skip-check")

    assert federation.wait(server, "server", 420) == 0, federation.output("server")
    rows = federation.metrics()
    round1 = [r["status"] for r in rows if r["round"] == 1 and r["phase"] == "train"]
    # Flower reports the killed node as failed (no heartbeat), or it times out: never "ok".
    assert sorted(round1, key=lambda status: status != "ok") in (["ok", "failed"], ["ok", "timeout"])
    aggregates = [r for r in rows if r["phase"] == "aggregate"]
    assert [r["round"] for r in aggregates] == [1, 2, 3, 4, 5]
    assert aggregates[0]["sites_trained"] == 1
    # Flower counts the killed session as online for up to 2 heartbeats (60 s), and the restarted
    # site (same key, same node) is activated once it has expired. Rounds take seconds now, so
    # 5 rounds (each waiting round-timeout for the dead session while it counts as online) last
    # past that window: the restarted site trains again in one of the later rounds.
    rejoined = {
        r["round"] for r in rows if r["site"] == "site-b" and r["phase"] == "train" and r["status"] == "ok"
    }
    assert rejoined & {2, 3, 4, 5}, rows


@pytest.mark.slow
def test_server_killed_after_round_one_resumes(federation: Federation) -> None:
    federation.prepare("site-a", "site-b")
    config = federation.write_config("num-rounds = 2\nkd-enabled = false\n")
    server = federation.start_server("--config", str(config))
    federation.wait_listening()
    for site in ("site-a", "site-b"):
        federation.start_client(site)
    wait_for(lambda: completed_round(federation.run_dir) >= 1, 300, "round 1 to be checkpointed")
    stop_process_tree(server)  # the coordinator, its SuperLink and its ServerApp
    assert completed_round(federation.run_dir) == 1

    resumed = federation.start_server("--resume", sites=())
    assert federation.wait(resumed, "server", 300) == 0, federation.output("server")
    aggregates = [r["round"] for r in federation.metrics() if r["phase"] == "aggregate"]
    assert aggregates == [1, 2]  # no completed round lost or repeated
    assert "after round 1 of 2" in (federation.run_dir / "server.log").read_text()


@pytest.mark.slow
def test_refused_sites_are_told_why(federation: Federation) -> None:
    federation.prepare("site-a", "rogue")
    server = federation.start_server("--config", str(federation.write_config()), sites=("site-a",))
    federation.wait_listening()
    assert server.poll() is None

    # No activation grace period: an unregistered key is refused at once.
    unregistered = federation.start_client("rogue", "--skip-check", "--activate-timeout", "0")
    assert federation.wait(unregistered, "rogue", 90) == 1
    assert "not registered" in federation.output("rogue")

    no_ca = federation.spawn(
        "no-ca",
        CLIENT,
        "start",
        "--server",
        f"127.0.0.1:{federation.port}",
        "--site",
        "site-a",
        "--format",
        "synthetic",
        "--out",
        str(federation.root / "no-ca"),
        "--key",
        str(federation.keys / "site-a.key"),
        "--skip-check",
    )
    assert federation.wait(no_ca, "no-ca", 90) == 1
    assert "TLS failure" in federation.output("no-ca")

    wrong_port = federation.spawn(
        "wrong-port",
        CLIENT,
        "start",
        "--server",
        f"127.0.0.1:{free_port()}",
        "--site",
        "site-a",
        "--format",
        "synthetic",
        "--out",
        str(federation.root / "wrong-port"),
        "--ca",
        str(federation.certs / "ca.crt"),
        "--key",
        str(federation.keys / "site-a.key"),
        "--skip-check",
        "--connect-timeout",
        "3",
    )
    assert federation.wait(wrong_port, "wrong-port", 90) == 1
    assert "connection refused" in federation.output("wrong-port")

    status = federation.command(SERVER, "status", "--run-dir", str(federation.run_dir))
    assert f"127.0.0.1:{federation.port}: up" in status.stdout
    assert "site-a" in status.stdout
    stopped = federation.command(SERVER, "stop", "--run-dir", str(federation.run_dir))
    assert stopped.returncode == 0
    assert federation.wait(server, "server", 30) != 0
