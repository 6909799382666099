"""``cxr-fl-client privacy-ledger``: look at a site's privacy ledger, or reset it on purpose.

The ledger is site-wide (client/privacy_ledger.py): by default ``STATE_DIR/privacy/ledger.json``
whatever run folder a site uses. A missing, emptied, altered or rolled-back ledger stops a site's
DP rounds; only its operator can start a new budget, with ``reset``, which keeps the old files and
logs who, when and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from common.cli_support import fail, stdout, typer_app

ledger_app = typer_app("privacy-ledger", "The site's record of the privacy budget it has spent on its data.")


def _where(ledger: Path | None, state_dir: Path | None) -> tuple[Path, Path]:
    from client.privacy_ledger import default_ledger_path, default_state_dir

    state = state_dir.resolve() if state_dir is not None else default_state_dir()
    return (ledger.resolve() if ledger is not None else default_ledger_path(state)), state


LedgerOption = Annotated[
    Path | None,
    typer.Option(
        "--ledger",
        help="The ledger file, when the site runs with --privacy-ledger (default: the site-wide one).",
    ),
]
StateDirOption = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="The site's state folder (default: $CXR_FL_STATE_DIR, else $XDG_STATE_HOME/cxr-fl, "
        "else ~/.local/state/cxr-fl).",
    ),
]


@ledger_app.command()
def show(ledger: LedgerOption = None, state_dir: StateDirOption = None) -> None:
    """Verify the ledger (content, key and sequence counter) and print the epsilon spent per data set."""
    from client.privacy_ledger import LedgerIntegrityError, PrivacyLedger, key_path

    path, state = _where(ledger, state_dir)
    try:
        opened = PrivacyLedger.open(path, state)
    except LedgerIntegrityError as exc:
        raise fail(str(exc)) from None
    if not path.exists() and not key_path(path).exists():
        stdout.print(f"no privacy ledger at {path}: no DP round has spent budget with it", highlight=False)
        return
    table = Table(title=f"{path} (verified, write {opened.seq})", title_justify="left")
    for column in ("data set", "epsilon spent", "target", "delta", "accountant", "rounds"):
        table.add_column(column)
    for key, entry in opened.entries.items():
        plan = entry.plan
        table.add_row(
            key,
            f"{entry.epsilon:.3f}",
            f"{plan.target_epsilon:g}" if plan else "-",
            f"{plan.target_delta:g}" if plan else "-",
            plan.accountant if plan else "-",
            str(len(entry.spent)),
        )
    stdout.print(table)


@ledger_app.command()
def reset(
    reason: Annotated[str, typer.Option("--reason", help="Why the budget restarts (kept in the log).")],
    ledger: LedgerOption = None,
    state_dir: StateDirOption = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm: the site's spent budget is forgotten.")
    ] = False,
) -> None:
    """Start a new privacy budget: set the ledger aside and log who, when and why."""
    from client.privacy_ledger import reset_ledger

    path, state = _where(ledger, state_dir)
    if not reason.strip():
        raise fail("--reason: say why the budget restarts (e.g. 'new data set after audit 2026-11')")
    if not yes:
        raise fail(f"resetting {path} forgets the privacy budget this site has spent; add --yes to confirm")
    log = reset_ledger(path, state, reason.strip())
    stdout.print(f"privacy ledger {path} reset; the old files are kept beside it; logged in {log}")
