"""The site's edge export and the ``predict`` / ``explain`` commands that use it."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from client.cli import app
from client.export import EdgeExportOptions, export_site_student
from client.site import SiteConfig
from common.checkpoint import sha256_file
from common.config import ModelConfig
from common.data.cache import resize_square
from common.data.dataset import normalise
from common.data.readers import decode_image_file
from common.data.synthetic import render_synthetic_cxr
from common.export import load_torch_model
from common.local import DataRequest, DistillOutcome, build_loaded_model, load_site_data
from common.model_card import CARD_FIELDS
from common.models import build_model
from common.run_settings import run_settings_from_config

SIZE = 32
runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float], DistillOutcome]:
    root = tmp_path_factory.mktemp("site")
    settings = run_settings_from_config(
        {
            "task": "normal-pneumonia-covid",
            "image-size": SIZE,
            "teacher-name": "tiny-cnn",
            "kd-width-mult": 0.35,
        }
    )
    request = DataRequest(
        "synthetic", None, settings.task, SIZE, root / "cache", 0.2, 0.2, 0, options=(("n-images", 40),)
    )
    data = load_site_data(request)
    site = SiteConfig("site_a", None, "synthetic", root / "out", root / "cache", None)
    torch.manual_seed(0)
    teacher = build_loaded_model(settings.teacher, settings.task, None).eval()
    student = build_model(ModelConfig(name="mobilenetv2", width_mult=0.35), 3).eval()
    with torch.no_grad():  # a student with distinct outputs per class
        student.classifier[-1].bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
    metrics = {
        "teacher_accuracy": 0.8,
        "student_accuracy": 0.7,
        "teacher_auroc_macro": 0.9,
        "student_auroc_macro": 0.85,
    }
    outcome = DistillOutcome(student, teacher, dict(metrics))
    scalars = export_site_student(
        site,
        settings,
        data,
        outcome,
        metrics,
        teacher_epsilon=2.5,
        options=EdgeExportOptions(latency_repeats=3, save_teacher=True),
    )
    card = json.loads((root / "out" / "student" / "model_card.json").read_text())
    assert card["data_counts"]["test"] == len(data.split.test)
    for part in ("train", "val", "test"):
        expected = data.catalog.targets[data.split.__getattribute__(part)].sum(axis=0)
        assert list(card["class_counts"][part].values()) == [int(n) for n in expected]
    return root / "out" / "student", scalars, outcome


def _images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, label in enumerate(("normal", "pneumonia", "covid-19")):
        Image.fromarray(render_synthetic_cxr(label, i, 50)).save(folder / f"{label}.png")
    return folder


def test_export_writes_every_file_and_a_complete_card(exported: tuple) -> None:
    folder, scalars, _ = exported
    for name in (
        "student.onnx",
        "student.preprocessing.json",
        "student.torchscript.pt",
        "student.pt",
        "student.pt.json",
        "teacher.pt",
        "model_card.md",
        "model_card.json",
    ):
        assert (folder / name).is_file(), name
    assert not (folder / "compression.md").exists()  # off by default
    card = json.loads((folder / "model_card.json").read_text())
    assert list(card) == list(CARD_FIELDS)
    assert card["site"] == "site_a"
    assert card["classes"] == ["normal", "pneumonia", "covid-19"]
    assert card["teacher_dp_epsilon"] == 2.5
    assert card["synthetic_data"] is True
    assert card["metrics"]["teacher"]["accuracy"] == 0.8
    assert card["metrics"]["student"]["auroc_macro"] == 0.85
    assert card["size_mb"] == pytest.approx((folder / "student.onnx").stat().st_size / 1e6)
    assert card["parameters"] > 0
    assert card["flops"] > 0
    assert "multiply-add" in card["flops_convention"]
    assert card["latency"]["threads"] == 2
    assert card["latency"]["median_ms"] > 0
    assert card["onnx_max_abs_diff"] < 1e-4
    assert card["distillation"]["temperature"] == 4.0
    assert card["distillation"]["alpha"] == 0.7
    for name, digest in card["files"].items():
        assert sha256_file(folder / name) == digest
    assert "not a medical device" in card["intended_use"]
    assert "synthetic" in card["intended_use"]
    markdown = (folder / "model_card.md").read_text()
    assert "epsilon = 2.500" in markdown
    assert "| test |" in markdown
    assert "student.onnx" in markdown
    assert set(scalars) >= {"onnx_max_abs_diff", "student_onnx_ms", "student_size_mb"}
    assert all(isinstance(v, float) for v in scalars.values())


def test_saved_weights_rebuild_the_student(exported: tuple) -> None:
    folder, _, outcome = exported
    loaded = load_torch_model(folder)
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), outcome.student(x))
    assert loaded.image_size == SIZE
    assert loaded.config.width_mult == 0.35


def test_predict_csv_matches_pytorch_on_the_same_files(exported: tuple, tmp_path: Path) -> None:
    folder, _, outcome = exported
    images = _images(tmp_path / "imgs")
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(folder / "student.onnx"), str(images), "--csv", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["image"]).name for r in rows] == ["covid-19.png", "normal.png", "pneumonia.png"]
    for row in rows:
        grey = resize_square(decode_image_file(Path(row["image"])), SIZE)
        with torch.no_grad():
            expected = torch.softmax(outcome.student(normalise(np.array(grey))[None, None]), dim=1)[0].numpy()
        got = np.array([float(row[c]) for c in ("normal", "pneumonia", "covid-19")])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert row["predicted"] == ("normal", "pneumonia", "covid-19")[int(expected.argmax())]


def test_predict_table_and_unreadable_image_warning(exported: tuple, tmp_path: Path) -> None:
    folder, *_ = exported
    images = _images(tmp_path / "imgs")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    result = runner.invoke(app, ["predict", str(folder / "student.onnx"), str(images)])
    assert result.exit_code == 0, result.output
    assert "normal.png" in result.stdout
    assert "pneumonia" in result.stdout
    assert "skipped" in result.stderr
    assert "broken.jpg" in result.stderr


def test_predict_user_errors_exit_2_without_traceback(exported: tuple, tmp_path: Path) -> None:
    folder, *_ = exported
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(folder / "student.onnx", lonely / "model.onnx")
    images = _images(tmp_path / "imgs")
    missing = runner.invoke(app, ["predict", str(lonely / "model.onnx"), str(images)])
    assert missing.exit_code == 2
    assert "model.preprocessing.json" in missing.stderr
    assert "Traceback" not in missing.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not an image")
    unreadable = runner.invoke(app, ["predict", str(folder / "student.onnx"), str(bad)])
    assert unreadable.exit_code == 2
    assert "none of the 1 image(s) could be read" in unreadable.stderr
    assert "Traceback" not in unreadable.output
    nothing = runner.invoke(app, ["predict", str(folder / "student.onnx"), str(tmp_path / "nowhere")])
    assert nothing.exit_code == 2
    assert "neither an image file nor a folder" in nothing.stderr


def test_explain_writes_overlays_for_student_and_teacher(exported: tuple, tmp_path: Path) -> None:
    folder, *_ = exported
    images = _images(tmp_path / "imgs")
    out = tmp_path / "cams"
    result = runner.invoke(
        app, ["explain", "--model", str(folder), "--image", str(images), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "covid-19.gradcam.png",
        "normal.gradcam.png",
        "pneumonia.gradcam.png",
    ]
    teacher = runner.invoke(
        app,
        [
            "explain",
            "--model",
            str(folder / "teacher.pt"),
            "--image",
            str(images / "normal.png"),
            "--out",
            str(tmp_path / "t"),
            "--class",
            "covid-19",
        ],
    )
    assert teacher.exit_code == 0, teacher.output
    assert "covid-19" in teacher.stdout
    assert (tmp_path / "t" / "normal.gradcam.png").is_file()


def test_explain_bad_layer_exits_2(exported: tuple, tmp_path: Path) -> None:
    folder, *_ = exported
    images = _images(tmp_path / "imgs")
    args = ["explain", "--model", str(folder), "--image", str(images), "--out", str(tmp_path / "c")]
    result = runner.invoke(app, [*args, "--layer", "features.99"])
    assert result.exit_code == 2
    assert "layer 'features.99' does not exist" in result.stderr
    assert "Traceback" not in result.output
    nofolder = runner.invoke(app, ["explain", "--model", str(tmp_path), "--image", str(images), "--out", "x"])
    assert nofolder.exit_code == 2
    assert "student.pt" in nofolder.stderr
