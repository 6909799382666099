"""One snapshot of a run folder, as the console shows it: read from what the coordinator holds.

Sources (server/run_folder.py and server/deploy.py describe the layout and give the paths):
``metrics.jsonl`` (one row per round, phase and site, plus each round's aggregate row),
``checkpoints/state.json`` (the last completed round, and its aggregate row while that round's
model awaits validation),
``run_config.json`` (the run's settings), ``events.jsonl`` (the current phase, from the run's
progress events: server/progress_events.py), ``summary.json``, ``sites.json`` (registered site keys),
``deploy.json`` (ports, PIDs), ``gateway.log`` (server/console/gateway_log.py), the run's
SuperLink (server/console/nodes.py), other run folders beside this one, and an audit trail
(``audit*.jsonl``) where one exists.

Every value in metrics.jsonl came from a site: it is read as untrusted (a non-number is no
number, text is escaped where it is rendered, never interpreted).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.processes import pid_alive
from server.console.gateway_log import GatewayLog, Refusals
from server.console.nodes import NodeStatus, NodeWatch
from server.delivery_check import check_rows, delivery_check
from server.progress_events import Progress, last_progress
from server.run_folder import CoordinatorFolder, RunFolder, finished_runs

GLOBAL = "_global"
"""The series of the global model (the aggregate rows' site name)."""
CURVES = (
    ("train loss", "train_loss", "train", "loss"),
    ("validation macro-AUROC", "val_auroc_macro", "evaluate", "val_auroc_macro"),
    ("validation balanced accuracy", "val_balanced_accuracy", "evaluate", "val_balanced_accuracy"),
)
"""(title, key in the aggregate row, phase of the sites' rows, key in the sites' rows)."""
SITE_PHASES = {
    "train": "teacher round",
    "evaluate": "validation of round",
    "bn-statistics": "BatchNorm statistics, round",
    "distill": "distillation",
    "student": "federated student round",
    "bn-statistics-student": "student BatchNorm statistics",
    "student-final": "delivery check",
}
PHASE_ORDER = {"distill": 1, "student": 2, "bn-statistics-student": 2, "student-final": 2}
"""How far along the run a site's row is (teacher phases: 0)."""
RUN_PHASE_ORDER = {"distillation": 1, "federated student": 2}
AUDIT_LINES = 10
OTHER_RUNS = 20


def number(value: Any) -> float | None:
    """A finite number from an untrusted value, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True)
class SiteView:
    name: str
    node_id: int | None
    online: str  # online | offline | registered | unknown
    since: str  # when it came online or was last seen ("" unknown)
    phase: str  # what its last reply answered
    status: str  # its last reply's status (ok | declined | failed | timeout | refused | dropped)
    reason: str


@dataclass(frozen=True)
class Curve:
    title: str
    series: dict[str, list[tuple[int, float]]]  # "global" first, then one per site


@dataclass(frozen=True)
class Snapshot:
    """Everything the page and ``/metrics`` show, read at one moment."""

    run_dir: Path
    phase: str
    detail: str
    finished: bool
    rounds_done: int
    rounds_total: int | None
    round_seconds: list[tuple[int, float]]
    sites: list[SiteView]
    curves: list[Curve]
    epsilon: dict[str, tuple[float, int, str]]  # site -> (epsilon spent, round, phase)
    dp_target: float | None
    central_epsilon: float | None
    declines: list[dict[str, Any]]
    delivery: dict[str, Any] | None
    refusals: Refusals
    keys: list[dict[str, Any]]
    other_runs: list[dict[str, Any]]
    audit_tail: list[str]
    replies: Counter[tuple[str, str]] = field(default_factory=Counter)  # (site, status) -> replies
    superlink_live: bool = False

    @property
    def sites_online(self) -> int:
        return sum(1 for s in self.sites if s.online == "online")


def read_json(path: Path) -> Any:
    """A JSON file's content, None when missing or caught mid-write."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def key_fingerprint(public_key: str) -> str:
    """An OpenSSH public key's SHA256 fingerprint, as ``ssh-keygen -l`` prints it."""
    parts = public_key.split()
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (IndexError, binascii.Error):
        return "unreadable key"
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def aggregate_rows(rows: list[dict[str, Any]], pending: Any) -> list[dict[str, Any]]:
    """Each completed teacher round's aggregate row, by round; a round still awaiting its
    validation (state.json's ``pending_row``) included."""
    by_round = {int(r["round"]): r for r in rows if r.get("phase") == "aggregate" and number(r.get("round"))}
    if isinstance(pending, dict) and number(pending.get("round")) is not None:
        by_round.setdefault(int(pending["round"]), pending)
    return [by_round[k] for k in sorted(by_round)]


def curves(rows: list[dict[str, Any]], aggregates: list[dict[str, Any]]) -> list[Curve]:
    """Train loss, validation macro-AUROC and balanced accuracy per round: global, then per site."""
    result = []
    for title, global_key, phase, site_key in CURVES:
        series: dict[str, list[tuple[int, float]]] = {GLOBAL: []}
        for row in aggregates:
            value = number(row.get(global_key))
            if value is not None:
                series[GLOBAL].append((int(row["round"]), value))
        for row in rows:
            if row.get("phase") != phase or row.get("status") != "ok":
                continue
            value, server_round = number(row.get(site_key)), number(row.get("round"))
            if value is not None and server_round is not None:
                series.setdefault(str(row.get("site")), []).append((int(server_round), value))
        result.append(Curve(title, {k: sorted(v) for k, v in series.items()}))
    return result


def privacy(rows: list[dict[str, Any]]) -> tuple[dict[str, tuple[float, int, str]], list[dict[str, Any]]]:
    """Each DP site's last reported epsilon (with round and phase), and every declined message."""
    spent: dict[str, tuple[float, int, str]] = {}
    declines = []
    for row in rows:
        site = str(row.get("site", "?"))
        epsilon = number(row.get("dp_epsilon"))
        if epsilon is not None and site != "_global":
            spent[site] = (epsilon, int(number(row.get("round")) or 0), str(row.get("phase", "")))
        if row.get("status") == "declined":
            declines.append(
                {
                    "site": site,
                    "phase": str(row.get("phase", "")),
                    "round": row.get("round"),
                    "reason": str(row.get("reason", "")),
                }
            )
    return spent, declines


def phase_label(row: dict[str, Any], run_phase: str) -> str:
    """What a site is at: what its last reply answered, or the run's later phase it works on now
    (the distillation's and the federated student's rows are written when their phase ends)."""
    phase = str(row.get("phase", ""))
    label = SITE_PHASES.get(phase, phase)
    if phase in ("train", "evaluate", "student", "bn-statistics") and "round" in row:
        label = f"{label} {row['round']}"
    if label and PHASE_ORDER.get(phase, 0) < RUN_PHASE_ORDER.get(run_phase, 0):
        return f"{run_phase} (last answered: {label})"
    return label or "no reply yet"


def site_views(
    rows: list[dict[str, Any]],
    registered: list[dict[str, Any]],
    nodes: dict[int, NodeStatus],
    current: str = "",
) -> list[SiteView]:
    """Every site: registered ones first (sites.json), then any other that replied; ``current``
    is the run's phase (:func:`run_phase`)."""
    last: dict[str, dict[str, Any]] = {}
    node_of: dict[str, int | None] = {}
    for site in registered:
        node_of[str(site.get("name"))] = int(site["node_id"]) if number(site.get("node_id")) else None
    for row in rows:
        name = row.get("site")
        if name is None or name == "_global":
            continue
        last[str(name)] = row
        if number(row.get("node_id")) is not None:
            node_of.setdefault(str(name), int(row["node_id"]))
    views = []
    for name, node_id in node_of.items():
        node = nodes.get(node_id) if node_id is not None else None
        row = last.get(name, {})
        since = (
            ""
            if node is None
            else (node.last_activated if node.status == "online" else node.last_deactivated)
        )
        views.append(
            SiteView(
                name=name,
                node_id=node_id,
                online="unknown" if node is None else node.status,
                since=since,
                phase=phase_label(row, current),
                status=str(row.get("status", "-")),
                reason=str(row.get("reason", "")),
            )
        )
    return views


def run_phase(
    state: dict[str, Any], finished: bool, progress: Progress | None, rows: list[dict[str, Any]]
) -> tuple[str, str]:
    """What the run is doing (a word) and a detail line."""
    if finished:
        return "finished", "summary.json written"
    coordinator = state.get("coordinator_pid")
    if coordinator and not pid_alive(int(coordinator)):
        return "stopped", "the coordinator is not running; continue with `cxr-fl-server start --resume`"
    if progress is not None and progress.phase == "distill":
        return "distillation", "each site distils its student from the global teacher"
    if progress is not None and progress.phase == "student":
        return (
            "federated student",
            f"federated student round {progress.completed_round} of {progress.num_rounds} done",
        )
    if any(r.get("phase") in ("train", "evaluate", "aggregate") for r in rows):
        return "teacher rounds", "the sites train the global teacher"
    if state or rows:
        return "waiting for sites", "the run starts once enough sites are connected"
    return "no run yet", "nothing in this folder yet"


def other_runs(run_dir: Path) -> list[dict[str, Any]]:
    """Run folders beside this one, and inside it, that hold a summary.json: newest first."""
    found = []
    for folder in finished_runs(run_dir):
        path = folder.summary_path
        summary = read_json(path)
        if not isinstance(summary, dict):
            continue
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        best = summary.get("best_validation") or {}
        metric = str(summary.get("selection_metric", ""))
        found.append(
            {
                "name": path.parent.name,
                "path": str(path.parent),
                "finished": mtime,
                "task": summary.get("task"),
                "strategy": summary.get("strategy"),
                "rounds": summary.get("rounds_completed"),
                "best_round": summary.get("best_round"),
                "metric": metric,
                "best": number(best.get(f"val_{metric}")) if isinstance(best, dict) else None,
                "student": summary.get("federated_student", ""),
            }
        )
    return sorted(found, key=lambda r: -float(r["finished"]))[:OTHER_RUNS]


def audit_tail(run_dir: Path) -> list[str]:
    """The last lines of the run folder's audit trail (``audit*.jsonl``), where one exists."""
    lines: list[str] = []
    for path in sorted(run_dir.glob("audit*.jsonl")):
        try:
            lines += path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
    return lines[-AUDIT_LINES:]


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class RunReader:
    """Reads snapshots of one run folder; keeps what is read incrementally (gateway.log, nodes)."""

    def __init__(self, run_dir: Path, watch: NodeWatch | None = None) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.coordinator = CoordinatorFolder(self.run_dir)
        self.gateway = GatewayLog(self.coordinator.gateway_log)
        self.watch = watch or NodeWatch(self.run_dir)

    def current_run(self) -> Path:
        """The run the page follows: this folder's own, or, in a folder that `cxr-fl-server serve`
        serves, its newest run (``runs/NAME/``, the one submitted last)."""
        newest = CoordinatorFolder(self.run_dir).newest_run()
        return newest.root if newest is not None else self.run_dir

    def finished(self, state: dict[str, Any], run: Path | None = None) -> bool:
        """Is there a summary of this run (written after the coordinator's last start)?"""
        try:
            written = RunFolder(run or self.run_dir).summary_path.stat().st_mtime
        except OSError:
            return False
        started = number(state.get("started"))
        return started is None or written >= started

    def snapshot(self) -> Snapshot:
        root, run = self.run_dir, self.current_run()
        state = as_dict(read_json(self.coordinator.deploy_state_path))
        folder = RunFolder(run)
        rows = folder.read_metrics_while_written()
        saved = as_dict(read_json(folder.state_path))
        config = as_dict(read_json(folder.config_path))
        registered = [s for s in read_json(self.coordinator.sites_path) or [] if isinstance(s, dict)]
        finished = self.finished(state, run)
        aggregates = aggregate_rows(rows, saved.get("pending_row"))
        phase, detail = run_phase(state, finished, last_progress(folder), rows)
        spent, declines = privacy(rows)
        central = [number(r.get("train_central_dp_epsilon")) for r in aggregates]
        done = number(saved.get("completed_round"))
        total = number(config.get("num-rounds"))
        return Snapshot(
            run_dir=run,
            phase=phase,
            detail=detail,
            finished=finished,
            rounds_done=int(done) if done is not None else len(aggregates),
            rounds_total=int(total) if total is not None else None,
            round_seconds=[(int(r["round"]), s) for r in aggregates if (s := number(r.get("seconds")))],
            sites=site_views(rows, registered, self.watch.nodes(state), phase),
            curves=curves(rows, aggregates),
            epsilon=spent,
            dp_target=number(config.get("dp-target-epsilon")) if config.get("dp-enabled") is True else None,
            central_epsilon=next((c for c in reversed(central) if c is not None), None),
            declines=declines,
            delivery=delivery_check(rows) if check_rows(rows)[0] else None,
            refusals=self.gateway.read(),
            keys=[
                {
                    "name": str(s.get("name")),
                    "node_id": s.get("node_id"),
                    "fingerprint": key_fingerprint(str(s.get("public_key", ""))),
                }
                for s in registered
            ],
            other_runs=[r for r in other_runs(root) if Path(str(r["path"])) != run],
            audit_tail=audit_tail(root),
            replies=Counter(
                (str(r["site"]), str(r["status"]))
                for r in rows
                if r.get("site") != "_global" and "status" in r
            ),
            superlink_live=self.watch.live,
        )
