"""The site's record of the privacy it has spent on its data: durable, tamper-evident, fail-closed.

A site's DP budget belongs to its *data*, not to a run: every DP round that ever trained on a
data set spends from the same budget, whatever run, run folder, seed or settings the server names.

Identity (:func:`dataset_key`): a SHA-256 over the sorted content hashes of the data set's
images: the hash of each image's decoded pixels at native resolution, which the image cache
computes when it decodes a file and keeps with the cache while the file's path, size and mtime
stay the same (common/data/cache.py), so no round hashes images again. Nothing else goes in:
no run setting (split seed, fractions, image size, task), no output folder, no path the data is
mounted at, and no site name (a site that renames itself keeps its budget). Labels stay out
too: the task, a run setting, decides how a source's labels read, and a relabelled data set
holds the same patients. A deployed site's image set does not depend on the task either: it
reads its source without options, so a label the task does not cover is an error, and no task
selects a subset of its images.

Location: one site-wide ledger per machine account, outside any ``--out`` folder:
``$CXR_FL_STATE_DIR/privacy/ledger.json`` (else ``$XDG_STATE_HOME/cxr-fl``, else
``~/.local/state/cxr-fl``), or the file given with ``cxr-fl-client start --privacy-ledger PATH``.
A ledger of an earlier version (format 1, in ``<out>/privacy/ledger.json``, keyed by site name and
data path) is migrated once, when the site's next DP round opens the ledger: its budget for the
data set at hand moves to that data set's content entry (its other entries are kept as
``legacy:...``), its files are kept as ``*.migrated-<time>`` and the move is logged in
``ledger-migrations.log``. A legacy ledger that cannot be verified stops DP rounds like any other.

Tamper evidence: the ledger carries an HMAC-SHA256 over its content and its sequence number,
keyed by a random secret in ``<ledger>.key`` beside it (mode 0600). Every write raises the
sequence number by one and records it in a counter file in another directory of the state
location (``ledger-counters/``). A ledger older than its counter (a restored copy), a missing
ledger or key while the other or the counter says budget was spent, and an edited or emptied
ledger are refused (:class:`LedgerIntegrityError`): the site declines DP rounds until its
operator runs ``cxr-fl-client privacy-ledger reset``, which keeps the old files, marks the reset
in the counter and appends who, when and why to ``ledger-resets.log`` beside the ledger (and a
``ledger-reset`` entry to the site's audit trail, client/site_audit.py). Writes
take a lock; co-located sites sharing the ledger merge their rounds instead of losing one.

What a site operator can and cannot undo on their own machine: the ledger protects a site's
budget against the *server* (everything it sends is untrusted) and against accidents (a restored
backup of the ledger, a fresh ``--out``, a moved data folder, a new run). An operator with a
shell at the site can always start over: ``reset`` does it openly (logged); deleting or restoring
the whole state location (ledger, key and counter together), editing the counter, or changing
the data set's images (a different set of images is a different data set) cannot be detected by
the site itself, since nothing outside the machine witnesses the ledger.
"""

from __future__ import annotations

import copy
import fcntl
import getpass
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import socket
import stat
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from common.errors import PrivacyError
from common.privacy import AccountantHistory, DPPlan, epsilon_of

if TYPE_CHECKING:
    from common.local import SiteData

logger = logging.getLogger(__name__)

LEDGER_FORMAT = 2
LEGACY_FORMAT = 1
STATE_DIR_ENV = "CXR_FL_STATE_DIR"
RESET_LOG = "ledger-resets.log"
MIGRATION_LOG = "ledger-migrations.log"
COUNTERS_DIR = "ledger-counters"


class LedgerIntegrityError(PrivacyError):
    """The ledger is missing, older than its counter or altered after the site spent budget."""


def default_state_dir() -> Path:
    """``$CXR_FL_STATE_DIR``, else ``$XDG_STATE_HOME/cxr-fl``, else ``~/.local/state/cxr-fl``."""
    env = os.environ.get(STATE_DIR_ENV)
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).expanduser().is_absolute() else None
    return ((base or Path.home() / ".local" / "state") / "cxr-fl").resolve()


def default_ledger_path(state_dir: Path) -> Path:
    return state_dir / "privacy" / "ledger.json"


def legacy_ledger_path(out_dir: Path) -> Path:
    """Where versions before the site-wide ledger kept it (format 1)."""
    return out_dir / "privacy" / "ledger.json"


def key_path(ledger_path: Path) -> Path:
    return ledger_path.with_name(ledger_path.name + ".key")


def counter_path(ledger_path: Path, state_dir: Path) -> Path:
    """The ledger's sequence counter: in the state location, apart from the ledger's folder."""
    name = hashlib.sha256(str(ledger_path.resolve()).encode()).hexdigest()[:24]
    return state_dir / COUNTERS_DIR / f"{name}.json"


