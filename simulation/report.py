"""The report of a simulated federation: a folder a person opens.

``build_report(OUT)`` reads an experiment folder (see simulation/experiment.py) and writes
``OUT/report/``:

- ``report.md``: first one sentence per claim (teacher vs pooled, students vs teacher, KD vs no
  KD: held or not, with a 95% bootstrap interval, see simulation/claims.py); per-round global
  metrics; final teacher vs baselines; per-site teacher and student; the check before delivery
  (server/delivery_check.py); the compression table of each site that made one; DP epsilon per site;
- ``results.json``: every number of those tables, for scripts (``claims``, ``delivery_check``;
  each ``delivered`` row, the federated student's final phase or else the distillation, has
  ``teacher_op_balanced_accuracy`` and ``student_op_balanced_accuracy`` beside the AUROCs, None
  where the site sent none);
- PNG plots: label distribution per site, learning curves (with the pooled baseline as a line),
  per-site bars, student vs teacher, and Grad-CAM overlays of a site's student.

It only reads files, so ``python -m simulation report OUT`` rebuilds it at any time.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from common.config import TaskConfig
from common.errors import DataError
from common.jsonio import write_json
from common.markdown import table_lines
from common.metrics import nanmean
from common.tasks import get_task
from server.delivery_check import check_markdown, check_rows, delivery_check
from server.reporting import global_rows
from simulation.baselines import SCORES_FILE
from simulation.claims import kd_claim, students_claim, teacher_claim
from simulation.experiment_folder import experiment_run
from simulation.site_scores import SITE_SCORES_FILE, read_site_scores

logger = logging.getLogger(__name__)

HEADLINE = ("accuracy", "balanced_accuracy", "auroc_macro", "f1_macro")
DELIVERED_KEYS = (
    "teacher_auroc_macro",
    "student_auroc_macro",
    "teacher_op_balanced_accuracy",
    "student_op_balanced_accuracy",
)
GRADCAM_IMAGES = 4


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and value is not None else math.nan


def _fmt(value: Any, digits: int = 4) -> str:
    number = _num(value)
    return f"{number:.{digits}f}" if math.isfinite(number) else "-"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return table_lines(header, rows, align="l" + "r" * (len(header) - 1))


def collect_results(out: Path) -> dict[str, Any]:
    """Every number the report shows, gathered from the experiment folder."""
    run = experiment_run(out)
    if not run.metrics_path.is_file():
        raise DataError(f"{out} is not an experiment folder: {run.metrics_path} is missing")
    rows = run.read_metrics()
    summary = _read_json(run.summary_path) or {}
    experiment = _read_json(out / "experiment.json") or {}
    rounds = [
        {
            k: v
            for k, v in r.items()
            if k in ("round", "seconds", "sites_trained", "sites_sampled", "train_loss")
            or k.startswith("val_")
        }
        for r in global_rows(rows)
    ]
    epsilon = dict(summary.get("dp_epsilon_spent") or {})
    distill = [r for r in rows if r.get("phase") == "distill"]
    # the student each site deploys by default (scored on the site's test split): the federated
    # one's final phase if it ran, else the student the site distilled
    check_phase, delivered = check_rows(rows)
    delivered = [{**{k: None for k in DELIVERED_KEYS}, **r} for r in delivered]
    check = delivery_check(rows)
    compression = {}
    cards = {}
    for site_dir in sorted(run.sites_dir.glob("*")):
        table = _read_json(site_dir / "student" / "compression.json")
        if table is not None:
            compression[site_dir.name] = table
        card = _read_json(site_dir / "student" / "model_card.json")
        if card is not None:
            cards[site_dir.name] = {
                k: card.get(k) for k in ("size_mb", "parameters", "flops", "onnx_max_abs_diff", "latency")
            }
    return {
        "experiment": experiment,
        "summary": {k: v for k, v in summary.items() if k not in ("distillation", "delivery_check")},
        "rounds": rounds,
        "baselines": _read_json(out / "baselines.json"),
        "distillation": distill,
        "delivered": delivered,
        "delivered_phase": check_phase,
        "delivery_check": check,
        "claims": _claims(out, summary, experiment, check, distill, delivered),
        "dp_epsilon": epsilon,
        "compression": compression,
        "students": cards,
        "partition": _read_json(out / "partition" / "partition.json"),
    }


def _read_scores(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as arrays:
        return {key: arrays[key] for key in arrays.files}


def _claims(
    out: Path,
    summary: dict[str, Any],
    experiment: dict[str, Any],
    check: dict[str, Any],
    distill: list[dict[str, Any]],
    delivered: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The report's opening claims (simulation/claims.py), as results.json stores them."""
    task = get_task(str(summary.get("task") or experiment.get("task") or TaskConfig().name))
    site_scores = read_site_scores(out / SITE_SCORES_FILE)
    claims = [
        teacher_claim(_read_json(out / "baselines.json"), _read_scores(out / SCORES_FILE), task),
        students_claim(check, site_scores, task),
        kd_claim(
            delivered, distill, site_scores, task, coordinator_start=bool(summary.get("students_start"))
        ),
    ]
    return [c.to_dict() for c in claims]


