"""An append-only, hash-chained audit log: who did what, in a file that cannot be edited quietly.

One JSON object per line (``audit.jsonl``)::

    {"seq": 3, "time": "2026-12-05T17:02:11Z", "event": "site-registered",
     "fields": {"site": "st-marys", "node_id": 42}, "prev": "<hash of entry 2>", "hash": "<sha256>"}

``hash`` is the SHA-256 of the entry's canonical JSON (sorted keys, no spaces) without ``hash``;
``prev`` is the hash of the entry before it (:data:`GENESIS` for the first). So an edited entry no
longer matches its hash, a removed or reordered one breaks the chain (``seq`` and ``prev``), and
:func:`verify_chain` says which line. What the chain alone cannot show is a truncated tail or a
whole rewrite: for those, keep the *head* (``SEQ:HASH``, :meth:`AuditLog.head`) somewhere else
(the coordinator's is printed by ``cxr-fl-server status``; a site's by ``cxr-fl-client audit
head``, and its hash alone is recorded in the coordinator's log at the end of every run) and
verify against it as an *anchor*: the entry of that sequence number (or, for a hash alone, some
entry) must still be there with that hash.

Fields are plain JSON scalars (text, numbers, booleans, None): an audit entry records facts about
an event, never data. Appends take an exclusive ``flock`` on the file, so processes that share a
log (a CLI and a running coordinator) chain their entries in order. The file is created 0600.
No Flower imports (client/ and server/ both use it).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from common.errors import ConfigError, CxrFlError

GENESIS = "0" * 64
"""The ``prev`` of the first entry."""
AUDIT_FILE = "audit.jsonl"
Scalar = str | int | float | bool | None


class AuditChainError(CxrFlError):
    """The audit log was edited, shortened, reordered or rewritten: the message says where."""


@dataclass(frozen=True)
class AuditHead:
    """An entry of a chain kept as an anchor: its sequence number and hash (``SEQ:HASH``), or its
    hash alone (``seq`` -1: the entry may be anywhere in the chain)."""

    seq: int
    hash: str

    def __str__(self) -> str:
        return self.hash if self.seq < 0 else f"{self.seq}:{self.hash}"

    @classmethod
    def parse(cls, text: str, option: str = "--anchor") -> AuditHead:
        seq, sep, digest = text.strip().rpartition(":")
        if _is_sha256(digest) and (not sep or seq.isdigit()):
            return cls(int(seq) if sep else -1, digest)
        raise ConfigError(
            option, text, "SEQ:HASH as `audit head` or `status` print it, or a HASH the coordinator recorded"
        )


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 of the entry's canonical JSON, ``hash`` left out."""
    body = {key: value for key, value in entry.items() if key != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _check_fields(fields: Mapping[str, Any]) -> dict[str, Scalar]:
    for key, value in fields.items():
        if not isinstance(key, str) or not (value is None or isinstance(value, str | int | float | bool)):
            raise TypeError(f"audit field {key!r} must be a JSON scalar, not {type(value).__name__}")
        if isinstance(value, float) and value != value:  # NaN has no canonical JSON
            raise TypeError(f"audit field {key!r} is NaN")
    return dict(fields)


class AuditLog:
    """An append-only hash chain in one file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[IO[str]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "r+", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield handle
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def append(self, event: str, **fields: Scalar) -> AuditHead:
        """Add one entry after the last; returns the new head."""
        checked = _check_fields(fields)
        with self._locked() as handle:
            handle.seek(0)
            last = _last_entry(handle.read())
            seq = 0 if last is None else int(last["seq"]) + 1
            prev = GENESIS if last is None else str(last["hash"])
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            entry: dict[str, Any] = {"seq": seq, "time": now, "event": event, "fields": checked, "prev": prev}
            entry["hash"] = entry_hash(entry)
            handle.seek(0, os.SEEK_END)
            handle.write(json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return AuditHead(seq, entry["hash"])

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, checked (AuditChainError on the first break)."""
        return verify_chain(self.path).entries

    def head(self) -> AuditHead | None:
        """The verified last entry, None for an empty or missing log."""
        return verify_chain(self.path).head


def _last_entry(text: str) -> dict[str, Any] | None:
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        entry = json.loads(lines[-1])
    except ValueError:
        raise AuditChainError("the last line of the audit log is not JSON: refusing to append") from None
    if not isinstance(entry, dict) or "hash" not in entry or "seq" not in entry:
        raise AuditChainError("the last line of the audit log is not an entry: refusing to append")
    return entry


@dataclass(frozen=True)
class ChainReport:
    """A verified chain: its entries and head (None when empty)."""

    entries: list[dict[str, Any]]
    head: AuditHead | None


def verify_chain(path: Path, anchor: AuditHead | None = None) -> ChainReport:
    """Check every entry's hash and link; with ``anchor``, also that the entry of the anchor's
    sequence number is still there with the anchor's hash (a cut tail or a rewrite fails)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditChainError(f"{path}: cannot read the audit log ({exc})") from None
    entries: list[dict[str, Any]] = []
    prev = GENESIS
    for number, line in enumerate(lines, start=1):
        where = f"{path}, line {number}"
        try:
            entry = json.loads(line)
        except ValueError:
            raise AuditChainError(f"{where}: not a JSON entry (edited or damaged)") from None
        if not isinstance(entry, dict) or set(entry) != {"seq", "time", "event", "fields", "prev", "hash"}:
            raise AuditChainError(f"{where}: not an audit entry (edited)")
        if entry["seq"] != len(entries):
            raise AuditChainError(
                f"{where}: sequence number {entry['seq']} where {len(entries)} was expected "
                "(an entry was removed or reordered)"
            )
        if entry["prev"] != prev:
            raise AuditChainError(f"{where}: does not follow the entry before it (removed or reordered)")
        if entry_hash(entry) != entry["hash"]:
            raise AuditChainError(f"{where}: its content does not match its hash (the entry was edited)")
        prev = entry["hash"]
        entries.append(entry)
    head = AuditHead(len(entries) - 1, prev) if entries else None
    if anchor is not None and anchor.seq < 0:
        if not any(entry["hash"] == anchor.hash for entry in entries):
            raise AuditChainError(
                f"{path}: no entry has the anchor's hash {anchor.hash} (the log was cut off or rewritten)"
            )
    elif anchor is not None:
        if anchor.seq >= len(entries):
            raise AuditChainError(
                f"{path}: the anchor {anchor} names entry {anchor.seq}, but the log ends at entry "
                f"{len(entries) - 1} (its tail was cut off)"
            )
        if entries[anchor.seq]["hash"] != anchor.hash:
            raise AuditChainError(
                f"{path}: entry {anchor.seq} does not have the anchor's hash (the log was rewritten)"
            )
    return ChainReport(entries, head)
