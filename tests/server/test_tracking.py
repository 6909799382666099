"""Local experiment tracking: TensorBoard event files written offline in the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from common.errors import ConfigError
from common.jsonio import write_json
from common.tracking import (
    TRACK_DIR,
    RunTracker,
    TrackingSettings,
    check_tracker,
    local_log_dir,
    row_scalars,
    safe_name,
)
from server.run_folder import RunFolder
from server.tracking import finish_tracking, log_experiment_report, start_tracking

ROWS = [
    {"round": 1, "phase": "train", "site": "site_a", "status": "ok", "train_loss": 1.2, "dp_epsilon": 0.8},
    {"round": 1, "phase": "train", "site": "site_b", "status": "ok", "train_loss": 1.4, "dp_epsilon": 0.7},
    {"round": 1, "phase": "aggregate", "train_loss": 1.3, "val_auroc_macro": 0.61, "sites_trained": 2},
    {"round": 2, "phase": "aggregate", "train_loss": 0.9, "val_auroc_macro": 0.72, "sites_trained": 2},
    {"round": 2, "phase": "distill", "site": "site_a", "status": "ok", "student_auroc_macro": 0.7},
]


def _events(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def _png(path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([1, 2], [3, 4])
    fig.savefig(path)
    plt.close(fig)
    return path


def test_rows_become_tagged_scalars_and_untrusted_names_are_cleaned() -> None:
    step, scalars = row_scalars(ROWS[0])
    assert step == 1
    assert scalars == {"site/site_a/train_loss": 1.2, "site/site_a/dp_epsilon": 0.8, "dp_epsilon/site_a": 0.8}
    _, scalars = row_scalars(
        {"round": 3, "phase": "aggregate", "note": "text", "bad": float("nan"), "ok": True}
    )
    assert scalars == {}
    _, scalars = row_scalars({"round": 1, "phase": "train", "site": "../../etc x", "loss/../x": 1.0})
    assert scalars == {"site/etc_x/loss_.._x": 1.0}
    assert safe_name("") == "unnamed"
    assert len(safe_name("a" * 500)) == 64


def test_tracker_choice_is_checked() -> None:
    assert check_tracker("") == ""
    assert check_tracker("tensorboard") == "tensorboard"
    with pytest.raises(ConfigError, match="never leave the machine"):
        check_tracker("mlflow")
    with pytest.raises(ConfigError, match="track"):
        TrackingSettings("wandb")


@pytest.mark.parametrize("uri", ["s3://bucket/runs", "gs://bucket/x", "http://10.0.0.1/x", "//host/share"])
def test_remote_locations_are_refused(uri: str) -> None:
    with pytest.raises(ConfigError, match="local folder"):
        local_log_dir(uri)
    with pytest.raises(ConfigError):
        RunTracker(uri)


def test_run_folder_rows_settings_and_figures_reach_the_event_files(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    run_config = {"track": "tensorboard", "num-rounds": 2, "strategy": "fedavg"}
    tracker = start_tracking(folder, run_config)
    assert tracker is not None
    folder.append_metrics(ROWS[:3])
    folder.append_metrics(ROWS[3:])
    _png(folder.root / "learning_curves.png")
    (folder.root / "summary.md").write_text("# Run summary\n")
    card = folder.root / "sites" / "site_a" / "student" / "model_card.md"
    card.parent.mkdir(parents=True)
    card.write_text("# Model card\n")
    finish_tracking(tracker, folder)

    log_dir = folder.root / TRACK_DIR
    events = _events(log_dir)
    tags = events.Tags()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("global/val_auroc_macro")] == [
        (1, 0.61),
        (2, 0.72),
    ]
    assert [e.value for e in events.Scalars("dp_epsilon/site_b")] == [pytest.approx(0.7)]
    assert events.Scalars("distillation/site_a/student_auroc_macro")[0].step == 2
    assert tags["images"] == ["run/learning_curves"]
    texts = {tag for tag in tags["tensors"]}
    assert {
        "run/settings/text_summary",
        "run/summary/text_summary",
        "model_card/site_a/student/text_summary",
    } <= texts
    assert all(p.is_relative_to(log_dir) for p in log_dir.rglob("*"))


def test_tracking_off_writes_nothing(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    assert start_tracking(folder, {"track": ""}) is None
    folder.append_metrics(ROWS)
    finish_tracking(None, folder)
    assert not (folder.root / TRACK_DIR).exists()


def test_a_resume_may_switch_tracking_on(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    folder.prepare({"num-rounds": 2, "track": ""})
    folder.prepare({"num-rounds": 2, "track": "tensorboard"})

    saved = json.loads((folder.root / "run_config.json").read_text())
    assert saved["track"] == "tensorboard"  # the resumed run tracks from now on
    with pytest.raises(ConfigError, match="'seed'"):  # while another change is still refused
        folder.prepare({"num-rounds": 2, "track": "tensorboard", "seed": 3})


def test_simulation_report_logs_aggregate_figures_but_never_gradcam_overlays(tmp_path: Path) -> None:
    report = tmp_path / "report"
    (report / "gradcam").mkdir(parents=True)
    for name in ("learning_curves.png", "per_site.png"):
        _png(report / name)
    _png(report / "gradcam" / "patient_image.png")
    (report / "report.md").write_text("# Report\n")
    write_json(tmp_path / "baselines.json", {"pooled": {"pooled_test": {"auroc_macro": 0.8}}, "name": "x"})
    log_experiment_report(tmp_path / "run", tmp_path)
    events = _events(tmp_path / "run" / TRACK_DIR)
    assert sorted(events.Tags()["images"]) == ["simulation/learning_curves", "simulation/per_site"]
    assert events.Scalars("baselines/pooled.pooled_test.auroc_macro")[0].value == pytest.approx(0.8)


def test_server_start_refuses_an_unknown_tracker_before_starting_anything(tmp_path: Path) -> None:
    from server.cli import app

    result = CliRunner().invoke(
        app, ["start", "--run-dir", str(tmp_path / "run"), "--insecure", "--track", "mlflow"]
    )
    assert result.exit_code == 2
    assert "track" in result.output
    assert not (tmp_path / "run" / "superlink.db").exists()
