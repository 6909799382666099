"""A consortium as docs/consortium.md runs it: kit -> init -> register -> start -> audit verify,
and a federation that stays up: serve -> two runs in a row -> evaluate -> audit verify.

The coordinator makes its certificates and one onboarding kit per site; each site is set up only
from its kit (`cxr-fl-client init`: its own key pair, its policy, a data check) and joins with the
`start.sh` that init wrote; only each site's `.pub` goes to the coordinator. Both sites train
and distil over TLS with site authentication; then both audit logs verify, and fail after an
edit. Every process is stopped by its PID tree in the fixture's teardown.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.harness import (
    SERVER,
    SITES,
    Federation,
    audit_events,
    kit_and_init,
    start_with_kits,
    verify_site,
    wait_for,
)


@pytest.mark.slow
def test_sites_set_up_from_kits_join_a_tls_federation_and_train(federation: Federation) -> None:
    federation.make_certs()
    site_dirs = {site: kit_and_init(federation, site) for site in SITES}
    server = start_with_kits(federation, site_dirs, "num-rounds = 1\n")
    federation.wait_listening()
    clients = [
        federation.spawn(site, "sh", str(site_dirs[site] / "start.sh"), "--threads", "1") for site in SITES
    ]
    assert federation.wait(server, "server", 420) == 0, federation.output("server")
    for site, client in zip(SITES, clients, strict=True):
        assert federation.wait(client, site, 60) == 0, federation.output(site)
        assert (site_dirs[site] / "out" / "global_student" / "student.onnx").is_file()
    aggregates = [r for r in federation.metrics() if r["phase"] == "aggregate"]
    assert [r["sites_trained"] for r in aggregates] == [2]

    run_dir = ["--run-dir", str(federation.run_dir)]
    assert audit_events(federation.run_dir / "audit.jsonl") == [
        "site-registered",
        "site-registered",
        "run-submitted",
        "site-audit-head",
        "site-audit-head",
        "run-finished",
    ]
    heads = {
        entry["fields"]["site"]: entry["fields"]["head"]
        for entry in map(json.loads, (federation.run_dir / "audit.jsonl").read_text().splitlines())
        if entry["event"] == "site-audit-head"
    }
    for site in SITES:
        code, output = verify_site(federation, site_dirs[site], "--anchor", heads[site])
        assert code == 0, output
        events = audit_events(site_dirs[site] / "state" / "audit" / "audit.jsonl")
        assert events[0] == "run-accepted"
        assert "model-exported" in events
    status = federation.command(SERVER, "status", *run_dir)
    assert "audit head: 5:" in status.stdout
    assert "server certificate: expires" in status.stdout
    anchor = status.stdout.split("audit head: ", 1)[1].split()[0]
    server_verify = federation.command(SERVER, "audit", "verify", *run_dir, "--anchor", anchor)
    assert server_verify.returncode == 0, server_verify.stdout + server_verify.stderr

    log = federation.run_dir / "audit.jsonl"
    log.write_text(log.read_text().replace("site-b", "site-x"))
    edited = federation.command(SERVER, "audit", "verify", *run_dir)
    assert edited.returncode == 1
    assert "NOT intact" in edited.stderr
    site_log = site_dirs["site-a"] / "state" / "audit" / "audit.jsonl"
    lines = site_log.read_text().splitlines(keepends=True)
    site_log.write_text("".join(lines[1:]))  # first entry removed
    code, output = verify_site(federation, site_dirs["site-a"])
    assert code == 1
    assert "NOT intact" in output
    site_log.write_text("".join(lines[:-1]))  # the tail cut: a consistent chain, but not the anchor's
    assert verify_site(federation, site_dirs["site-a"])[0] == 0
    code, output = verify_site(federation, site_dirs["site-a"], "--anchor", heads["site-a"])
    assert code == 1
    assert "cut off or rewritten" in output


def test_a_revoked_site_key_is_refused_at_once(federation: Federation) -> None:
    federation.prepare("site-a", "site-b")
    federation.start_server("--config", str(federation.write_config("num-rounds = 1\n")))
    federation.wait_listening()
    revoked = federation.command(SERVER, "revoke-site", "site-a", "--run-dir", str(federation.run_dir))
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    client = federation.start_client("site-a", "--activate-timeout", "1", "--skip-check")
    assert federation.wait(client, "site-a", 120) == 1, federation.output("site-a")
    assert "refused this site's key: it is not registered" in federation.output("site-a")
    again = federation.command(
        SERVER,
        "register-site",
        str(federation.keys / "site-a.pub"),
        "--name",
        "site-a",
        "--run-dir",
        str(federation.run_dir),
    )
    assert again.returncode == 2
    assert "was, for site 'site-a'" in again.stderr
    # (the run's own "run-submitted" may land before or after it: `start` submits concurrently)
    assert "site-unregistered" in audit_events(federation.run_dir / "audit.jsonl")


def _submit(federation: Federation, name: str, *settings: str) -> None:
    args = [
        "--run-dir",
        str(federation.run_dir),
        "--config",
        str(federation.write_config("num-rounds = 1\n")),
    ]
    submitted = federation.spawn(name, SERVER, "submit", name, *args, *(f"--set={s}" for s in settings))
    assert federation.wait(submitted, name, 420) == 0, federation.output(name)


def _rows(run: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_a_served_federation_runs_two_runs_in_a_row_then_evaluates(federation: Federation) -> None:
    federation.make_certs()
    site_dirs = {"site-a": kit_and_init(federation, "site-a")}
    site_dirs["site-b"] = kit_and_init(federation, "site-b", "--max-kd-epochs", "1")
    keys = [arg for site in SITES for arg in ("--site-key", str(site_dirs[site] / f"{site}.pub"))]
    run_dir = ["--run-dir", str(federation.run_dir)]
    server = federation.spawn("serve", SERVER, "serve", *federation.coordinator_options(), *keys)
    wait_for(lambda: "SuperLink listening" in federation.output("serve"), 90, "the served SuperLink")
    sites = {
        site: federation.spawn(site, "sh", str(site_dirs[site] / "serve.sh"), "--threads", "1")
        for site in SITES
    }

    _submit(federation, "first")  # both sites train and distil
    first = federation.run_dir / "runs" / "first"
    assert (first / "summary.json").is_file()
    assert [r["sites_trained"] for r in _rows(first) if r["phase"] == "aggregate"] == [2]
    assert all(process.poll() is None for process in sites.values())  # the sites stay up
    delivered = sorted((site_dirs["site-a"] / "out" / "runs").glob("*/global_student/student.onnx"))
    assert len(delivered) == 1

    _submit(federation, "second", "kd-epochs=2", "min-train-sites=1", "min-evaluate-sites=1")
    second = _rows(federation.run_dir / "runs" / "second")
    assert [r["sites_trained"] for r in second if r["phase"] == "aggregate"] == [1]
    declined = [r for r in second if r.get("site") == "site-b" and r["status"] == "declined"]
    assert declined
    assert "max-kd-epochs" in str(declined[0]["reason"])
    assert len(list((site_dirs["site-a"] / "out" / "runs").iterdir())) == 2  # each run's outputs apart

    server.terminate()  # the coordinator restarts; the sites wait for it
    assert federation.wait(server, "serve", 60) == 0, federation.output("serve")
    again = ["--certs", str(federation.certs), "--port", str(federation.port)]
    server = federation.spawn("serve-again", SERVER, "serve", *run_dir, *again)
    wait_for(lambda: "SuperLink listening" in federation.output("serve-again"), 90, "the SuperLink again")
    evaluation = federation.spawn(
        "evaluate", SERVER, "evaluate", str(delivered[0]), *run_dir, "--bootstrap", "200"
    )
    assert federation.wait(evaluation, "evaluate", 300) == 0, federation.output("evaluate")
    (table,) = (federation.run_dir / "evaluations").glob("*/cross_site.json")
    rows = {row["site"]: row for row in json.loads(table.read_text())["sites"]}
    assert {site: row["status"] for site, row in rows.items()} == {"site-a": "ok", "site-b": "ok"}
    assert (table.parent / "forest_plot.png").is_file()

    for site, process in sites.items():
        process.terminate()  # SIGTERM: a clean stop
        assert federation.wait(process, site, 60) == 130, federation.output(site)
    server.terminate()
    assert federation.wait(server, "serve-again", 60) == 0, federation.output("serve-again")
    events = audit_events(federation.run_dir / "audit.jsonl")
    assert events[-1] == "federation-stopped"
    assert {"run-submitted", "evaluation-submitted", "evaluation-finished"} <= set(events)
    assert events.count("federation-served") == 2
    assert "run-declined" in audit_events(site_dirs["site-b"] / "state" / "audit" / "audit.jsonl")
    verified = federation.command(SERVER, "audit", "verify", *run_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    for site in SITES:
        assert verify_site(federation, site_dirs[site])[0] == 0
    log = federation.run_dir / "audit.jsonl"
    log.write_text(log.read_text().replace("evaluation-finished", "evaluation-started"))
    assert federation.command(SERVER, "audit", "verify", *run_dir).returncode == 1
