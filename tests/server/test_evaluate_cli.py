"""``cxr-fl-server evaluate``: bad input is a one-line error, exit 2, before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from common.config import ModelConfig
from common.export import Preprocessing, export_onnx, write_preprocessing
from common.models import build_model
from common.tasks import get_task
from server.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("student")
    task = get_task("normal-pneumonia-covid")
    onnx = export_onnx(
        build_model(ModelConfig(name="mobilenetv2", width_mult=0.35), 3), out / "student.onnx", 32
    )
    write_preprocessing(Preprocessing.for_task(task, 32), onnx)
    return onnx


def _evaluate(model: Path, run_dir: Path, *extra: str) -> tuple[int, str]:
    result = runner.invoke(app, ["evaluate", str(model), "--run-dir", str(run_dir), *extra])
    return result.exit_code, result.output


def test_torchscript_is_refused_before_anything_starts(tmp_path: Path) -> None:
    scripted = tmp_path / "teacher.pt"
    torch.jit.script(build_model(ModelConfig(name="tiny-cnn"), 3)).save(str(scripted))

    code, output = _evaluate(scripted, tmp_path / "run", "--insecure")

    assert code == 2
    assert "TorchScript file: it carries code" in output
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_a_missing_model_and_a_model_of_another_task_are_refused(tmp_path: Path, student: Path) -> None:
    code, output = _evaluate(tmp_path / "nothing.onnx", tmp_path / "run", "--insecure")
    assert code == 2
    assert "not found" in output

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run_config.json").write_text(json.dumps({"task": "nih14"}))
    code, output = _evaluate(student, run_dir, "--insecure")
    assert code == 2
    assert "trained for task 'normal-pneumonia-covid'" in output
    assert "not 'nih14'" in output
    assert not (run_dir / "deploy.json").exists()


def test_without_serve_or_certificates_it_says_how_to_start(tmp_path: Path, student: Path) -> None:
    code, output = _evaluate(student, tmp_path / "run", "--site", "site-a")

    assert code == 2
    assert "give --certs DIR" in output
