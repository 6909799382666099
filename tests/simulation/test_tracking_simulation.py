"""A tiny simulated federation with ``--track tensorboard``: the ServerApp's tracker, offline."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

import simulation.cli as cli
from common.tracking import TRACK_DIR


def test_simulation_run_logs_rounds_distillation_and_report_to_tensorboard(tmp_path: Path) -> None:
    out = tmp_path / "experiment"
    settings = [
        "batch-size=16",
        "lr=0.05",
        "kd-epochs=1",
        "kd-width-mult=0.35",
        "kd-federated-student-rounds=1",
        "min-train-sites=2",
        "min-evaluate-sites=2",
        "min-available-sites=2",
    ]
    result = CliRunner().invoke(
        cli.app,
        [
            "run",
            "--out",
            str(out),
            "--source",
            "synthetic",
            "--source-option",
            "n-images=60",
            "--source-option",
            "image-size=32",
            "--sites",
            "2",
            "--teacher",
            "tiny-cnn",
            "--image-size",
            "32",
            "--rounds",
            "2",
            "--track",
            "tensorboard",
            *[arg for item in settings for arg in ("--set", item)],
        ],
    )
    assert result.exit_code == 0, result.output
    log_dir = out / "run" / TRACK_DIR
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert [e.step for e in events.Scalars("global/val_auroc_macro")] == [1, 2]
    assert {t.split("/")[1] for t in tags["scalars"] if t.startswith("site/")} == {"site_00", "site_01"}
    assert any(t.startswith("distillation/site_00/") for t in tags["scalars"])
    assert "run/learning_curves" in tags["images"]
    assert "simulation/learning_curves" in tags["images"]
    assert not any("gradcam" in t for t in tags["images"])
    texts = set(tags["tensors"])
    assert {
        "run/settings/text_summary",
        "run/summary/text_summary",
        "simulation/report/text_summary",
    } <= texts
    assert any(t.startswith("model_card/site_00/") for t in texts)
