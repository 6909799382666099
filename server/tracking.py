"""The coordinator's side of experiment tracking: which files of a run folder go to the tracker.

:func:`start_tracking` opens the tracker of :mod:`common.tracking` in ``RUN_DIR/tensorboard``
when the run setting ``track`` asks for one, logs the settings and subscribes it to every row
appended to ``metrics.jsonl`` (so rounds show up while the run goes on);
:func:`finish_tracking` adds the learning-curve PNG, the summary and, in simulations, the sites'
model cards (aggregate figures only), then closes the event file. A simulation adds its report
with :func:`log_experiment_report` once the baselines and the report are written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.run_settings import from_mapping
from common.tracking import RunTracker, TrackingSettings, open_tracker, safe_name
from server.run_folder import RunFolder


def start_tracking(folder: RunFolder, run_config: Mapping[str, Any]) -> RunTracker | None:
    """The run's tracker (None when ``track`` is off), already following ``metrics.jsonl``."""
    tracker = open_tracker(from_mapping(TrackingSettings, run_config), folder.root)
    if tracker is not None:
        tracker.log_settings(run_config)
        folder.on_metrics(tracker.log_rows)
    return tracker


def finish_tracking(tracker: RunTracker | None, folder: RunFolder) -> None:
    """Log the run's figures and texts, then close the tracker (nothing when it is None)."""
    if tracker is None:
        return
    tracker.log_image_file("run/learning_curves", folder.learning_curves_path)
    tracker.log_text_file("run/summary", folder.summary_markdown_path)
    for card in sorted(folder.root.glob("sites/*/*/model_card.md")):
        site, subdir = card.parent.parent.name, card.parent.name
        tracker.log_text_file(f"model_card/{safe_name(site)}/{safe_name(subdir)}", card)
    tracker.close()


# Aggregate figures of a simulation report; its gradcam/ overlays show patients' images and are
# never logged.
REPORT_FIGURES = ("label_distribution.png", "learning_curves.png", "per_site.png", "student_vs_teacher.png")


def log_experiment_report(run_dir: Path, experiment_dir: Path) -> None:
    """Add a simulation's report (markdown, aggregate figures, baseline scores) to the run's tracker."""
    from common.tracking import TRACK_DIR, RunTracker

    tracker = RunTracker(Path(run_dir) / TRACK_DIR)
    report_dir = Path(experiment_dir) / "report"
    tracker.log_text_file("simulation/report", report_dir / "report.md")
    for name in REPORT_FIGURES:
        tracker.log_image_file(f"simulation/{Path(name).stem}", report_dir / name)
    baselines = Path(experiment_dir) / "baselines.json"
    if baselines.is_file():
        tracker.log_scalars("baselines", _flatten(json.loads(baselines.read_text(encoding="utf-8"))))
    tracker.close()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists indexed), numbers only are kept by the tracker."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): value}
