"""What a coordinator may send for an evaluation-only run: weights or standard-operator ONNX, never code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.checkpoint import save_model
from common.config import ModelConfig
from common.errors import ModelError
from common.export import Preprocessing, export_onnx, model_metadata, write_preprocessing
from common.model_exchange import (
    ONNX,
    STATE_DICT,
    check_model_task,
    check_onnx_bytes,
    read_evaluation_model,
)
from common.models import build_model
from common.tasks import get_task

TASK = get_task("normal-pneumonia-covid")
SIZE = 32


def _key(number: int, wire: int) -> bytes:
    return _varint((number << 3) | wire)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _message(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint(len(payload)) + payload


def _model(graph: bytes, *extra: bytes) -> bytes:
    """A ModelProto: ir_version 8, the standard opset 17, ``graph``, and ``extra`` fields."""
    opset = _message(1, b"") + _key(2, 0) + _varint(17)
    return _key(1, 0) + _varint(8) + _message(8, opset) + _message(7, graph) + b"".join(extra)


def _node(op: str, domain: str = "") -> bytes:
    return _message(4, op.encode()) + (_message(7, domain.encode()) if domain else b"")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny student exported as the site export does (ONNX + preprocessing, .pt + metadata)."""
    out = tmp_path_factory.mktemp("exchange")
    config = ModelConfig(name="mobilenetv2", width_mult=0.35)
    student = build_model(config, TASK.num_classes)
    onnx = export_onnx(student, out / "student.onnx", SIZE)
    write_preprocessing(Preprocessing.for_task(TASK, SIZE), onnx)
    save_model(student, out / "student.pt", metadata=model_metadata(config, TASK, SIZE, "student"))
    return out


def test_an_exported_student_passes_the_onnx_check(exported: Path) -> None:
    model = read_evaluation_model(exported / "student.onnx")
    assert model.model_format == ONNX
    assert model.task == TASK
    assert model.settings["image-size"] == SIZE
    assert model.onnx_bytes == (exported / "student.onnx").read_bytes()


def test_onnx_with_external_data_is_refused() -> None:
    tensor = _key(14, 0) + _varint(1)  # data_location = EXTERNAL
    graph = _message(1, _node("Relu")) + _message(5, tensor)
    with pytest.raises(ModelError, match="outside the file"):
        check_onnx_bytes(_model(graph))


def test_onnx_with_external_data_inside_a_subgraph_is_refused() -> None:
    inner = _message(5, _message(13, b"location"))  # an initializer naming an external file
    attribute = _message(6, inner)
    graph = _message(1, _node("If") + _message(5, attribute))
    with pytest.raises(ModelError, match="outside the file"):
        check_onnx_bytes(_model(graph))


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (_model(_message(1, _node("Inverse", "com.microsoft"))), "com.microsoft:Inverse"),
        (_model(_message(1, _node("Relu")), _message(8, _message(1, b"custom.ops"))), "custom.ops"),
        (_model(_message(1, _node("Relu")), _message(25, b"")), "own functions"),
        (b"\x08\x08", "not an ONNX model"),
        (b"\xff\xff\xff", "not a valid protobuf"),
    ],
)
def test_onnx_outside_the_standard_operators_or_malformed_is_refused(model: bytes, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        check_onnx_bytes(model)


def test_a_plain_standard_graph_passes() -> None:
    check_onnx_bytes(_model(_message(1, _node("Relu")) + _message(5, _key(14, 0) + _varint(0))))


def test_site_export_weights_travel_as_a_state_dict_with_their_architecture(exported: Path) -> None:
    model = read_evaluation_model(exported / "student.pt")
    assert model.model_format == STATE_DICT
    assert model.role == "student"
    assert model.settings["kd-student"] == "mobilenetv2"
    assert model.settings["kd-width-mult"] == 0.35
    assert set(model.state) == set(build_model(ModelConfig("mobilenetv2", width_mult=0.35), 3).state_dict())


def test_a_coordinator_checkpoint_is_read_with_its_run_settings(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    json.dump(
        {"task": TASK.name, "teacher-name": "tiny-cnn", "image-size": SIZE},
        (run / "run_config.json").open("w"),
    )
    teacher = build_model(ModelConfig(name="tiny-cnn"), TASK.num_classes)
    save_model(teacher, run / "checkpoints" / "best.pt")
    model = read_evaluation_model(run / "checkpoints" / "best.pt")
    assert (model.role, model.settings["teacher-name"], model.image_size) == ("teacher", "tiny-cnn", SIZE)
    save_model(build_model(ModelConfig(name="resnet18"), TASK.num_classes), run / "checkpoints" / "last.pt")
    with pytest.raises(ModelError, match="does not fit the teacher"):
        read_evaluation_model(run / "checkpoints" / "last.pt")


def test_torchscript_a_missing_file_and_another_task_are_refused(exported: Path, tmp_path: Path) -> None:
    scripted = tmp_path / "model.pt"
    torch.jit.script(build_model(ModelConfig(name="tiny-cnn"), 3)).save(str(scripted))
    with pytest.raises(ModelError, match="TorchScript file: it carries code"):
        read_evaluation_model(scripted)
    with pytest.raises(ModelError, match="not found"):
        read_evaluation_model(tmp_path / "missing.onnx")
    torch.save({"w": torch.zeros(1)}, tmp_path / "bare.pt")
    with pytest.raises(ModelError, match="no model metadata"):
        read_evaluation_model(tmp_path / "bare.pt")
    with pytest.raises(ModelError, match="trained for task 'normal-pneumonia-covid'"):
        check_model_task(read_evaluation_model(exported / "student.onnx"), "nih14")
