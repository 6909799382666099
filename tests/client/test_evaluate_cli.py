"""``cxr-fl-client evaluate``: a student (ONNX or .pt) or a coordinator checkpoint on labelled data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner, Result

from client.cli import app
from common.checkpoint import save_model
from common.config import ModelConfig
from common.data.synthetic import render_synthetic_cxr
from common.evaluation import REPORT_FILES
from common.export import Preprocessing, export_onnx, model_metadata, write_preprocessing
from common.jsonio import write_json
from common.models import build_model
from common.tasks import get_task

SIZE = 32
TASK = get_task("normal-pneumonia-covid")
FOLDERS = {"normal": "NORMAL", "pneumonia": "PNEUMONIA", "covid-19": "COVID"}
runner = CliRunner()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported tiny student (ONNX + preprocessing, .pt + metadata) and a labelled image folder."""
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    config = ModelConfig(name="mobilenetv2", width_mult=0.35)
    student = build_model(config, TASK.num_classes)
    images = {label: [render_synthetic_cxr(label, i, 40) for i in range(8)] for label in FOLDERS}
    _spread_scores(student, [img for batch in images.values() for img in batch])
    out = root / "student"
    onnx = export_onnx(student, out / "student.onnx", SIZE)
    write_preprocessing(Preprocessing.for_task(TASK, SIZE), onnx)
    save_model(student, out / "student.pt", metadata=model_metadata(config, TASK, SIZE, "student"))
    for label, folder in FOLDERS.items():
        target = root / "data" / folder
        target.mkdir(parents=True)
        for i, image in enumerate(images[label]):
            Image.fromarray(image).save(target / f"{label}_{i}.png")
    return root


def _spread_scores(student: torch.nn.Module, images: list[np.ndarray]) -> None:
    """Give the untrained student BatchNorm statistics of these images, so its scores differ
    from image to image by far more than float rounding. With the initial running statistics
    every output is the same: AUROCs are then made of ties, and ONNX Runtime's and torch's
    last-bit differences reorder them (a bootstrap bound of 0.375 against 0.5 was seen)."""
    pre = Preprocessing.for_task(TASK, SIZE)
    resized = [np.asarray(Image.fromarray(img).resize((SIZE, SIZE)), dtype=np.float32) for img in images]
    batch = (torch.tensor(np.stack(resized)).unsqueeze(1) / 255 - pre.mean) / pre.std
    for module in student.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # the plain average over the pass below
    with torch.no_grad():
        student.train()(batch)
    student.eval()


def _evaluate(site: Path, model: Path, out: Path, *extra: str, data: Path | None = None) -> Result:
    return runner.invoke(
        app,
        [
            "evaluate",
            str(model),
            "--data",
            str(data or site / "data"),
            "--format",
            "image-folder",
            "--out",
            str(out),
            "--cache-dir",
            str(site / "cache"),
            "--bootstrap",
            "200",
            *extra,
        ],
    )


def test_onnx_student_gives_the_full_report(site: Path, tmp_path: Path) -> None:
    result = _evaluate(site, site / "student" / "student.onnx", tmp_path / "report", "--threshold", "0.4")
    assert result.exit_code == 0, result.output
    for name in REPORT_FILES:
        assert (tmp_path / "report" / name).stat().st_size > 0, name
    report = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    assert report["model"]["kind"] == "onnx"
    assert report["model"]["task"] == TASK.name
    assert report["data"]["images"] == 24
    results = report["results"]
    assert results["n_images"] == 24
    assert results["bootstrap"]["resamples"] == 200
    assert [c["name"] for c in results["classes"]] == list(TASK.classes)
    for c in results["classes"]:
        assert c["positives"] == 8
        assert c["negatives"] == 16
        assert c["auroc"]["low"] <= c["auroc"]["value"] <= c["auroc"]["high"]
        assert c["site_operating_point"]["threshold"] == 0.4
    assert results["site_operating_point"]["thresholds"] == {c: 0.4 for c in TASK.classes}
    assert 0.0 <= results["calibration"]["ece"] <= 1.0
    markdown = (tmp_path / "report" / "evaluation.md").read_text()
    assert "macro AUROC" in markdown
    assert "Site-chosen thresholds" in markdown
    assert "macro" in result.output


def test_torch_weights_score_like_the_onnx_export(site: Path, tmp_path: Path) -> None:
    onnx = _evaluate(site, site / "student" / "student.onnx", tmp_path / "onnx", "--seed", "3")
    torch_run = _evaluate(site, site / "student" / "student.pt", tmp_path / "pt", "--seed", "3")
    assert onnx.exit_code == 0, onnx.output
    assert torch_run.exit_code == 0, torch_run.output
    a = json.loads((tmp_path / "onnx" / "evaluation.json").read_text())["results"]
    b = json.loads((tmp_path / "pt" / "evaluation.json").read_text())["results"]
    assert b["auroc_macro"]["value"] == pytest.approx(a["auroc_macro"]["value"], abs=1e-6)
    assert b["auroc_macro"]["low"] == pytest.approx(a["auroc_macro"]["low"], abs=1e-6)


def test_same_seed_same_report_numbers(site: Path, tmp_path: Path) -> None:
    model = site / "student" / "student.onnx"
    assert _evaluate(site, model, tmp_path / "a", "--seed", "11").exit_code == 0
    assert _evaluate(site, model, tmp_path / "b", "--seed", "11").exit_code == 0
    a = json.loads((tmp_path / "a" / "evaluation.json").read_text())["results"]
    b = json.loads((tmp_path / "b" / "evaluation.json").read_text())["results"]
    assert a == b


