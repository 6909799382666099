"""A deployed site's audit trail: runs accepted (once) and declined (with the reply's reason)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.site_audit import record_site_event, site_audit_path
from common.audit import verify_chain
from tests.client.test_site_policy import _as_sent, _run_config, _send, _site

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _entries(state: Path) -> list[dict[str, object]]:
    return verify_chain(site_audit_path(state)).entries


def test_a_declined_run_is_audited_with_the_reason_its_reply_carries(tmp_path: Path) -> None:
    state = tmp_path / "state"
    node = _site(tmp_path, **{"max-rounds": 2, "state-dir": str(state)})
    reply = _send(tmp_path, node, _run_config(tmp_path, num_rounds=5))
    assert reply.has_error()
    (entry,) = _entries(state)
    assert entry["event"] == "run-declined"
    fields = entry["fields"]
    assert isinstance(fields, dict)
    assert fields["run_id"] == 7
    assert fields["reason"] == _as_sent(str(fields["reason"]))  # no more than the reply says
    assert "num-rounds" in str(fields["reason"])
    assert str(tmp_path) not in json.dumps(entry)  # no paths


def test_an_admitted_run_is_audited_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import client.app

    def stop_after_admission(*_: object, **__: object) -> None:
        raise client.app.SitePolicyError("stopped by the test after admission")

    monkeypatch.setattr(client.app, "load_site_data", stop_after_admission)
    state = tmp_path / "state"
    node = _site(tmp_path, **{"state-dir": str(state)})
    for _ in range(2):
        _send(tmp_path, node, _run_config(tmp_path))
    events = [e["event"] for e in _entries(state)]
    assert events == ["run-accepted", "run-declined", "run-declined"]


def test_without_a_state_folder_nothing_is_recorded(tmp_path: Path) -> None:
    record_site_event(None, "run-accepted", run_id=1)
    record_site_event(tmp_path, "run-accepted", run_id=1)
    assert [e["event"] for e in _entries(tmp_path)] == ["run-accepted"]
