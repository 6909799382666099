"""An evaluation-only run at a site: the reply carries aggregates only, shaped like every reply."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.app import app
from client.disclosure import Disclosure, coarse
from common.config import ModelConfig
from common.export import export_onnx
from common.model_exchange import onnx_array
from common.models import build_model
from common.protocol import (
    DELIVERED_STUDENT_MESSAGE_TYPE,
    EVALUATE_MODEL_FORMAT_KEY,
    EVALUATE_MODEL_MESSAGE_TYPE,
    EVALUATE_MODEL_ROLE_KEY,
    ONNX_MODEL_RECORD,
    SITE_BAD_INPUT,
    SITE_DECLINED,
    WEIGHT_KEY,
)
from common.run_settings import run_settings_from_config
from server.app import initial_teacher
from tests.helpers import flower_run_config

pytestmark = pytest.mark.usefixtures("flower_task_identity")

SCALARS = {
    "eval_auroc_macro",
    "eval_auroc_macro_low",
    "eval_auroc_macro_high",
    "eval_op_balanced_accuracy",
    "eval_op_balanced_accuracy_low",
    "eval_op_balanced_accuracy_high",
    "eval_op_sensitivity_mean",
    "eval_op_specificity_mean",
    "eval_op_site_rule",
}


def _context(tmp_path: Path, **node: object) -> Context:
    run_config = flower_run_config(
        teacher_name="tiny-cnn", image_size=32, run_dir=str(tmp_path / "run"), evaluate_bootstrap=50
    )
    site = {"site-name": "st-eval", "data-format": "synthetic", "out-dir": str(tmp_path / "site"), **node}
    return Context(run_id=9, node_id=1, node_config=site, state=RecordDict(), run_config=run_config)


@pytest.fixture(scope="module")
def onnx_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    student = build_model(ModelConfig(name="mobilenetv2", width_mult=0.35), 3)
    return export_onnx(student, tmp_path_factory.mktemp("onnx") / "student.onnx", 32).read_bytes()


def _onnx_message(data: bytes) -> Message:
    config = ConfigRecord({EVALUATE_MODEL_FORMAT_KEY: "onnx", EVALUATE_MODEL_ROLE_KEY: "student"})
    record = ArrayRecord({"model": Array(onnx_array(data))})
    content = RecordDict({ONNX_MODEL_RECORD: record, "config": config})
    return Message(content, dst_node_id=1, message_type=EVALUATE_MODEL_MESSAGE_TYPE)


def _teacher_message(context: Context) -> Message:
    arrays = initial_teacher(run_settings_from_config(context.run_config))
    config = ConfigRecord({EVALUATE_MODEL_FORMAT_KEY: "state-dict", EVALUATE_MODEL_ROLE_KEY: "teacher"})
    content = RecordDict({"arrays": arrays, "config": config})
    return Message(content, dst_node_id=1, message_type=EVALUATE_MODEL_MESSAGE_TYPE)


def test_a_deployed_site_replies_with_coarse_aggregates_only(tmp_path: Path, onnx_bytes: bytes) -> None:
    reply = app(_onnx_message(onnx_bytes), _context(tmp_path))

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(reply.content.array_records) == set()
    metrics = dict(reply.content.metric_records["metrics"])
    assert set(metrics) == SCALARS | {WEIGHT_KEY}  # no per-class figure without the opt-in
    assert metrics[WEIGHT_KEY] % 10 == 0
    for key in SCALARS:
        value = float(metrics[key])
        assert math.isnan(value) or (0.0 <= value <= 1.0 and value == coarse(value)), key
    assert metrics["eval_auroc_macro_low"] <= metrics["eval_auroc_macro"] <= metrics["eval_auroc_macro_high"]


def test_per_class_figures_leave_only_with_the_sites_opt_in(tmp_path: Path, onnx_bytes: bytes) -> None:
    reply = app(_onnx_message(onnx_bytes), _context(tmp_path, **{"share-per-class-metrics": True}))

    metrics = dict(reply.content.metric_records["metrics"])
    assert {"eval_auroc/normal", "eval_op_sensitivity/covid-19", "eval_op_specificity/pneumonia"} <= set(
        metrics
    )


def test_teacher_weights_are_scored_in_the_runs_architecture(tmp_path: Path) -> None:
    context = _context(tmp_path)
    reply = app(_teacher_message(context), context)

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert 0.0 <= reply.content.metric_records["metrics"]["eval_auroc_macro"] <= 1.0


def test_weights_of_another_architecture_or_a_non_standard_onnx_are_refused(tmp_path: Path) -> None:
    context = _context(tmp_path, **{"share-exact-metrics": True})
    message = _teacher_message(_context(tmp_path))
    message.content["config"] = ConfigRecord(
        {EVALUATE_MODEL_FORMAT_KEY: "state-dict", EVALUATE_MODEL_ROLE_KEY: "student"}
    )
    reply = app(message, context)
    assert reply.has_error()
    assert reply.error.code == SITE_BAD_INPUT
    assert "not the run's student mobilenetv2" in reply.error.reason

    opset = b"\x0a\x0acustom.ops"  # OperatorSetIdProto with domain 'custom.ops'
    model = b"\x3a\x00" + b"\x42" + bytes([len(opset)]) + opset  # graph (empty) + that opset import
    reply = app(_onnx_message(model), context)
    assert reply.has_error()
    assert reply.error.code == SITE_BAD_INPUT
    assert "custom.ops" in reply.error.reason


def test_a_site_whose_policy_leaves_out_evaluation_declines(tmp_path: Path, onnx_bytes: bytes) -> None:
    reply = app(_onnx_message(onnx_bytes), _context(tmp_path, phases="teacher,distill"))

    assert reply.has_error()
    assert reply.error.code == SITE_DECLINED
    assert "evaluation phase" in reply.error.reason


def test_evaluation_scalars_are_means_of_within_class_rates_sent_without_opt_in() -> None:
    sent = Disclosure().metrics({"eval_op_balanced_accuracy": 0.71234, "eval_op_sensitivity/normal": 0.5})
    assert sent == {"eval_op_balanced_accuracy": 0.71}


def test_training_limits_do_not_apply_to_an_evaluation(tmp_path: Path, onnx_bytes: bytes) -> None:
    # the run's settings ask for kd-epochs = 2 and 3 rounds; an evaluation trains nothing
    context = _context(tmp_path, **{"max-kd-epochs": 1, "max-rounds": 1})
    reply = app(_onnx_message(onnx_bytes), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""

    small = _context(tmp_path, **{"max-image-size": 16})  # the image size still counts
    refused = app(_onnx_message(onnx_bytes), small)
    assert refused.has_error()
    assert "max-image-size" in refused.error.reason


def _query(context: Context) -> Message:
    content = RecordDict({"config": ConfigRecord({})})
    return Message(content, dst_node_id=1, message_type=DELIVERED_STUDENT_MESSAGE_TYPE)


def test_a_delivered_student_leaves_only_with_the_opt_in_and_never_under_dp(
    tmp_path: Path, onnx_bytes: bytes
) -> None:
    student = tmp_path / "site" / "global_student" / "student.onnx"
    student.parent.mkdir(parents=True)
    student.write_bytes(onnx_bytes)

    kept = app(_query(_context(tmp_path)), _context(tmp_path))
    assert kept.has_error()
    assert kept.error.code == SITE_DECLINED
    assert "--share-delivered-student" in kept.error.reason

    dp = {"share-delivered-student": True, "dp-target-epsilon": 8.0}
    context = _context(tmp_path, **dp)
    context.run_config["teacher-norm"] = "group"
    under_dp = app(_query(context), context)
    assert under_dp.has_error()
    assert "under DP never sends its student" in under_dp.error.reason

    shared = app(_query(_context(tmp_path)), _context(tmp_path, **{"share-delivered-student": True}))
    assert not shared.has_error(), shared.error.reason if shared.has_error() else ""
    (array,) = shared.content.array_records[ONNX_MODEL_RECORD].values()
    assert array.numpy().tobytes() == onnx_bytes
