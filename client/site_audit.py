"""A deployed site's audit trail: what it agreed to, what it spent, what it exported.

One hash-chained log per site (common/audit.py), beside its privacy ledger in the site's state
folder: ``<state-dir>/audit/audit.jsonl``, across every run and output folder. Events:

- ``run-accepted`` (run id): the first message of a run was admitted by the site's policy;
- ``run-declined`` (run id, reason): a message was declined or refused, with the reason its
  error reply carried (the same text, shaped by client/disclosure.py);
- ``dp-spent`` (run id, round, epsilon): what a DP round spent, as the ledger recorded it;
- ``ledger-reset`` (reason): the privacy ledger was set aside (``privacy-ledger reset``);
- ``model-exported`` (run id, model, format): a student left the training code as a file.

An entry holds only what a reply may carry: no paths, image counts or labels. At the end of every
run the site's reply to the coordinator's "finish" message carries the hash of its last entry
(:func:`site_audit_head`; the hash alone, not how many entries there are), which the coordinator
records in its own audit log: an anchor kept elsewhere, against which ``cxr-fl-client audit
verify --anchor HASH`` finds a cut tail or a rewrite of the site's log. Simulated sites
(the coordinator's own partitions) keep no audit trail. Writing never stops the site's work: a
failure is logged and ``cxr-fl-client audit verify`` then reports the broken chain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from common.audit import AUDIT_FILE, AuditLog, Scalar
from common.errors import CxrFlError

logger = logging.getLogger(__name__)


def site_audit_path(state_dir: Path) -> Path:
    return Path(state_dir) / "audit" / AUDIT_FILE


def site_audit_head(state_dir: Path) -> str | None:
    """The hash of the site's last audit entry (None: no log yet, or a log that does not verify)."""
    from common.audit import AuditChainError, verify_chain

    path = site_audit_path(state_dir)
    if not path.is_file():
        return None
    try:
        head = verify_chain(path).head
    except AuditChainError as exc:
        logger.error("this site's audit log does not verify: %s", exc)
        return None
    return None if head is None else head.hash


def record_site_event(state_dir: Path | None, event: str, **fields: Scalar) -> None:
    """Append ``event`` to the site's audit log (``state_dir`` None: a simulated site, nothing)."""
    if state_dir is None:
        return
    log = AuditLog(site_audit_path(state_dir))
    try:
        log.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        log.append(event, **fields)
    except (CxrFlError, OSError) as exc:
        logger.error("could not write '%s' to this site's audit log %s: %s", event, log.path, exc)


def declined_run_recorder(state_dir: Path | None) -> Callable[[int, str], None]:
    """What the warm runner calls for an app it refuses: a declined run in this site's audit log."""

    def record(run_id: int, reason: str) -> None:
        record_site_event(state_dir, "run-declined", run_id=run_id, reason=reason)

    return record
