"""``cxr-fl-client audit ...`` and ``cxr-fl-client cache ...``: a site's audit trail and image cache.

- ``audit verify [--state-dir DIR] [--anchor SEQ:HASH]``: every entry of the site's audit log
  (client/site_audit.py) checked; an edited, removed or reordered entry fails (exit 1), and with
  an anchor kept elsewhere a cut tail or a rewrite fails too.
- ``audit head``: the log's head (``SEQ:HASH``), to keep elsewhere as that anchor.
- ``cache clear [--cache-dir DIR] [--older-than-days N]``: remove decoded images (all, or those
  decoded at least N days ago); a site policy's ``cache-max-age-days`` does this at ``start``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from common.cli_support import fail, stdout, typer_app
from common.errors import CxrFlError

AUDIT_BROKEN_EXIT = 1

audit_app = typer_app("audit", "This site's hash-chained audit trail.")
cache_app = typer_app("cache", "This site's decoded-image cache.")

StateDirOption = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="The site's state folder (as given to `start`; default $CXR_FL_STATE_DIR, else "
        "~/.local/state/cxr-fl).",
    ),
]


def _audit_path(state_dir: Path | None) -> Path:
    from client.privacy_ledger import default_state_dir
    from client.site_audit import site_audit_path

    return site_audit_path(state_dir.resolve() if state_dir is not None else default_state_dir())


@audit_app.command("verify")
def verify(
    state_dir: StateDirOption = None,
    anchor: Annotated[
        str | None,
        typer.Option("--anchor", help="A head kept elsewhere (SEQ:HASH from `audit head`)."),
    ] = None,
) -> None:
    """Check the site's audit log: exit 1 when an entry was edited, removed or reordered."""
    from common.audit import AuditChainError, AuditHead, verify_chain

    path = _audit_path(state_dir)
    try:
        expected = AuditHead.parse(anchor) if anchor else None
        if not path.is_file():
            raise fail(f"{path}: no audit log (this site has recorded nothing yet, or --state-dir is wrong)")
        report = verify_chain(path, expected)
    except AuditChainError as exc:
        raise fail(f"audit log NOT intact: {exc}", AUDIT_BROKEN_EXIT) from None
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    stdout.print(
        f"audit log intact: {len(report.entries)} entries, head {report.head or '-'}"
        + (" (matches the anchor)" if anchor else ""),
        highlight=False,
    )


@audit_app.command("head")
def head(state_dir: StateDirOption = None) -> None:
    """Print the audit log's head (SEQ:HASH): keep it elsewhere, verify against it later."""
    from common.audit import AuditChainError, verify_chain

    try:
        report = verify_chain(_audit_path(state_dir))
    except AuditChainError as exc:
        raise fail(f"audit log NOT intact: {exc}", AUDIT_BROKEN_EXIT) from None
    stdout.print(str(report.head or "-"), highlight=False)


@cache_app.command("clear")
def clear(
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir", help="The cache folder (default $CXR_FL_CACHE_DIR or ~/.cache/cxr-fl/images)."
        ),
    ] = None,
    older_than_days: Annotated[
        float | None,
        typer.Option("--older-than-days", help="Only caches decoded at least this many days ago."),
    ] = None,
) -> None:
    """Remove the decoded images of the cache (they are made again from the data when needed)."""
    from common.data.cache import clear_cache, default_cache_dir

    if older_than_days is not None and not older_than_days >= 0:
        raise fail(f"--older-than-days {older_than_days}: pass a number of days >= 0")
    folder = cache_dir if cache_dir is not None else default_cache_dir()
    cleared = clear_cache(folder, older_than_days)
    stdout.print(
        f"removed {cleared.files} cache file(s), {cleared.nbytes / 1e6:.1f} MB, from {folder}",
        highlight=False,
    )
