"""``cxr-fl-client privacy-ledger``: look at a site's privacy ledger, or reset it on purpose.

A missing, emptied or altered ledger stops a site's DP rounds (client/privacy_ledger.py); only
its operator can start a new budget, with ``reset``, which keeps the old files and logs who,
when and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from common.cli_support import fail, stdout, typer_app

ledger_app = typer_app("privacy-ledger", "The site's record of the privacy budget it has spent on its data.")


def _ledger(out: Path | None, ledger: Path | None) -> Path:
    from client.privacy_ledger import default_ledger_path

    if (out is None) == (ledger is None):
        raise fail("give the site's --out folder or its --ledger file (one of them)")
    return ledger.resolve() if ledger is not None else default_ledger_path(out.resolve())


OutOption = Annotated[
    Path | None, typer.Option("--out", help="The site's --out folder (ledger in OUT/privacy/ledger.json).")
]
LedgerOption = Annotated[
    Path | None, typer.Option("--ledger", help="The ledger file, when the site runs with --privacy-ledger.")
]


@ledger_app.command()
def show(out: OutOption = None, ledger: LedgerOption = None) -> None:
    """Verify the ledger and print the epsilon spent on each data set."""
    from client.privacy_ledger import LedgerIntegrityError, PrivacyLedger, key_path

    path = _ledger(out, ledger)
    if not path.exists() and not key_path(path).exists():
        stdout.print(f"no privacy ledger at {path}: no DP round has spent budget with it", highlight=False)
        return
    try:
        opened = PrivacyLedger.open(path)
    except LedgerIntegrityError as exc:
        raise fail(str(exc)) from None
    table = Table(title=f"{path} (verified)", title_justify="left")
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
    out: OutOption = None,
    ledger: LedgerOption = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm: the site's spent budget is forgotten.")
    ] = False,
) -> None:
    """Start a new privacy budget: set the ledger aside and log who, when and why."""
    from client.privacy_ledger import reset_ledger

    path = _ledger(out, ledger)
    if not reason.strip():
        raise fail("--reason: say why the budget restarts (e.g. 'new data set after audit 2026-11')")
    if not yes:
        raise fail(f"resetting {path} forgets the privacy budget this site has spent; add --yes to confirm")
    log = reset_ledger(path, reason.strip())
    stdout.print(f"privacy ledger {path} reset; the old files are kept beside it; logged in {log}")
