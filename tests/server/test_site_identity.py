"""A site is who its registered key says, not what its reply claims."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.protocol import SITE_RECORD
from server.rounds import TeacherRounds, collect
from server.run_folder import RunFolder
from server.site_identity import SiteDirectory

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class ClaimingGrid:
    """Every node replies at once, naming itself as ``claims[node]`` says."""

    def __init__(self, claims: dict[int, str]) -> None:
        self.claims = claims
        self.sent: dict[int, Message] = {}

    def push_messages(self, messages: list[Message]) -> list[str]:
        for message in messages:
            message.metadata._message_id = f"message-{message.metadata.dst_node_id}"
            self.sent[message.metadata.dst_node_id] = message
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        replies = []
        for node, message in self.sent.items():
            if f"message-{node}" in message_ids:
                content = RecordDict(
                    {
                        SITE_RECORD: ConfigRecord({"name": self.claims[node]}),
                        "metrics": MetricRecord({"loss": 0.5, "num-examples": 10}),
                        "arrays": ArrayRecord(),
                    }
                )
                replies.append(Message(content, reply_to=message))
        return replies


def write_sites(run_dir: Path, sites: dict[int, str]) -> Path:
    """sites.json as `cxr-fl-server register-site` writes it."""
    path = run_dir / "sites.json"
    rows = [{"name": name, "public_key": f"key-{name}", "node_id": node} for node, name in sites.items()]
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def send(grid: ClaimingGrid, names: dict[int, str]) -> tuple[list[Message], list[object]]:
    messages = [Message(RecordDict(), dst_node_id=node, message_type="train") for node in grid.claims]
    return collect(grid, messages, timeout=5.0, names=names)  # type: ignore[arg-type]


def test_a_reply_claiming_another_sites_name_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = SiteDirectory(write_sites(tmp_path, {10: "site-a", 20: "site-b"}))
    grid = ClaimingGrid({10: "site-a", 20: "site-a"})  # node 20 (site-b's key) says it is site-a

    with caplog.at_level(logging.ERROR, logger="server.rounds"):
        replies, outcomes = send(grid, directory)

    assert [r.metadata.src_node_id for r in replies] == [10]  # only the honest reply is aggregated
    by_node = {o.node_id: o for o in outcomes}  # type: ignore[attr-defined]
    assert by_node[10].status == "ok"
    assert by_node[10].site == "site-a"
    assert by_node[20].status == "refused"
    assert by_node[20].site == "site-b"  # reported under its registered name, not its claim
    assert "claims to be site 'site-a', but its key is registered as site 'site-b'" in caplog.text
    assert directory[20] == "site-b"


def test_a_reply_from_a_node_that_is_not_registered_is_refused(tmp_path: Path) -> None:
    directory = SiteDirectory(write_sites(tmp_path, {10: "site-a"}))
    replies, outcomes = send(ClaimingGrid({10: "site-a", 99: "site-z"}), directory)

    assert [r.metadata.src_node_id for r in replies] == [10]
    refused = [o for o in outcomes if o.status == "refused"]  # type: ignore[attr-defined]
    assert [o.node_id for o in refused] == [99]  # type: ignore[attr-defined]
    assert "not a registered site" in refused[0].reason  # type: ignore[attr-defined]


def test_a_site_registered_during_the_run_is_recognised(tmp_path: Path) -> None:
    directory = SiteDirectory(write_sites(tmp_path, {10: "site-a"}))
    write_sites(tmp_path, {10: "site-a", 30: "site-c"})  # `cxr-fl-server register-site` meanwhile

    replies, outcomes = send(ClaimingGrid({10: "site-a", 30: "site-c"}), directory)

    assert len(replies) == 2
    assert all(o.status == "ok" for o in outcomes)  # type: ignore[attr-defined]


def test_without_registered_sites_names_stay_self_declared(tmp_path: Path) -> None:
    directory = SiteDirectory(tmp_path / "sites.json")  # --insecure: nobody registered
    replies, _ = send(ClaimingGrid({10: "site-a", 20: "site-a"}), directory)
    assert len(replies) == 2


def test_the_round_loop_checks_names_against_the_run_folders_sites(tmp_path: Path) -> None:
    write_sites(tmp_path, {10: "site-a", 20: "site-b"})
    rounds = TeacherRounds(
        ClaimingGrid({}),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        RunFolder(tmp_path),
        num_rounds=1,
        round_timeout=1.0,
        site_wait_timeout=1.0,
        selection_metric="loss",
        seed=0,
        min_train_sites=1,
        min_evaluate_sites=1,
    )
    replies, outcomes = send(ClaimingGrid({10: "site-b", 20: "site-b"}), rounds.site_names)
    assert [r.metadata.src_node_id for r in replies] == [20]
    assert {o.node_id: o.status for o in outcomes} == {10: "refused", 20: "ok"}  # type: ignore[attr-defined]