def test_coordinator_checkpoint_is_rebuilt_from_its_run_settings(site: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    run_config = {"task": TASK.name, "image-size": SIZE, "teacher-name": "tiny-cnn"}
    write_json(run_dir / "run_config.json", run_config)
    teacher = build_model(ModelConfig(name="tiny-cnn"), TASK.num_classes)
    save_model(teacher, run_dir / "checkpoints" / "best.pt", metadata={"round": 2, "seed": 0})
    result = _evaluate(site, run_dir / "checkpoints" / "best.pt", tmp_path / "report")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    assert report["model"]["role"] == "global teacher"
    assert report["model"]["image_size"] == SIZE


def test_multilabel_teacher_on_a_manifest_reports_per_finding(site: Path, tmp_path: Path) -> None:
    task = get_task("nih14")
    config = ModelConfig(name="tiny-cnn")
    weights = tmp_path / "teacher.pt"
    save_model(
        build_model(config, task.num_classes), weights, metadata=model_metadata(config, task, SIZE, "teacher")
    )
    labels = ["Effusion", "No Finding", "Mass|Effusion", "Atelectasis"] * 3
    rows = ["path,label"]
    for i, label in enumerate(labels):
        Image.fromarray(render_synthetic_cxr("normal", 50 + i, 40)).save(tmp_path / f"img{i}.png")
        rows.append(f"img{i}.png,{label}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(weights),
            "--format",
            "manifest",
            "--data",
            str(tmp_path / "labels.csv"),
            "--out",
            str(tmp_path / "report"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--bootstrap",
            "50",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "evaluation.json").read_text())["results"]
    assert report["task_kind"] == "multilabel"
    by_name = {c["name"]: c for c in report["classes"]}
    assert len(by_name) == task.num_classes
    effusion = next(name for name in by_name if name.lower() == "effusion")
    assert by_name[effusion]["positives"] == 6
    assert by_name[effusion]["auroc"]["value"] is not None
    assert report["operating_point"] == "threshold 0.5"


def test_wrong_task_is_refused(site: Path, tmp_path: Path) -> None:
    result = _evaluate(site, site / "student" / "student.onnx", tmp_path / "r", "--task", "nih14")
    assert result.exit_code == 2
    assert "trained for task 'normal-pneumonia-covid'" in result.output
    assert not (tmp_path / "r").exists()


def test_data_labelled_for_another_task_is_refused(site: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "Effusion").mkdir(parents=True)
    Image.fromarray(render_synthetic_cxr("normal", 0, 40)).save(data / "Effusion" / "a.png")
    result = _evaluate(site, site / "student" / "student.onnx", tmp_path / "r", data=data)
    assert result.exit_code == 2
    assert "Effusion" in result.output
    assert "trained for task" in result.output
    assert "Traceback" not in result.output


def test_missing_preprocessing_or_metadata_is_a_clear_error(site: Path, tmp_path: Path) -> None:
    lone_onnx = tmp_path / "model.onnx"
    lone_onnx.write_bytes((site / "student" / "student.onnx").read_bytes())
    result = _evaluate(site, lone_onnx, tmp_path / "r")
    assert result.exit_code == 2
    assert "preprocessing" in result.output
    lone_pt = tmp_path / "student.pt"
    save_model(torch.nn.Linear(2, 2), lone_pt)
    result = _evaluate(site, lone_pt, tmp_path / "r")
    assert result.exit_code == 2
    assert "metadata" in result.output
    result = _evaluate(site, tmp_path / "nothing.onnx", tmp_path / "r")
    assert result.exit_code == 2
    assert "not found" in result.output


def test_unreadable_images_are_left_out_or_refused(site: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for label, folder in FOLDERS.items():
        (data / folder).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(render_synthetic_cxr(label, i, 40)).save(data / folder / f"{i}.png")
    (data / "NORMAL" / "broken.png").write_bytes(b"not a png")
    result = _evaluate(site, site / "student" / "student.onnx", tmp_path / "r", data=data)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "evaluation.json").read_text())["data"]["unreadable"] == 1
    assert "broken.png" in result.output
    strict = _evaluate(site, site / "student" / "student.onnx", tmp_path / "s", "--strict", data=data)
    assert strict.exit_code == 2
    assert "broken.png" in strict.output


def test_unlabelled_rows_and_bad_thresholds_are_refused(site: Path, tmp_path: Path) -> None:
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("path,label\na.png,\n")
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(site / "student" / "student.onnx"),
            "--format",
            "manifest",
            "--data",
            str(tmp_path / "labels.csv"),
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 2
    assert "line 2" in result.output
    bad = _evaluate(
        site, site / "student" / "student.onnx", tmp_path / "r", "--class-threshold", "pneumonia=2"
    )
    assert bad.exit_code == 2
    assert "--class-threshold" in bad.output
    unknown = _evaluate(
        site, site / "student" / "student.onnx", tmp_path / "r", "--class-threshold", "flu=0.3"
    )
    assert unknown.exit_code == 2
    assert "flu" in unknown.output


def test_format_is_any_registered_source_and_unknown_ones_are_listed(site: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(site / "student" / "student.onnx"),
            "--format",
            "no-such-format",
            "--data",
            str(site / "data"),
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 2
    assert "image-folder" in result.output
    assert "manifest" in result.output
    assert not (tmp_path / "r").exists()
