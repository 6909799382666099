"""``GET /metrics``: the run in Prometheus' text exposition format (version 0.0.4), written here.

Names (all prefixed ``cxr_fl_``): ``rounds_completed``, ``rounds_planned``, ``round_seconds``
(a summary: ``_sum``/``_count`` over completed teacher rounds) and ``last_round_seconds``,
``sites_registered``, ``sites_online``, ``replies_total{site,status}``,
``gateway_refused_total{reason}``, ``dp_epsilon_spent{site}``, ``central_dp_epsilon`` (when
central DP is on) and ``run_finished``. Label values are escaped as the format requires;
refusal reasons are grouped without numbers (server/console/gateway_log.py), so a caller cannot
make the label set grow without bound.
"""

from __future__ import annotations

from collections.abc import Iterable

from server.console.run_state import Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "cxr_fl_"


def label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{label_value(v)}"' for k, v in labels.items()) + "}"


def family(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]
) -> list[str]:
    """One metric family: HELP and TYPE lines, then a line per sample."""
    full = PREFIX + name
    lines = [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"]
    lines += [f"{full}{_labels(labels)} {value:g}" for labels, value in samples]
    return lines


def metrics_text(snap: Snapshot) -> str:
    seconds = [s for _, s in snap.round_seconds]
    lines = family("rounds_completed", "gauge", "Teacher rounds completed.", [({}, snap.rounds_done)])
    if snap.rounds_total is not None:
        lines += family("rounds_planned", "gauge", "Teacher rounds of the run.", [({}, snap.rounds_total)])
    lines += [
        f"# HELP {PREFIX}round_seconds Seconds per completed teacher round.",
        f"# TYPE {PREFIX}round_seconds summary",
        f"{PREFIX}round_seconds_sum {sum(seconds):g}",
        f"{PREFIX}round_seconds_count {len(seconds)}",
    ]
    if seconds:
        lines += family(
            "last_round_seconds", "gauge", "Seconds of the last teacher round.", [({}, seconds[-1])]
        )
    lines += family("sites_registered", "gauge", "Sites known to the run.", [({}, len(snap.sites))])
    lines += family("sites_online", "gauge", "Sites connected to the SuperLink.", [({}, snap.sites_online)])
    lines += family(
        "replies_total",
        "counter",
        "Replies of the sites by status (ok, declined, failed, timeout, refused, dropped).",
        [({"site": site, "status": status}, n) for (site, status), n in sorted(snap.replies.items())],
    )
    lines += family(
        "gateway_refused_total",
        "counter",
        "Calls and connections refused at the sites' address, by reason.",
        [({"reason": reason}, n) for reason, n in sorted(snap.refusals.by_reason.items())],
    )
    lines += family(
        "dp_epsilon_spent",
        "gauge",
        "Epsilon spent as last reported by each DP site.",
        [({"site": site}, eps) for site, (eps, _, _) in sorted(snap.epsilon.items())],
    )
    if snap.central_epsilon is not None:
        lines += family(
            "central_dp_epsilon", "gauge", "Central DP site-level epsilon.", [({}, snap.central_epsilon)]
        )
    lines += family(
        "run_finished", "gauge", "1 once the run's summary is written.", [({}, float(snap.finished))]
    )
    return "\n".join(lines) + "\n"
