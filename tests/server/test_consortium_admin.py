"""The coordinator's side of a consortium: revoked keys, certificate expiry, its audit log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.audit import verify_chain
from common.errors import ConfigError
from common.pki import make_site_key, public_key_body
from server.cli import app
from server.deploy import Coordinator
from server.security import make_certificates

runner = CliRunner()


def _registered(tmp_path: Path, *names: str) -> Coordinator:
    coordinator = Coordinator(tmp_path / "run")
    coordinator.run_dir.mkdir()
    rows = []
    for i, name in enumerate(names):
        keys = make_site_key(tmp_path / "keys", name)
        body = public_key_body(keys.public_key.read_text())
        rows.append({"name": name, "public_key": body, "node_id": 100 + i, "key_file": str(keys.public_key)})
    coordinator.sites_path.write_text(json.dumps(rows))
    return coordinator


def test_a_revoked_key_is_forgotten_audited_and_refused_from_then_on(tmp_path: Path) -> None:
    coordinator = _registered(tmp_path, "site-a", "site-b")
    result = runner.invoke(app, ["revoke-site", "site-a", "--run-dir", str(coordinator.run_dir)])
    assert result.exit_code == 0, result.output
    assert [s["name"] for s in coordinator.read_sites()] == ["site-b"]
    assert [r["name"] for r in coordinator.read_revoked()] == ["site-a"]
    entries = verify_chain(coordinator.audit.path).entries
    assert [(e["event"], e["fields"]["site"]) for e in entries] == [("site-unregistered", "site-a")]
    with pytest.raises(ConfigError, match="was, for site 'site-a'"):
        coordinator.register_site(tmp_path / "keys" / "site-a.pub", "site-a-renamed")
    unknown = runner.invoke(app, ["revoke-site", "site-z", "--run-dir", str(coordinator.run_dir)])
    assert unknown.exit_code == 2
    assert "registered: site-b" in unknown.output


def test_revoking_needs_a_running_superlink_that_keeps_registrations_on_disk(tmp_path: Path) -> None:
    coordinator = _registered(tmp_path, "site-a")
    coordinator.state_path.write_text(json.dumps({"database": True}))
    result = runner.invoke(app, ["revoke-site", "site-a", "--run-dir", str(coordinator.run_dir)])
    assert result.exit_code == 2
    assert "start it, then revoke" in result.output
    assert [s["name"] for s in coordinator.read_sites()] == ["site-a"]


@pytest.mark.parametrize(("days", "warned"), [(10, True), (400, False)])
def test_status_warns_before_the_server_certificate_expires(tmp_path: Path, days: int, warned: bool) -> None:
    certs = make_certificates(tmp_path / "certs", ["127.0.0.1"], days=days)
    coordinator = Coordinator(tmp_path / "run")
    coordinator.run_dir.mkdir()
    state = {"host": "127.0.0.1", "port": 9, "superlink_pid": None, "server_cert": str(certs.server_cert)}
    coordinator.state_path.write_text(json.dumps(state))
    coordinator.audit.append("site-registered", site="site-a")
    result = runner.invoke(app, ["status", "--run-dir", str(coordinator.run_dir)])
    assert result.exit_code == 0, result.output
    assert ("warning:" in result.output) is warned
    assert "server certificate: expires" in result.output
    head = verify_chain(coordinator.audit.path).head
    assert f"audit head: {head}" in result.output


def test_audit_verify_passes_then_fails_after_an_edit(tmp_path: Path) -> None:
    coordinator = Coordinator(tmp_path / "run")
    coordinator.run_dir.mkdir()
    coordinator.audit.append("run-submitted", settings="{}", app_hash="ab" * 32)
    head = coordinator.audit.append("run-finished", flower_run_id=7)
    args = ["audit", "verify", "--run-dir", str(coordinator.run_dir)]
    ok = runner.invoke(app, [*args, "--anchor", str(head)])
    assert ok.exit_code == 0, ok.output
    assert "intact: 2 entries" in ok.output
    text = coordinator.audit.path.read_text().replace('"flower_run_id":7', '"flower_run_id":8')
    coordinator.audit.path.write_text(text)
    broken = runner.invoke(app, args)
    assert broken.exit_code == 1
    assert "NOT intact" in broken.output
    assert "line 2" in broken.output
    bad_anchor = runner.invoke(app, [*args, "--anchor", "nonsense"])
    assert bad_anchor.exit_code == 2


def test_the_calls_the_gateway_refused_are_summarised_in_the_audit_log(tmp_path: Path) -> None:
    coordinator = Coordinator(tmp_path / "run")
    coordinator.run_dir.mkdir()
    coordinator.gateway_log.write_text(
        "12:00:00 WARNING x: Refused POST /v1/fleet/old from 10.0.0.9:5: 403 (old)\n"
    )
    offset = coordinator.gateway_log.stat().st_size
    with coordinator.gateway_log.open("a") as log:
        log.write("12:00:01 WARNING x: Refused POST /v1/control/start-run from 10.0.0.9:5: 404 (not Fleet)\n")
        log.write("12:00:02 WARNING x: Refused POST /v1/fleet/x from an unknown peer: 413 (too large)\n")
        log.write("12:00:03 WARNING x: Refused POST /v1/control/list-runs from [::1]:7: 404 (not Fleet)\n")
        log.write("12:00:04 WARNING x: Failed POST /v1/fleet/y from 10.0.0.9:5: 502 (upstream)\n")
    coordinator.audit_refused_calls(offset)
    (entry,) = verify_chain(coordinator.audit.path).entries
    assert entry["event"] == "refused-calls"
    assert entry["fields"] == {"count": 3, "by_status": "404: 2, 413: 1"}
    coordinator.audit_refused_calls(coordinator.gateway_log.stat().st_size)  # none since: no entry
    assert len(verify_chain(coordinator.audit.path).entries) == 1
