"""The hash-chained audit log: edits, removals, reorders, a cut tail and a rewrite are all found."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from common.audit import AuditChainError, AuditHead, AuditLog, verify_chain
from common.errors import ConfigError


def _log(tmp_path: Path, n: int = 4) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(n):
        log.append("site-registered", site=f"site-{i}", node_id=100 + i, ok=True, epsilon=0.5, none=None)
    return log


def _lines(log: AuditLog) -> list[str]:
    return log.path.read_text().splitlines()


def _write(log: AuditLog, lines: list[str]) -> None:
    log.path.write_text("".join(line + "\n" for line in lines))


def test_an_untouched_chain_verifies_and_its_head_is_the_last_entry(tmp_path: Path) -> None:
    log = _log(tmp_path)
    report = verify_chain(log.path)
    assert [e["seq"] for e in report.entries] == [0, 1, 2, 3]
    assert report.head == log.head()
    assert report.head is not None
    assert report.head.seq == 3
    assert report.head.hash == report.entries[-1]["hash"]
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
    assert verify_chain(tmp_path / "missing.jsonl").head is None


def test_an_edited_entry_is_found(tmp_path: Path) -> None:
    log = _log(tmp_path)
    lines = _lines(log)
    entry = json.loads(lines[1])
    entry["fields"]["site"] = "intruder"
    lines[1] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    _write(log, lines)
    with pytest.raises(AuditChainError, match="line 2: its content does not match its hash"):
        verify_chain(log.path)


def test_a_removed_entry_is_found(tmp_path: Path) -> None:
    log = _log(tmp_path)
    lines = _lines(log)
    _write(log, lines[:1] + lines[2:])
    with pytest.raises(AuditChainError, match="line 2: sequence number 2 where 1 was expected"):
        verify_chain(log.path)


def test_reordered_entries_are_found(tmp_path: Path) -> None:
    log = _log(tmp_path)
    lines = _lines(log)
    lines[1], lines[2] = lines[2], lines[1]
    _write(log, lines)
    with pytest.raises(AuditChainError, match="removed or reordered"):
        verify_chain(log.path)


def test_a_renumbered_edit_that_recomputes_its_hash_still_breaks_the_chain(tmp_path: Path) -> None:
    from common.audit import entry_hash

    log = _log(tmp_path)
    lines = _lines(log)
    entry = json.loads(lines[2])
    entry["fields"]["site"] = "intruder"
    entry["hash"] = entry_hash(entry)  # a careful forger re-hashes the entry it edits
    lines[2] = json.dumps(entry)
    _write(log, lines)
    with pytest.raises(AuditChainError, match="line 4: does not follow the entry before it"):
        verify_chain(log.path)


def test_a_cut_tail_passes_alone_but_fails_against_an_anchor(tmp_path: Path) -> None:
    log = _log(tmp_path)
    anchor = log.head()
    assert anchor is not None
    _write(log, _lines(log)[:2])
    assert verify_chain(log.path).head is not None  # the chain alone cannot tell
    with pytest.raises(AuditChainError, match="its tail was cut off"):
        verify_chain(log.path, anchor)


def test_a_whole_rewrite_fails_against_an_anchor(tmp_path: Path) -> None:
    log = _log(tmp_path)
    anchor = log.head()
    assert anchor is not None
    log.path.unlink()
    forged = AuditLog(log.path)  # a consistent chain, written afresh without one event
    for i in range(5):
        forged.append("site-registered", site=f"other-{i}")
    with pytest.raises(AuditChainError, match="entry 3 does not have the anchor's hash"):
        verify_chain(forged.path, anchor)
    verify_chain(forged.path, forged.head())  # its own head matches, of course


def test_appending_continues_the_chain_and_an_older_anchor_still_holds(tmp_path: Path) -> None:
    log = _log(tmp_path, n=2)
    anchor = log.head()
    log.append("run-submitted", settings='{"num-rounds": 2}')
    assert verify_chain(log.path, anchor).head == log.head()
    assert AuditHead.parse(str(anchor)) == anchor


def test_fields_must_be_plain_values(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(TypeError, match="JSON scalar"):
        log.append("model-exported", path=Path("/data/site"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="NaN"):
        log.append("dp-spent", epsilon=float("nan"))
    assert not log.path.exists() or log.path.read_text() == ""


def test_a_damaged_last_line_refuses_an_append(tmp_path: Path) -> None:
    log = _log(tmp_path, n=1)
    with log.path.open("a") as handle:
        handle.write("{not json\n")
    with pytest.raises(AuditChainError, match="refusing to append"):
        log.append("run-stopped")


@pytest.mark.parametrize("text", ["3", "x:" + "0" * 64, "3:abc", "3:" + "G" * 64])
def test_a_malformed_anchor_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="--anchor"):
        AuditHead.parse(text)


def test_a_hash_alone_anchors_an_entry_anywhere_in_the_chain(tmp_path: Path) -> None:
    log = _log(tmp_path)
    head = log.head()
    assert head is not None
    anchor = AuditHead.parse(head.hash)
    assert anchor.seq == -1
    assert str(anchor) == head.hash
    log.append("run-accepted", run_id=9)
    verify_chain(log.path, anchor)
    _write(log, _lines(log)[:2])
    with pytest.raises(AuditChainError, match="no entry has the anchor's hash"):
        verify_chain(log.path, anchor)
