"""The site's record of the privacy it has spent on its data, tamper-evident and fail-closed.

A site's DP budget belongs to its *data*, not to a run: every DP round that ever trained on a
data set spends from the same budget, whatever run, run folder or seed the server names. So the
ledger is keyed by what the site controls (its name, data format and data path, see
:func:`dataset_key`) and lives where the site says: ``<out>/privacy/ledger.json`` or the file
given with ``cxr-fl-client start --privacy-ledger PATH``.

Tamper evidence: the ledger carries an HMAC-SHA256 over its content, keyed by a random secret in
``<ledger>.key`` beside it (mode 0600, created with the ledger's first write). The key file is
also the site's memory that it *has spent budget*: a key without a ledger (deleted), an emptied
or edited ledger, or a ledger without its key are all refused (:class:`LedgerIntegrityError`),
and the site declines DP rounds until its operator runs ``cxr-fl-client privacy-ledger reset``,
which keeps the old files, and appends who, when and why to ``ledger-resets.log`` beside them.

Trust assumption: the ledger protects a site's budget against the *server* (everything it sends
is untrusted) and against accidents. An operator with a shell at the site can always delete both
files (the site then looks new) or run the reset; the reset is logged, a deletion of both is not
detectable by the site itself.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import PrivacyError
from common.privacy import AccountantHistory, DPPlan, epsilon_of

logger = logging.getLogger(__name__)

LEDGER_FORMAT = 1
RESET_LOG = "ledger-resets.log"


class LedgerIntegrityError(PrivacyError):
    """The ledger is missing, emptied or altered after the site spent budget: DP rounds stop."""


def default_ledger_path(out_dir: Path) -> Path:
    return out_dir / "privacy" / "ledger.json"


def key_path(ledger_path: Path) -> Path:
    return ledger_path.with_name(ledger_path.name + ".key")


def dataset_key(site_name: str, data_format: str, data_path: Path | None) -> str:
    """The identity of a site's data set: only the site's own options go in."""
    where = str(data_path.resolve()) if data_path is not None else ""
    return hashlib.sha256(f"{site_name}|{data_format}|{where}".encode()).hexdigest()[:16]


@dataclass
class LedgerEntry:
    """One data set's DP plan, accountant history and the epsilon recorded after each round."""

    plan: DPPlan | None = None
    history: AccountantHistory = field(default_factory=list)
    spent: list[dict[str, Any]] = field(default_factory=list)

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far on this data set (0 before the first DP round)."""
        return epsilon_of(self.history, self.plan) if self.plan is not None else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_json() if self.plan else None,
            "history": [list(h) for h in self.history],
            "spent": self.spent,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LedgerEntry:
        plan = DPPlan.from_json(data["plan"]) if data.get("plan") else None
        history = [(float(s), float(q), int(n)) for s, q, n in data.get("history", [])]
        return cls(plan, history, list(data.get("spent", [])))


def _mac(secret: bytes, body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(secret, canonical, hashlib.sha256).hexdigest()


def _refuse(path: Path, what: str) -> LedgerIntegrityError:
    return LedgerIntegrityError(
        f"privacy ledger {path} {what}: the budget this site has already spent cannot be verified, "
        "so it declines DP rounds. Restore the ledger from a backup, or reset it deliberately "
        f"(logged) with: cxr-fl-client privacy-ledger reset --ledger {path} --reason TEXT --yes"
    )


def _read_secret(path: Path, ledger: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise LedgerIntegrityError(
            f"privacy ledger key {path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )
    try:
        return bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        raise _refuse(ledger, "has an unreadable key file") from None


@dataclass
class PrivacyLedger:
    """All data sets' entries of one site ledger file; :meth:`save` rewrites it atomically."""

    path: Path
    entries: dict[str, LedgerEntry] = field(default_factory=dict)
    secret: bytes | None = None

    @classmethod
    def open(cls, path: Path) -> PrivacyLedger:
        """Read and verify the ledger; a new site (neither file) gets an empty one.

        Raises LedgerIntegrityError when the ledger or its key is missing while the other
        exists, or when the ledger does not match its HMAC.
        """
        secret_file = key_path(path)
        has_ledger, has_key = path.is_file(), secret_file.is_file()
        if not has_ledger and not has_key:
            return cls(path)
        if not has_key:
            raise _refuse(path, f"has no key file ({secret_file.name} was removed)")
        if not has_ledger:
            raise _refuse(path, "is missing although this site has spent budget (its key file exists)")
        secret = _read_secret(secret_file, path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            body = {"format": data["format"], "entries": data["entries"]}
            mac = str(data["mac"])
        except (OSError, ValueError, KeyError, TypeError):
            raise _refuse(path, "is empty or not a ledger written by this site") from None
        if not hmac.compare_digest(mac, _mac(secret, body)):
            raise _refuse(path, "was altered (its HMAC does not match)")
        entries = {str(k): LedgerEntry.from_json(v) for k, v in body["entries"].items()}
        return cls(path, entries, secret)

    def entry(self, key: str) -> LedgerEntry:
        return self.entries.setdefault(key, LedgerEntry())

    def save(self) -> None:
        """Write the ledger (and on first use its 0600 key file) atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        secret_file = key_path(self.path)
        if self.secret is None:
            self.secret = secrets.token_bytes(32)
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(self.secret.hex())
        body = {"format": LEDGER_FORMAT, "entries": {k: e.to_json() for k, e in self.entries.items()}}
        payload = {**body, "mac": _mac(self.secret, body)}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
        os.replace(tmp, self.path)


def reset_ledger(path: Path, reason: str) -> Path:
    """Set the ledger and its key aside (kept as evidence) and log who reset it, when and why.

    Returns the reset log. The next DP round at the site starts a new budget.
    """
    try:
        state = "ok"
        spent = {k: e.epsilon for k, e in PrivacyLedger.open(path).entries.items()}
    except LedgerIntegrityError as exc:
        state, spent = f"unverifiable: {exc}", {}
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = []
    for file in (path, key_path(path)):
        if file.exists():
            target = file.with_name(f"{file.name}.reset-{stamp}")
            file.replace(target)
            kept.append(str(target))
    record = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "user": getpass.getuser(),
        "host": socket.gethostname(),
        "ledger": str(path),
        "reason": reason,
        "state": state,
        "epsilon_spent": spent,
        "kept": kept,
    }
    log = path.parent / RESET_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    logger.warning("privacy ledger %s reset by %s: %s", path, record["user"], reason)
    return log
