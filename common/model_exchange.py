"""A model the coordinator sends to every site for an evaluation-only run, and its checks.

Two kinds of model may travel, neither carrying code:

- ``state-dict``: a teacher's or student's weights (a coordinator checkpoint such as
  ``RUN_DIR/checkpoints/best.pt`` or ``student.pt``, whose architecture ``RUN_DIR/run_config.json``
  gives, or a ``teacher.pt``/``student.pt`` of a site export with its ``.json``), loaded with
  ``torch.load(weights_only=True)`` and sent as plain tensors; the site rebuilds the architecture
  from the run's settings.
- ``onnx``: an exported student (``student.onnx`` with its ``.preprocessing.json``), sent as its
  bytes. :func:`check_onnx_bytes` refuses external data (the file would name a path to read at
  the site), functions and any operator outside the standard ONNX domain, before ONNX Runtime
  sees it.

TorchScript (a zip holding ``code/``) and pickled modules are refused: they carry code from the
coordinator. :func:`read_evaluation_model` is the coordinator's one reader (the CLI, before
anything starts, and the ServerApp); :func:`check_onnx_bytes` is used again at every site. No
Flower imports.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.config import ModelConfig
from common.errors import ModelError
from common.run_layout import checkpoint_run_config
from common.tasks import Task, get_task

STATE_DICT = "state-dict"
ONNX = "onnx"
MODEL_FORMATS = (STATE_DICT, ONNX)
ROLES = ("teacher", "student")
STANDARD_DOMAINS = ("", "ai.onnx")
"""Operator domains an evaluated ONNX model may use: the standard operator set only."""
MAX_ONNX_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class EvaluationModel:
    """What an evaluation-only run sends: the model, and the run settings the sites need for it."""

    path: Path
    model_format: str
    role: str
    task: Task
    image_size: int
    equalize: bool
    state: Mapping[str, Any] = field(default_factory=dict, repr=False)
    onnx_bytes: bytes = field(default=b"", repr=False)
    settings: Mapping[str, Any] = field(default_factory=dict)
    """Run settings (pyproject keys) that describe the model: task, image size, architecture."""

    def describe(self) -> str:
        return (
            f"{self.path.name}: {self.role} ({self.model_format}), task {self.task.name}, "
            f"{self.image_size} px"
        )


# ----------------------------------------------------------------------------- ONNX wire format


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ModelError("the ONNX model is not a valid protobuf message (truncated varint)")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """(field number, wire type, value) of one protobuf message, without a schema."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, wire, value
        elif wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise ModelError("the ONNX model is not a valid protobuf message (truncated field)")
            yield number, wire, data[pos : pos + size]
            pos += size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            yield number, wire, int.from_bytes(data[pos : pos + width], "little")
            pos += width
        else:
            raise ModelError(f"the ONNX model is not a valid protobuf message (wire type {wire})")


def _strings(data: bytes, number: int) -> list[str]:
    return [v.decode("utf-8", "replace") for n, w, v in _fields(data) if n == number and isinstance(v, bytes)]


def _messages(data: bytes, number: int) -> list[bytes]:
    return [v for n, w, v in _fields(data) if n == number and w == 2 and isinstance(v, bytes)]


# ModelProto: 7 graph, 8 opset_import, 25 functions; OperatorSetIdProto: 1 domain
# GraphProto: 1 node, 5 initializer, 15 sparse_initializer; NodeProto: 4 op_type, 5 attribute, 7 domain
# AttributeProto: 5 t, 6 g, 10 tensors, 11 graphs, 22 sparse_tensor, 23 sparse_tensors
# TensorProto: 13 external_data, 14 data_location (1 = EXTERNAL); SparseTensorProto: 1 values, 2 indices


def _check_tensor(tensor: bytes, where: str) -> None:
    for number, _wire, value in _fields(tensor):
        if number == 13 or (number == 14 and value == 1):
            raise ModelError(
                f"the ONNX model keeps tensor data outside the file ({where}): export it with the "
                "weights inside (no external data); a site never opens files the model names"
            )


def _check_graph(graph: bytes, where: str) -> None:
    for tensor in _messages(graph, 5):
        _check_tensor(tensor, where)
    for sparse in _messages(graph, 15):
        for part in (*_messages(sparse, 1), *_messages(sparse, 2)):
            _check_tensor(part, where)
    for node in _messages(graph, 1):
        domains = _strings(node, 7)
        op = (_strings(node, 4) or ["?"])[0]
        if domains and domains[0] not in STANDARD_DOMAINS:
            raise ModelError(
                f"the ONNX model uses operator {domains[0]}:{op} ({where}), outside the standard ONNX "
                "operator set; only standard operators are run at a site"
            )
        for attribute in _messages(node, 5):
            for tensor in (*_messages(attribute, 5), *_messages(attribute, 10)):
                _check_tensor(tensor, f"{where}, {op}")
            for subgraph in (*_messages(attribute, 6), *_messages(attribute, 11)):
                _check_graph(subgraph, f"{where}, {op}")


def check_onnx_bytes(data: bytes) -> None:
    """ModelError unless ``data`` is an ONNX model with its weights inside and standard operators only."""
    if not data:
        raise ModelError("the ONNX model is empty")
    if len(data) > MAX_ONNX_BYTES:
        raise ModelError(f"the ONNX model is larger than {MAX_ONNX_BYTES // 2**20} MiB: refused")
    graphs = _messages(data, 7)
    if len(graphs) != 1:
        raise ModelError("the file is not an ONNX model (no graph): give an exported student .onnx")
    for opset in _messages(data, 8):
        domain = (_strings(opset, 1) or [""])[0]
        if domain not in STANDARD_DOMAINS:
            raise ModelError(
                f"the ONNX model imports the operator set '{domain}', outside the standard ONNX operator "
                "set; only standard operators are run at a site"
            )
    if _messages(data, 25):
        raise ModelError(
            "the ONNX model defines its own functions; only standard operators are run at a site"
        )
    _check_graph(graphs[0], "main graph")


