"""The console's HTML, rendered on the server from a :class:`~server.console.run_state.Snapshot`.

:func:`page` is the whole document (its stylesheet and script are served by the console itself:
no CDN, no inline script, so a strict Content-Security-Policy holds); :func:`live` is the part
the page fetches again every few seconds and swaps in. Every text that came from a site or a
log (names, reasons, log lines) is escaped here.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime
from html import escape
from typing import Any

from server.console.curves import series_colours, svg_chart
from server.console.run_state import GLOBAL, Snapshot
from server.delivery_check import FIGURES, NOT_AVAILABLE

REFRESH_SECONDS = 2


def table(headers: Iterable[str], rows: Iterable[Iterable[str]], cls: str = "", empty: str = "none") -> str:
    """A table of cells already escaped (or made here); ``empty`` when there are no rows."""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="empty {cls}">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _fmt(value: Any, digits: int = 3) -> str:
    return NOT_AVAILABLE if not isinstance(value, int | float) else f"{value:.{digits}f}"


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _moment(iso: str) -> str:
    """An ISO 8601 time from the SuperLink, to the second, in this machine's time zone."""
    try:
        return _when(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return iso


def run_section(snap: Snapshot) -> str:
    total = "?" if snap.rounds_total is None else str(snap.rounds_total)
    seconds = [s for _, s in snap.round_seconds]
    timing = "no round finished yet"
    if seconds:
        timing = f"last round {seconds[-1]:.1f} s, mean {sum(seconds) / len(seconds):.1f} s per round"
    return (
        '<section id="run"><h2>The run</h2>'
        f'<p><span id="phase" class="phase phase-{escape(snap.phase.replace(" ", "-"))}">'
        f'{escape(snap.phase)}</span> <span id="detail">{escape(snap.detail)}</span></p>'
        f'<p id="round">teacher round <b id="rounds-done">{snap.rounds_done}</b> of '
        f'<b id="rounds-total">{total}</b></p>'
        f'<p id="round-seconds">{escape(timing)}</p>'
        f'<p class="where">run folder {escape(str(snap.run_dir))}; updated {_when(time.time())}</p>'
        "</section>"
    )


def sites_section(snap: Snapshot) -> str:
    rows = []
    for site in snap.sites:
        since = f" since {escape(_moment(site.since))}" if site.online == "online" and site.since else ""
        if site.online != "online" and site.since:
            since = f", last seen {escape(_moment(site.since))}"
        status = escape(site.status) + (f": {escape(site.reason)}" if site.reason else "")
        rows.append(
            [
                f'<span class="site" data-site="{escape(site.name)}">{escape(site.name)}</span>',
                f'<span class="online online-{escape(site.online)}" data-site="{escape(site.name)}">'
                f"{escape(site.online)}</span>{since}",
                escape(site.phase),
                f'<span class="status status-{escape(site.status)}">{status}</span>',
            ]
        )
    note = (
        ""
        if snap.superlink_live
        else '<p class="note">The SuperLink is not answering: connection states are the last known.</p>'
    )
    return (
        f'<section id="sites"><h2>Sites ({snap.sites_online} online)</h2>{note}'
        + table(["site", "connection", "current phase", "last reply"], rows, "sites", "no site yet")
        + "</section>"
    )


def curves_section(snap: Snapshot) -> str:
    names = sorted({name for curve in snap.curves for name in curve.series})
    colours = series_colours(names)
    legend = "".join(
        f'<li><svg class="swatch" width="12" height="12"><rect width="12" height="12" '
        f'fill="{colours[n]}"/></svg>'
        f"{'global model' if n == GLOBAL else escape(n)}</li>"
        for n in [GLOBAL, *[n for n in names if n != GLOBAL]]
    )
    charts = "".join(
        f"<figure><figcaption>{escape(c.title)}</figcaption>"
        + (
            svg_chart(c, colours)
            if any(c.series.values())
            else f'<p class="empty" data-curve="{escape(c.title)}">not reported yet (deployed sites send it '
            "only with their opt-in to share more figures)</p>"
        )
        + "</figure>"
        for c in snap.curves
    )
    return (
        '<section id="curves"><h2>Learning curves</h2>'
        f'<ul class="legend">{legend}</ul><div class="charts">{charts}</div>'
        '<p class="note">Global: the weighted mean over the sites that reported it. A round\'s validation '
        "arrives with the next round's replies (in-train validation).</p></section>"
    )


def privacy_section(snap: Snapshot) -> str:
    target = (
        "the site's own" if snap.dp_target is None else f"{snap.dp_target:g} (run), or the site's tighter one"
    )
    rows = []
    for site, (epsilon, server_round, phase) in sorted(snap.epsilon.items()):
        share = ""
        if snap.dp_target:
            share = (
                f' <meter min="0" max="{snap.dp_target:g}" value="{min(epsilon, snap.dp_target):g}"></meter>'
            )
        rows.append(
            [escape(site), f"{epsilon:.3g}{share}", escape(target), f"{escape(phase)} {server_round}"]
        )
    declines = [
        [escape(d["site"]), escape(d["phase"]), escape(str(d["round"])), escape(d["reason"])]
        for d in snap.declines
    ]
    central = ""
    if snap.central_epsilon is not None:
        central = f'<p id="central-dp">Central DP: site-level epsilon {snap.central_epsilon:.3g} so far.</p>'
    return (
        '<section id="privacy"><h2>Privacy</h2>'
        + table(["DP site", "epsilon spent", "target", "reported in"], rows, "epsilon", "no site reports DP")
        + central
        + "<h3>Declined messages</h3>"
        + table(["site", "phase", "round", "reason"], declines, "declines", "no site declined")
        + "</section>"
    )


def delivery_section(snap: Snapshot) -> str:
    check = snap.delivery
    if not check:
        return (
            '<section id="delivery"><h2>Students: check before delivery</h2>'
            '<p class="empty">not yet (after the students are distilled)</p></section>'
        )
    rows = []
    for site in check["sites"]:
        verdict = escape(str(site["verdict"]))
        reason = f": {escape(str(site['reason']))}" if site.get("reason") else ""
        never = site.get("never_predicted")
        rows.append(
            [escape(str(site["site"]))]
            + [_fmt(site.get(k)) for k in FIGURES]
            + [
                NOT_AVAILABLE if never is None else escape(str(never)),
                f'<span class="verdict-{verdict}">{verdict}</span>{reason}',
            ]
        )
    headers = [
        "site",
        "teacher macro-AUROC",
        "student macro-AUROC",
        "teacher bal. acc. (op)",
        "student bal. acc. (op)",
    ]
    return (
        '<section id="delivery"><h2>Students: check before delivery</h2>'
        + table([*headers, "classes never predicted", "check"], rows, "delivery")
        + f"<p>{check['fit']} of {len(check['sites'])} site(s) fit; {check['unfit']} unfit, "
        f"{check['failed']} failed (phase {escape(str(check['phase']))}; unfit: more than "
        f"{check['unfit_margin']:g} below the teacher).</p>"
        "</section>"
    )


def door_section(snap: Snapshot) -> str:
    refusals = snap.refusals
    reasons = [[escape(r), str(n)] for r, n in refusals.by_reason.most_common()]
    peers = [[escape(p), str(n)] for p, n in refusals.by_peer.most_common(20)]
    recent = "".join(f"<li>{escape(line)}</li>" for line in refusals.recent)
    keys = [
        [escape(k["name"]), escape(str(k["node_id"])), f"<code>{escape(k['fingerprint'])}</code>"]
        for k in snap.keys
    ]
    return (
        f'<section id="door"><h2>The door: <span id="refused-total">{refusals.total}</span> refused</h2>'
        '<div class="columns">'
        + table(["reason", "count"], reasons, "refused-reasons", "nothing refused")
        + table(["peer", "count"], peers, "refused-peers", "")
        + "</div>"
        + (
            f'<details><summary>last refusals</summary><ul class="log">{recent}</ul></details>'
            if recent
            else ""
        )
        + "<h3>Registered site keys</h3>"
        + table(
            ["site", "Flower node", "key fingerprint"], keys, "keys", "no key registered (an --insecure run)"
        )
        + "</section>"
    )


def history_section(snap: Snapshot) -> str:
    rows = [
        [
            escape(str(r["name"])),
            _when(float(r["finished"])),
            escape(str(r["task"])),
            escape(str(r["strategy"])),
            escape(str(r["rounds"])),
            f"{escape(str(r['best_round']))} ({escape(r['metric'])} {_fmt(r['best'])})",
            escape(str(r["student"])),
        ]
        for r in snap.other_runs
    ]
    audit = "".join(f"<li>{escape(line)}</li>" for line in snap.audit_tail)
    return (
        '<section id="history"><h2>Other runs</h2>'
        + table(
            ["run", "finished", "task", "strategy", "rounds", "best round", "student"],
            rows,
            "runs",
            "no other run here",
        )
        + (f'<h3>Audit trail (last entries)</h3><ul class="log" id="audit">{audit}</ul>' if audit else "")
        + "</section>"
    )


def live(snap: Snapshot) -> str:
    """The part of the page that is fetched again and swapped in."""
    return "".join(
        section(snap)
        for section in (
            run_section,
            sites_section,
            curves_section,
            privacy_section,
            delivery_section,
            door_section,
            history_section,
        )
    )


def page(snap: Snapshot) -> str:
    """The whole document; its script refreshes ``#live`` every :data:`REFRESH_SECONDS` seconds."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>cxr-fl console: {escape(snap.run_dir.name)}</title>"
        '<link rel="stylesheet" href="console.css"></head>'
        f'<body data-refresh="{REFRESH_SECONDS}"><header><h1>cxr-fl coordinator console</h1>'
        '<p class="note">Read only. <span id="connection">live</span></p></header>'
        f'<main id="live">{live(snap)}</main>'
        '<script src="console.js"></script></body></html>'
    )