def dataset_key(pixel_hashes: Sequence[str]) -> str:
    """The identity of a data set: a SHA-256 over its images' sorted content hashes only."""
    listing = "".join(f"{pixel_hash}\n" for pixel_hash in sorted(pixel_hashes))
    return hashlib.sha256(f"cxr-fl-dataset-v1|{len(pixel_hashes)}\n{listing}".encode()).hexdigest()[:32]


def legacy_dataset_key(site_name: str, data_format: str, data_path: Path | None) -> str:
    """The key format-1 ledgers used (site name, format, path): read only to migrate them."""
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

    def add_rounds_of(self, other: LedgerEntry, since: LedgerEntry | None = None) -> None:
        """Add what ``other`` spent after ``since`` (all of it without) to this entry.

        Composition is additive: steps are counted per (noise multiplier, sampling rate).
        """
        before = _steps(since.history) if since else Counter()
        added = _steps(other.history)
        added.subtract(before)
        self.history = [*self.history, *((s, q, n) for (s, q), n in added.items() if n > 0)]
        self.spent = [*self.spent, *other.spent[len(since.spent) if since else 0 :]]
        self.plan = self.plan or other.plan


def _steps(history: AccountantHistory) -> Counter[tuple[float, float]]:
    steps: Counter[tuple[float, float]] = Counter()
    for sigma, rate, n in history:
        steps[(sigma, rate)] += n
    return steps