def onnx_array(data: bytes) -> np.ndarray:
    """The model's bytes as a uint8 array (how they travel in an ArrayRecord)."""
    return np.frombuffer(data, dtype=np.uint8).copy()


# ----------------------------------------------------------------------------- the coordinator's reader


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (a zip holding ``code/`` or ``constants.pkl``): it carries code."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("constants.pkl") for name in archive.namelist())


def read_evaluation_model(path: Path) -> EvaluationModel:
    """The model at ``path``, checked; ModelError naming the file and what to give instead."""
    path = Path(path)
    if path.is_dir() and (path / "student.onnx").is_file():
        path = path / "student.onnx"
    if not path.is_file():
        raise ModelError(
            f"model '{path}' not found; give an exported student .onnx (with its .preprocessing.json) "
            "or a weights file (RUN_DIR/checkpoints/best.pt, student.pt)"
        )
    if path.suffix.lower() == ".onnx":
        return _onnx_model(path)
    if is_torchscript(path):
        raise ModelError(
            f"'{path}' is a TorchScript file: it carries code, which no site runs; give the weights "
            "(a state_dict .pt) or an exported .onnx"
        )
    return _state_dict_model(path)


def _onnx_model(path: Path) -> EvaluationModel:
    from common.export import read_preprocessing

    data = path.read_bytes()
    try:
        check_onnx_bytes(data)
    except ModelError as exc:
        raise ModelError(f"'{path}': {exc}") from None
    prep = read_preprocessing(path)
    task = get_task(prep.task)
    if tuple(prep.classes) != tuple(task.classes):
        raise ModelError(f"preprocessing file of '{path}' lists classes other than task '{task.name}''s")
    settings = {
        "task": task.name,
        "image-size": prep.image_size,
        "preprocess-equalize": prep.equalize,
        "teacher-in-channels": prep.in_channels,
    }
    return EvaluationModel(
        path, ONNX, "student", task, prep.image_size, prep.equalize, onnx_bytes=data, settings=settings
    )


def _state_dict_model(path: Path) -> EvaluationModel:
    from common.checkpoint import load_metadata, load_model_state
    from common.export import MODEL_METADATA_FORMAT, load_torch_model

    try:
        meta = load_metadata(path)
    except json.JSONDecodeError as exc:
        raise ModelError(f"metadata '{path.name}.json' beside '{path}' is not valid JSON: {exc}") from None
    if meta is not None and meta.get("format") == MODEL_METADATA_FORMAT:
        loaded = load_torch_model(path)
        role = "student" if "student" in str(meta.get("role", "student")) else "teacher"
        state = {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}
        return _with_architecture(
            path, role, loaded.config, loaded.task, loaded.image_size, loaded.equalize, state
        )
    run_config_path = checkpoint_run_config(path)
    if run_config_path is None:
        raise ModelError(
            f"'{path}' has no model metadata ('{path.name}.json') and is not in a run folder's checkpoints/ "
            "beside run_config.json, so its architecture is unknown; give a coordinator checkpoint "
            "or a site export"
        )
    return _checkpoint_model(path, run_config_path, meta, load_model_state(path))


def _checkpoint_model(
    path: Path, run_config_path: Path, meta: Mapping[str, Any] | None, state: Mapping[str, Any]
) -> EvaluationModel:
    from common.local import student_config
    from common.models import build_model
    from common.run_settings import run_settings_from_config

    try:
        settings = run_settings_from_config(json.loads(run_config_path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, ValueError) as exc:
        raise ModelError(f"cannot read the run settings '{run_config_path}' of '{path}': {exc}") from None
    role = "student" if (meta or {}).get("role") == "global student" else "teacher"
    config = (
        student_config(settings.distill, settings.teacher, settings.teacher.norm)
        if role == "student"
        else settings.teacher
    )
    try:
        build_model(config, settings.task.num_classes).load_state_dict(dict(state))
    except RuntimeError as exc:
        raise ModelError(f"'{path}' does not fit the {role} of '{run_config_path}': {exc}") from None
    return _with_architecture(
        path, role, config, settings.task, settings.run.image_size, settings.run.preprocess_equalize, state
    )


def _with_architecture(
    path: Path,
    role: str,
    config: ModelConfig,
    task: Task,
    image_size: int,
    equalize: bool,
    state: Mapping[str, Any],
) -> EvaluationModel:
    """The model with the run settings that rebuild its architecture at a site."""
    settings: dict[str, Any] = {
        "task": task.name,
        "image-size": image_size,
        "preprocess-equalize": equalize,
        "teacher-norm": config.norm,
        "teacher-in-channels": config.in_channels,
    }
    if role == "student":
        settings.update({"kd-student": config.name, "kd-width-mult": config.width_mult})
    else:
        settings.update(
            {
                "teacher-name": config.name,
                "teacher-width-mult": config.width_mult,
                "teacher-dropout": config.dropout,
            }
        )
    return EvaluationModel(path, STATE_DICT, role, task, image_size, equalize, state=state, settings=settings)


def check_model_task(model: EvaluationModel, task: str | None) -> None:
    """ModelError when the model was made for another task than the one asked for."""
    if task is not None and get_task(task).name != model.task.name:
        raise ModelError(
            f"model '{model.path}' was trained for task '{model.task.name}' "
            f"({', '.join(model.task.classes)}), not '{task}'; evaluate a model of the federation's task"
        )