def _claim_lines(results: dict[str, Any]) -> list[str]:
    claims = results.get("claims") or []
    if not claims:
        return []
    lines = ["", "## Claims", ""]
    lines += [f"- {c['sentence']}" for c in claims]
    lines += [
        "",
        "Held: the point estimate meets the target; the interval (2.5th-97.5th percentile of "
        "1,000 bootstrap resamples) says how firmly the data support it.",
    ]
    return lines


def _summary_note(results: dict[str, Any]) -> str:
    note = str(results["summary"].get("federated_student") or "")
    return note.split(":")[0] if note else "federated rounds"


def _teacher_rows(baselines: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    entries = [
        ("federated (best round)", baselines["federated"]),
        ("pooled (centralised)", baselines["pooled"]),
    ]
    entries += [(f"local-only {name}", scores) for name, scores in sorted(baselines.get("local", {}).items())]
    if "start" in baselines:
        entries.append(("start alone (coordinator's public pretraining)", baselines["start"]))
    return entries


def _mean_site(scores: dict[str, Any], metric: str) -> float:
    return nanmean([_num(s.get(metric)) for s in scores["sites"].values()])


DELIVERED_COLUMNS = ("accuracy", "balanced_accuracy", "op_balanced_accuracy", "auroc_macro")


def _delivered_intro(results: dict[str, Any]) -> str:
    if results.get("delivered_phase") == "distill":
        return (
            f"What each site deploys: the student it distilled (federated student: "
            f"{results['summary'].get('federated_student') or 'none'})."
        )
    return (
        f"What each site deploys by default: the federated KD student ({_summary_note(results)}), "
        "or its local fine-tune where `kd-personalise-epochs` > 0 and it won on the site's "
        "validation split; each site's `delivered.json` names the folder. `op_balanced_accuracy`: "
        "at the site's own operating point."
    )


def _delivered_lines(results: dict[str, Any]) -> list[str]:
    """The delivered students against the teacher and the site's own KD and no-KD students."""
    delivered = results.get("delivered") or []
    if not delivered:
        return []
    lines = ["", "## Delivered students (site test split)", "", _delivered_intro(results), ""]
    by_site = {str(r.get("site")): r for r in results["distillation"]}
    header = ["site", "status", "delivered"]
    for m in DELIVERED_COLUMNS:
        header += [f"teacher {m}", f"delivered {m}", f"KD site student {m}", f"no-KD {m}"]
    table_rows = []
    own = results.get("delivered_phase") == "distill"  # no federated student: the site's own
    for r in delivered:
        site = by_site.get(str(r.get("site")), {})
        kind = "personalised" if _num(r.get("student_personalised")) == 1.0 else "federated"
        cells = [str(r.get("site")), str(r.get("status")), "site's own" if own else kind]
        for m in DELIVERED_COLUMNS:
            kd = site.get(f"student_{m}")
            if m == "op_balanced_accuracy":
                kd = r.get("kd_op_balanced_accuracy", site.get("kd_op_balanced_accuracy"))
            cells += [
                _fmt(r.get(f"teacher_{m}")),
                _fmt(r.get(f"student_{m}")),
                _fmt(kd),
                _fmt(_nokd(r, site, m)),
            ]
        table_rows.append(cells)
    return lines + _table(header, table_rows)


def _nokd(delivered: dict[str, Any], distill: dict[str, Any], metric: str) -> Any:
    """The no-KD student's figure: the checked phase's row first, else the distillation row."""
    value = delivered.get(f"nokd_{metric}")
    return value if value is not None else distill.get(f"nokd_{metric}")


def _baseline_lines(baselines: dict[str, Any] | None, metric: str) -> list[str]:
    if not baselines:
        return []
    lines = [
        "",
        "## Final teacher vs baselines",
        "",
        f"Same training budget for every teacher ({baselines['budget_epochs']} epochs over its data"
        + (", each from the coordinator's publicly pretrained start). " if "start" in baselines else "). ")
        + "Pooled test set = union of the sites' test splits; 'op' = each test image decided at its "
        "own site's operating point (fitted for that teacher on the site's validation split); "
        "'site mean' = mean over sites of the metric on each site's own test split.",
        "",
    ]
    return lines + _table(
        [
            "teacher",
            *[f"pooled test {m}" for m in HEADLINE],
            "pooled test op balanced_accuracy",
            f"site mean {metric}",
        ],
        [
            [
                name,
                *[_fmt(s["pooled_test"].get(m)) for m in HEADLINE],
                _fmt(s["pooled_test"].get("op_balanced_accuracy")),
                _fmt(_mean_site(s, metric)),
            ]
            for name, s in _teacher_rows(baselines)
        ],
    )


def _student_card_lines(students: dict[str, Any]) -> list[str]:
    if not students:
        return []
    lines = ["", "Deployable students (ONNX, ONNX Runtime on this machine, batch 1):", ""]
    return lines + _table(
        ["site", "size MB", "parameters", "MFLOPs", "latency ms", "ONNX max abs diff"],
        [
            [
                name,
                _fmt(c.get("size_mb"), 2),
                str(c.get("parameters", "-")),
                _fmt(_num(c.get("flops")) / 1e6, 1),
                _fmt((c.get("latency") or {}).get("median_ms"), 2),
                f"{_num(c.get('onnx_max_abs_diff')):.1e}",
            ]
            for name, c in sorted(students.items())
        ],
    )


def render_markdown(results: dict[str, Any], plots: list[str]) -> str:
    summary = results["summary"]
    metric = summary.get("selection_metric", "auroc_macro")
    lines = [
        f"# Simulated federation: {summary.get('task', '?')}",
        *_claim_lines(results),
        "",
        "## Run",
        "",
        f"Teacher `{summary.get('teacher', '?')}`, strategy `{summary.get('strategy', '?')}`, "
        f"{summary.get('rounds_completed', 0)} rounds, best round {summary.get('best_round', '?')} "
        f"by federated validation {metric}. "
        f"Wall time of the federated run: {_fmt(summary.get('seconds'), 1)} s.",
    ]
    partition = results.get("partition") or {}
    if partition:
        settings = partition.get("settings", {})
        lines += [
            "",
            f"Partition: `{settings.get('partitioner', '?')}` into {len(partition.get('sizes', []))} sites "
            f"(seed {settings.get('seed', '?')}), sizes {partition.get('sizes', [])}.",
        ]
    lines += ["", "## Global teacher per round (federated validation)", ""]
    lines += _table(
        ["round", "sites trained", "train loss", "val loss", *[f"val {m}" for m in HEADLINE], "seconds"],
        [
            [
                str(r["round"]),
                f"{r.get('sites_trained', '-')}/{r.get('sites_sampled', '-')}",
                _fmt(r.get("train_loss")),
                _fmt(r.get("val_loss")),
                *[_fmt(r.get(f"val_{m}")) for m in HEADLINE],
                _fmt(r.get("seconds"), 1),
            ]
            for r in results["rounds"]
        ],
    )
    lines += _baseline_lines(results.get("baselines"), metric)
    if results["distillation"]:
        lines += ["", "## Teacher and student at each site (site test split)", ""]
        header = ["site", "status"]
        for m in ("accuracy", "auroc_macro"):
            header += [f"teacher {m}", f"student {m}", f"no-KD student {m}"]
        rows = []
        for r in results["distillation"]:
            cells = [str(r.get("site")), str(r.get("status"))]
            for m in ("accuracy", "auroc_macro"):
                cells += [_fmt(r.get(f"teacher_{m}")), _fmt(r.get(f"student_{m}")), _fmt(r.get(f"nokd_{m}"))]
            rows.append(cells)
        lines += _table(header, rows)
        lines += _delivered_lines(results)
        lines += _student_card_lines(results.get("students") or {})
        check = check_markdown(results.get("delivery_check") or {})
        lines += ["", *check] if check else []
    for site, table in sorted(results["compression"].items()):
        lines += ["", f"## Compression comparison at {site}", ""]
        rows_data = table.get("rows", table) if isinstance(table, dict) else table
        if rows_data:
            keys = [k for k in rows_data[0] if k != "path"]
            lines += _table(
                keys,
                [
                    [_fmt(r.get(k), 3) if isinstance(r.get(k), float) else str(r.get(k)) for k in keys]
                    for r in rows_data
                ],
            )
    if results["dp_epsilon"]:
        lines += ["", "## Differential privacy spent per site", ""]
        lines += _table(
            ["site", "epsilon"], [[s, _fmt(e, 3)] for s, e in sorted(results["dp_epsilon"].items())]
        )
    lines += ["", "## Plots", ""]
    lines += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _plot_learning_curves(results: dict[str, Any], path: Path) -> None:
    metric = results["summary"].get("selection_metric", "auroc_macro")
    rounds = results["rounds"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [r["round"] for r in rounds],
        [_num(r.get(f"val_{metric}")) for r in rounds],
        marker="o",
        label="federated",
    )
    baselines = results.get("baselines")
    if baselines:
        pooled = _num(baselines["pooled"]["pooled_val"].get(metric))
        ax.axhline(pooled, color="tab:red", linestyle="--", label="pooled (centralised), end of training")
    ax.set_xlabel("round")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("Global teacher on the sites' validation splits")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_per_site(results: dict[str, Any], path: Path) -> bool:
    baselines = results.get("baselines")
    if not baselines:
        return False
    metric = results["summary"].get("selection_metric", "auroc_macro")
    sites = sorted(baselines["federated"]["sites"])
    series = {"federated": baselines["federated"], "pooled": baselines["pooled"]}
    third: list[float] | None = None
    if baselines.get("local"):
        third = [_num(baselines["local"][s]["sites"][s].get(metric)) for s in sites]
        label = "local-only (own site)"
    elif baselines.get("start"):
        third = [_num(baselines["start"]["sites"][s].get(metric)) for s in sites]
        label = "start alone (public pretraining)"
    fig, ax = plt.subplots(figsize=(max(6, len(sites) * 0.9), 4))
    width = 0.27
    x = np.arange(len(sites))
    for i, (name, scores) in enumerate(series.items()):
        ax.bar(x + (i - 1) * width, [_num(scores["sites"][s].get(metric)) for s in sites], width, label=name)
    if third is not None:  # neither local-only teachers nor a pretrained start: two bars
        ax.bar(x + width, third, width, label=label)
    ax.set_xticks(x, sites, rotation=45 if len(sites) > 8 else 0)
    ax.set_ylabel(f"test {metric}")
    ax.set_title("Teachers on each site's test split")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_student_vs_teacher(results: dict[str, Any], path: Path) -> bool:
    rows = [r for r in results["distillation"] if r.get("status") == "ok"]
    if not rows:
        return False
    sites = [str(r["site"]) for r in rows]
    x = np.arange(len(sites))
    fig, ax = plt.subplots(figsize=(max(6, len(sites) * 0.9), 4))
    width = 0.27
    ax.bar(x - width, [_num(r.get("teacher_auroc_macro")) for r in rows], width, label="teacher")
    ax.bar(x, [_num(r.get("student_auroc_macro")) for r in rows], width, label="KD student")
    if any(math.isfinite(_num(r.get("nokd_auroc_macro"))) for r in rows):
        ax.bar(x + width, [_num(r.get("nokd_auroc_macro")) for r in rows], width, label="student without KD")
    delivered = {str(r.get("site")): r for r in results.get("delivered") or [] if r.get("status") == "ok"}
    if delivered:
        ax.plot(
            x,
            [_num(delivered.get(site, {}).get("student_auroc_macro")) for site in sites],
            "k*",
            markersize=12,
            label="delivered student",
        )
    ax.set_xticks(x, sites)
    ax.set_ylabel("test macro AUROC")
    ax.set_title("Student vs teacher at each site")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _gradcam_overlays(out: Path, report_dir: Path) -> list[str]:
    """Grad-CAM of the first site's student on a few of the images listed in its manifest."""
    import csv

    from common.export import load_torch_model
    from common.gradcam import default_layer, grad_cam, save_overlay

    students = sorted(experiment_run(out).sites_dir.glob("*/student/student.pt"))
    if not students:
        return []
    manifest = out / "partition" / f"{students[0].parent.parent.name}.csv"
    if not manifest.is_file():
        return []
    with manifest.open(encoding="utf-8") as handle:
        paths = [Path(row["path"]) for row in csv.DictReader(handle)][:GRADCAM_IMAGES]
    loaded = load_torch_model(students[0])
    prep = loaded.preprocessing
    layer = default_layer(loaded.config.name)
    target = report_dir / "gradcam"
    target.mkdir(exist_ok=True)
    written = []
    for image_path in paths:
        result = grad_cam(loaded.model, prep.load_image(image_path), loaded.task, layer=layer)
        png = save_overlay(
            prep.load_grey(image_path), result, target / f"{image_path.stem}.png", title=image_path.name
        )
        written.append(f"gradcam/{png.name}")
    return written


def build_report(out: Path) -> Path:
    """Write OUT/report/ (report.md, results.json, PNGs) and return the path of report.md."""
    out = Path(out).expanduser().resolve()
    results = collect_results(out)
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    label_png = out / "partition" / "label_distribution.png"
    if label_png.is_file():
        shutil.copyfile(label_png, report_dir / "label_distribution.png")
        plots.append("label_distribution.png")
    _plot_learning_curves(results, report_dir / "learning_curves.png")
    plots.append("learning_curves.png")
    if _plot_per_site(results, report_dir / "per_site.png"):
        plots.append("per_site.png")
    if _plot_student_vs_teacher(results, report_dir / "student_vs_teacher.png"):
        plots.append("student_vs_teacher.png")
    plots += _gradcam_overlays(out, report_dir)
    write_json(report_dir / "results.json", results)
    report = report_dir / "report.md"
    report.write_text(render_markdown(results, plots), encoding="utf-8")
    return report
