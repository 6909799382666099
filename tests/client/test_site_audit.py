"""A deployed site's audit trail: runs accepted (once) and declined (with the reply's reason)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.site_audit import record_site_event, site_audit_path
from common.audit import verify_chain
from tests.client.helpers import (
    as_sent,
    ask_train,
    dp_context,
    dp_site,
    policy_run_config,
    policy_site,
    replied,
    send,
)

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _entries(state: Path) -> list[dict[str, object]]:
    return verify_chain(site_audit_path(state)).entries


def test_a_declined_run_is_audited_with_the_reason_its_reply_carries(tmp_path: Path) -> None:
    state = tmp_path / "state"
    node = policy_site(tmp_path, **{"max-rounds": 2, "state-dir": str(state)})
    reply = send(tmp_path, node, policy_run_config(tmp_path, num_rounds=5))
    assert reply.has_error()
    (entry,) = _entries(state)
    assert entry["event"] == "run-declined"
    fields = entry["fields"]
    assert isinstance(fields, dict)
    assert fields["run_id"] == 7
    assert fields["reason"] == as_sent(str(fields["reason"]))  # no more than the reply says
    assert "num-rounds" in str(fields["reason"])
    assert str(tmp_path) not in json.dumps(entry)  # no paths


def test_an_admitted_run_is_audited_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import client.app

    def stop_after_admission(*_: object, **__: object) -> None:
        raise client.app.SitePolicyError("stopped by the test after admission")

    monkeypatch.setattr(client.app, "load_site_data", stop_after_admission)
    state = tmp_path / "state"
    node = policy_site(tmp_path, **{"state-dir": str(state)})
    for _ in range(2):
        send(tmp_path, node, policy_run_config(tmp_path))
    events = [e["event"] for e in _entries(state)]
    assert events == ["run-accepted", "run-declined", "run-declined"]


def test_without_a_state_folder_nothing_is_recorded(tmp_path: Path) -> None:
    record_site_event(None, "run-accepted", run_id=1)
    record_site_event(tmp_path, "run-accepted", run_id=1)
    assert [e["event"] for e in _entries(tmp_path)] == ["run-accepted"]


def test_dp_spend_and_a_ledger_reset_are_audited(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from client.cli import app as cli_app
    from client.privacy_ledger import default_state_dir

    replied(ask_train(dp_context(tmp_path, dp_site(tmp_path)), 1, 2))
    reset = CliRunner().invoke(cli_app, ["privacy-ledger", "reset", "--reason", "audit 42", "--yes"])
    assert reset.exit_code == 0, reset.output
    entries = _entries(default_state_dir())
    assert [e["event"] for e in entries] == ["run-accepted", "dp-spent", "ledger-reset"]
    spent = entries[1]["fields"]
    assert isinstance(spent, dict)
    assert spent["round"] == 1
    assert 0 < float(spent["epsilon"]) <= 2.0
    assert entries[2]["fields"] == {"reason": "audit 42"}


def test_the_finish_reply_carries_the_hash_of_the_sites_last_audit_entry(tmp_path: Path) -> None:
    from common.protocol import AUDIT_RECORD, FINISH_MESSAGE_TYPE

    state = tmp_path / "state"
    node = policy_site(tmp_path, **{"state-dir": str(state)})
    assert not send(
        tmp_path, node, policy_run_config(tmp_path), FINISH_MESSAGE_TYPE
    ).content.config_records.get(AUDIT_RECORD)  # no log yet: nothing
    record_site_event(state, "run-accepted", run_id=7)
    reply = send(tmp_path, node, policy_run_config(tmp_path), FINISH_MESSAGE_TYPE)
    head = verify_chain(site_audit_path(state)).head
    assert head is not None
    assert dict(reply.content.config_records[AUDIT_RECORD]) == {"head": head.hash}