def _mac(secret: bytes, body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(secret, canonical, hashlib.sha256).hexdigest()


def reset_hint(path: Path, state_dir: Path) -> str:
    where = "" if state_dir == default_state_dir() else f" --state-dir {state_dir}"
    return f"cxr-fl-client privacy-ledger reset --ledger {path}{where} --reason TEXT --yes"


def _refuse(path: Path, state_dir: Path, what: str) -> LedgerIntegrityError:
    return LedgerIntegrityError(
        f"privacy ledger {path} {what}: the budget this site has already spent cannot be verified, "
        "so it declines DP rounds until its operator starts a new budget deliberately (logged) "
        f"with: {reset_hint(path, state_dir)}"
    )


def _read_secret(path: Path, ledger: Path, state_dir: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise LedgerIntegrityError(
            f"privacy ledger key {path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )
    try:
        return bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        raise _refuse(ledger, state_dir, "has an unreadable key file") from None


@dataclass(frozen=True)
class _Count:
    """The counter kept apart from the ledger: its last sequence number, and a reset mark."""

    seq: int
    reset: bool = False


def _read_counter(path: Path, ledger: Path, state_dir: Path) -> _Count | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return _Count(int(data["seq"]), bool(data.get("reset", False)))
    except (OSError, ValueError, KeyError, TypeError):
        raise _refuse(ledger, state_dir, f"has an unreadable sequence counter ({path})") from None


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_counter(path: Path, ledger: Path, count: _Count) -> None:
    _write_json_atomic(path, {"ledger": str(ledger), "seq": count.seq, "reset": count.reset})


@contextmanager
def _locked(counter: Path) -> Iterator[None]:
    """An exclusive lock of one ledger among the processes of this machine (co-located sites)."""
    counter.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(counter.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Verified:
    format: int
    seq: int
    entries: dict[str, LedgerEntry]
    secret: bytes


def _read_verified(path: Path, state_dir: Path) -> _Verified | None:
    """The ledger file checked against its key; None for a new ledger (neither file)."""
    secret_file = key_path(path)
    has_ledger, has_key = path.is_file(), secret_file.is_file()
    if not has_ledger and not has_key:
        return None
    if not has_key:
        raise _refuse(path, state_dir, f"has no key file ({secret_file.name} was removed)")
    if not has_ledger:
        raise _refuse(path, state_dir, "is missing although this site has spent budget (its key file exists)")
    secret = _read_secret(secret_file, path, state_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        fmt = int(data["format"])
        body = {"format": data["format"], "entries": data["entries"]}
        if fmt != LEGACY_FORMAT:
            body["seq"] = int(data["seq"])
        mac = str(data["mac"])
    except (OSError, ValueError, KeyError, TypeError):
        raise _refuse(path, state_dir, "is empty or not a ledger written by this site") from None
    if fmt not in (LEGACY_FORMAT, LEDGER_FORMAT) or not hmac.compare_digest(mac, _mac(secret, body)):
        raise _refuse(path, state_dir, "was altered (its HMAC does not match)")
    entries = {str(k): LedgerEntry.from_json(v) for k, v in body["entries"].items()}
    return _Verified(fmt, int(body.get("seq", 0)), entries, secret)


def _check_sequence(path: Path, state_dir: Path, found: _Verified | None, count: _Count | None) -> None:
    """Refuse a ledger older than its counter, and a counter without its ledger."""
    if found is not None and found.format == LEGACY_FORMAT:
        if count is not None:  # a ledger of this version was written here: this is an old copy
            raise _refuse(path, state_dir, "is an older copy in an earlier version's format")
        return  # written before counters existed: migrated on first use
    if found is None:
        if count is not None and count.seq > 0 and not count.reset:
            raise _refuse(
                path, state_dir, f"is missing although this site has written it {count.seq} time(s)"
            )
        return
    if count is None:
        raise _refuse(path, state_dir, f"has lost its sequence counter ({counter_path(path, state_dir)})")
    if found.seq < count.seq:
        raise _refuse(
            path,
            state_dir,
            f"is an older copy (write {found.seq}; this site has written it {count.seq} time(s)): "
            "a ledger rolled back would forget budget already spent",
        )


@dataclass
class PrivacyLedger:
    """All data sets' entries of one site ledger file; :meth:`save` rewrites it atomically."""

    path: Path
    state_dir: Path
    entries: dict[str, LedgerEntry] = field(default_factory=dict)
    secret: bytes | None = None
    seq: int = 0
    legacy: bool = False
    # the entries as read, so that a save can add only this process's rounds to a newer file
    _read: dict[str, LedgerEntry] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: Path, state_dir: Path) -> PrivacyLedger:
        """Read and verify the ledger; a new site (no ledger, key or counter) gets an empty one.

        Raises LedgerIntegrityError when the ledger or its key is missing while the other (or
        the counter) exists, when it does not match its HMAC, or when it is older than its counter.
        """
        found = _read_verified(path, state_dir)
        _check_sequence(path, state_dir, found, _read_counter(counter_path(path, state_dir), path, state_dir))
        if found is None:
            return cls(path, state_dir)
        ledger = cls(path, state_dir, found.entries, found.secret, found.seq, found.format == LEGACY_FORMAT)
        ledger._read = copy.deepcopy(found.entries)
        return ledger

    def entry(self, key: str) -> LedgerEntry:
        return self.entries.setdefault(key, LedgerEntry())

    def save(self) -> None:
        """Write the ledger (and on first use its 0600 key file) atomically, then its counter.

        Under the ledger's lock: when another process wrote the ledger since this one read it,
        this process's rounds are added to what is on disk now, never written over it.
        """
        counter = counter_path(self.path, self.state_dir)
        with _locked(counter):
            count = _read_counter(counter, self.path, self.state_dir)
            on_disk = _read_verified(self.path, self.state_dir)
            _check_sequence(self.path, self.state_dir, on_disk, count)
            disk_seq = on_disk.seq if on_disk is not None else 0
            if disk_seq != self.seq or (on_disk is None and self.seq > 0):  # written or reset meanwhile
                self._merge(on_disk.entries if on_disk is not None else {})
            secret = on_disk.secret if on_disk is not None else self._new_secret()
            seq = max(self.seq, count.seq if count else 0, disk_seq) + 1
            body = {
                "format": LEDGER_FORMAT,
                "seq": seq,
                "entries": {k: e.to_json() for k, e in self.entries.items()},
            }
            _write_json_atomic(self.path, {**body, "mac": _mac(secret, body)})
            _write_counter(counter, self.path, _Count(seq))
            self.secret = secret
            self.seq, self.legacy = seq, False
            self._read = copy.deepcopy(self.entries)

    def _merge(self, newer: dict[str, LedgerEntry]) -> None:
        """Take the file's entries and add the rounds this process recorded since it read them."""
        for key, entry in self.entries.items():
            if key not in newer:
                newer[key] = LedgerEntry()
            read = self._read.get(key)
            if (read is None and entry.history) or (read is not None and entry.history != read.history):
                newer[key].add_rounds_of(entry, since=read)
        for key, merged in newer.items():  # the caller holds these objects: update them in place
            mine = self.entries.setdefault(key, LedgerEntry())
            mine.plan, mine.history, mine.spent = merged.plan, merged.history, merged.spent

    def _new_secret(self) -> bytes:
        """A new random key, written once (0600, never over an existing key file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_bytes(32)
        fd = os.open(key_path(self.path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secret.hex())
        return secret


def _set_aside(file: Path, label: str, *, keep_original: bool = False) -> str:
    """Keep ``file`` as ``<name>.<label>-<time>`` (never over an earlier one); return the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = file.with_name(f"{file.name}.{label}-{stamp}")
    suffix = 1
    while target.exists():
        target = file.with_name(f"{file.name}.{label}-{stamp}-{suffix}")
        suffix += 1
    if keep_original:
        shutil.copy2(file, target)
    else:
        file.replace(target)
    return str(target)


def _append_log(log: Path, record: dict[str, Any]) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _who() -> dict[str, str]:
    return {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "user": getpass.getuser(),
        "host": socket.gethostname(),
    }


def reset_ledger(path: Path, state_dir: Path, reason: str) -> Path:
    """Set the ledger and its key aside (kept as evidence) and log who reset it, when and why.

    Returns the reset log. The counter keeps its number and notes the reset, so an older copy
    stays refused; the next DP round at the site starts a new budget.
    """
    counter = counter_path(path, state_dir)
    with _locked(counter):
        try:
            state = "ok"
            spent = {k: e.epsilon for k, e in PrivacyLedger.open(path, state_dir).entries.items()}
        except LedgerIntegrityError as exc:
            state, spent = f"unverifiable: {exc}", {}
        try:
            count = _read_counter(counter, path, state_dir)
        except LedgerIntegrityError:
            count = None
        kept = [_set_aside(file, "reset") for file in (path, key_path(path)) if file.exists()]
        last = max(count.seq if count else 0, _seq_in(Path(kept[0])) if kept else 0)
        _write_counter(counter, path, _Count(last, reset=True))
    record = {**_who(), "ledger": str(path), "reason": reason, "state": state, "epsilon_spent": spent}
    log = path.parent / RESET_LOG
    _append_log(log, {**record, "kept": kept, "counter": str(counter), "seq": last})
    logger.warning("privacy ledger %s reset by %s: %s", path, record["user"], reason)
    from client.site_audit import record_site_event

    record_site_event(state_dir, "ledger-reset", reason=reason)
    return log


def _seq_in(ledger_copy: Path) -> int:
    """The sequence number a (possibly damaged) ledger file claims, 0 when it has none."""
    try:
        return int(json.loads(ledger_copy.read_text(encoding="utf-8")).get("seq", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


class LedgerSite(Protocol):
    """What :func:`open_site_ledger` reads of a site (client/site.py's SiteConfig is one: this
    module never imports it, site.py imports this one)."""

    @property
    def name(self) -> str: ...
    @property
    def data_format(self) -> str: ...
    @property
    def data_path(self) -> Path | None: ...
    @property
    def out_dir(self) -> Path: ...
    @property
    def ledger_path(self) -> Path: ...
    @property
    def state_dir(self) -> Path: ...


def open_site_ledger(site: LedgerSite, data: SiteData) -> tuple[PrivacyLedger, LedgerEntry]:
    """The site's ledger and the entry of the data set it trains on (migrating a format-1 ledger).

    Raises LedgerIntegrityError before anything trains when a ledger cannot be verified.
    """
    ledger = PrivacyLedger.open(site.ledger_path, site.state_dir)
    key = dataset_key(data.cached.pixel_hashes)
    old_key = legacy_dataset_key(site.name, site.data_format, site.data_path)
    legacy = legacy_ledger_path(site.out_dir)
    if ledger.legacy:
        _migrate(ledger, ledger, old_key, key)
    elif legacy != site.ledger_path and (legacy.exists() or key_path(legacy).exists()):
        old = PrivacyLedger.open(legacy, site.state_dir)
        if not old.legacy:
            raise LedgerIntegrityError(
                f"this site keeps its privacy ledger in {site.ledger_path}, but {legacy} holds budget "
                "recorded with --privacy-ledger earlier: start the site with --privacy-ledger "
                f"{legacy}, or start a new budget deliberately with: {reset_hint(legacy, site.state_dir)}"
            )
        _migrate(old, ledger, old_key, key)
    return ledger, ledger.entry(key)


def _migrate(old: PrivacyLedger, ledger: PrivacyLedger, old_key: str, key: str) -> None:
    """Move a format-1 ledger's budget into ``ledger`` (saved first), then keep the old files."""
    moved = {}
    entries = dict(old.entries)
    if ledger is old:  # the same file: rewritten in the new format with its key
        ledger.entries = {}
    for legacy_key, entry in entries.items():
        target = key if legacy_key == old_key else f"legacy:{legacy_key}"
        ledger.entry(target).add_rounds_of(entry)
        moved[legacy_key] = target
    kept = [_set_aside(old.path, "migrated", keep_original=ledger is old)]
    ledger.save()
    if ledger is not old:
        kept += [_set_aside(file, "migrated") for file in (old.path, key_path(old.path)) if file.exists()]
    _append_log(
        ledger.path.parent / MIGRATION_LOG,
        {**_who(), "from": str(old.path), "to": str(ledger.path), "entries": moved, "kept": kept},
    )
    logger.warning("privacy ledger %s (earlier format) migrated into %s: %s", old.path, ledger.path, moved)
