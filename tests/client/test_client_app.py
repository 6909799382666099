"""The ClientApp's replies: what leaves a site, and how a site's mistakes are reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.app import app
from common.batchnorm_stats import expected_channels, moments_problem
from common.errors import DataError
from common.models import build_model
from common.protocol import (
    BN_STATISTICS_RECORD,
    SITE_BAD_INPUT,
    SITE_RECORD,
    STUDENT_START_KEY,
    VALIDATE_INCOMING_KEY,
    VALIDATION_RECORD,
    WEIGHT_KEY,
)
from common.run_settings import run_settings_from_config
from server.app import initial_teacher
from tests.helpers import flower_run_config

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _context(tmp_path: Path, node_config: dict[str, object]) -> Context:
    run_config = flower_run_config(
        teacher_name="tiny-cnn",
        image_size=32,
        run_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
    )
    return Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)


def _synthetic_site(tmp_path: Path) -> dict[str, object]:
    return {"site-name": "st-test", "data-format": "synthetic", "out-dir": str(tmp_path / "site")}


def _message(context: Context, message_type: str, config: dict[str, object]) -> tuple[Message, set[str]]:
    arrays = initial_teacher(run_settings_from_config(context.run_config))
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
    return Message(content, dst_node_id=1, message_type=message_type), set(arrays.keys())


def test_train_reply_holds_only_model_arrays_scalar_metrics_and_the_site_name(tmp_path: Path) -> None:
    context = _context(tmp_path, _synthetic_site(tmp_path))
    message, model_keys = _message(context, "train", {"server-round": 1, "num-rounds": 1})

    reply = app(message, context)

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    content = reply.content
    assert set(content.array_records) == {"arrays"}
    assert set(content.metric_records) == {"metrics"}
    assert set(content.config_records) == {SITE_RECORD}
    assert dict(content.config_records[SITE_RECORD]) == {"name": "st-test"}
    arrays = content.array_records["arrays"]
    assert set(arrays.keys()) == model_keys
    sent = ArrayRecord(initial_teacher(run_settings_from_config(context.run_config)).to_torch_state_dict())
    for key in model_keys:  # same shapes as the model: no image or label rides along
        assert arrays[key].shape == sent[key].shape
    metrics = content.metric_records["metrics"]
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values())
    assert metrics[WEIGHT_KEY] > 0
    assert metrics[WEIGHT_KEY] % 10 == 0  # bucketed: no exact count leaves a deployed site
    assert np.isfinite(metrics["loss"])
    assert not [k for k in metrics if "accuracy" in k or "f1" in k or "/" in k]


def test_batchnorm_statistics_reply_holds_per_layer_moments_and_a_coarse_count(tmp_path: Path) -> None:
    # Prepare: a deployed site, the run's BatchNorm teacher
    context = _context(tmp_path, _synthetic_site(tmp_path))
    message, _ = _message(context, "query.bn_statistics", {"server-round": 1, "model": "teacher"})
    channels = expected_channels(build_model(run_settings_from_config(context.run_config).teacher, 3))

    # Execute
    reply = app(message, context)

    # Assert: the moments of every layer, nothing else but the bucketed count and the name
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    content = reply.content
    assert set(content.array_records) == {BN_STATISTICS_RECORD}
    arrays = {k: v.numpy() for k, v in content.array_records[BN_STATISTICS_RECORD].items()}
    assert moments_problem(arrays, channels) is None
    assert dict(content.metric_records["metrics"]).keys() == {WEIGHT_KEY}
    assert content.metric_records["metrics"][WEIGHT_KEY] % 10 == 0
    assert set(content.config_records) == {SITE_RECORD}


def test_batchnorm_statistics_of_another_model_are_refused(tmp_path: Path) -> None:
    context = _context(tmp_path, _synthetic_site(tmp_path))
    message, _ = _message(context, "query.bn_statistics", {"server-round": 1, "model": "student"})

    reply = app(message, context)  # a teacher's weights sent as the student

    assert reply.has_error()
    assert reply.error.code == SITE_BAD_INPUT
    assert "not the run's student" in reply.error.reason


def test_evaluate_reply_holds_no_arrays(tmp_path: Path) -> None:
    context = _context(tmp_path, _synthetic_site(tmp_path))
    message, _ = _message(context, "evaluate", {"server-round": 1})

    reply = app(message, context)

    assert not reply.has_error()
    assert not reply.content.array_records
    metrics = reply.content.metric_records["metrics"]
    assert all(isinstance(v, int | float) for v in metrics.values())
    # only what the coordinator needs to aggregate and select: nothing that gives class counts
    assert set(metrics.keys()) == {WEIGHT_KEY, "val_loss", "val_auroc_macro"}
    assert metrics[WEIGHT_KEY] % 10 == 0


def test_per_class_metrics_and_exact_counts_leave_a_site_only_when_it_opts_in(tmp_path: Path) -> None:
    from client.app import data_request
    from client.site import site_from_node_config
    from common.local import load_site_data

    opt_ins = {"share-per-class-metrics": True, "share-exact-metrics": True}
    node_config = {**_synthetic_site(tmp_path), **opt_ins}
    context = _context(tmp_path, node_config)
    message, _ = _message(context, "evaluate", {"server-round": 1})

    reply = app(message, context)

    assert not reply.has_error(), reply.error.reason
    metrics = reply.content.metric_records["metrics"]
    settings = run_settings_from_config(context.run_config)
    classes = settings.task.classes
    assert {"val_accuracy", "val_f1_macro"} <= set(metrics.keys())
    assert {f"val_sensitivity/{c}" for c in classes} <= set(metrics.keys())
    site = site_from_node_config(node_config, settings)
    assert metrics[WEIGHT_KEY] == len(load_site_data(data_request(settings, site)).split.val)


def test_a_train_message_that_asks_for_validation_scores_the_model_it_brought(tmp_path: Path) -> None:
    context = _context(tmp_path, _synthetic_site(tmp_path))
    train, _ = _message(context, "train", {"server-round": 2, "num-rounds": 2, VALIDATE_INCOMING_KEY: True})
    evaluate, _ = _message(context, "evaluate", {"server-round": 1})

    reply = app(train, context)
    evaluated = app(evaluate, context)

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(reply.content.array_records) == {"arrays"}
    assert set(reply.content.metric_records) == {"metrics", VALIDATION_RECORD}
    validation = dict(reply.content.metric_records[VALIDATION_RECORD])
    # the same scores as a separate evaluate message of the same (received) model
    assert validation == dict(evaluated.content.metric_records["metrics"])
    assert not any(k.startswith("val_") for k in reply.content.metric_records["metrics"])


@pytest.mark.parametrize("flag", [False, "true", 1])
def test_a_train_message_without_a_boolean_true_flag_is_not_validated(tmp_path: Path, flag: object) -> None:
    context = _context(tmp_path, _synthetic_site(tmp_path))
    message, _ = _message(context, "train", {"server-round": 1, "num-rounds": 1, VALIDATE_INCOMING_KEY: flag})

    reply = app(message, context)

    assert not reply.has_error()
    assert set(reply.content.metric_records) == {"metrics"}


@pytest.mark.parametrize(
    ("node_config", "expected"),
    [
        ({"site-name": "a", "data-format": "image-folder"}, "out-dir"),
        ({"site-name": "a", "data-format": "image-folder", "out-dir": "/tmp/x"}, "data-path"),
        (
            {"site-name": "a", "data-format": "no-such-format", "out-dir": "/tmp/x", "data-path": "/tmp"},
            "format",
        ),
    ],
)
def test_a_site_mistake_is_an_error_reply_with_the_reason(
    tmp_path: Path, node_config: dict[str, object], expected: str
) -> None:
    context = _context(tmp_path, node_config)
    message, _ = _message(context, "train", {"server-round": 1, "num-rounds": 1})

    reply = app(message, context)

    assert reply.has_error()
    assert reply.error.code == SITE_BAD_INPUT
    assert expected in reply.error.reason


def test_site_whose_classes_differ_from_the_task_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(image)
    manifest = tmp_path / "site.csv"
    manifest.write_text("path,label\n" + "".join(f"{image},tuberculosis\n" for _ in range(4)))
    node_config = {
        "site-name": "a",
        "data-format": "manifest",
        "data-path": str(manifest),
        "out-dir": str(tmp_path),
    }
    context = _context(tmp_path, node_config)
    message, _ = _message(context, "train", {"server-round": 1, "num-rounds": 1})

    reply = app(message, context)

    assert reply.has_error()
    assert "tuberculosis" in reply.error.reason


def test_starting_the_client_app_does_not_import_opacus_or_scikit_learn() -> None:
    """Flower starts a fresh ClientApp process per message: heavy imports wait until used."""
    import subprocess
    import sys

    probe = "import sys, client.app; print(sorted(m for m in ('opacus', 'sklearn') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_error_replies_leave_image_paths_at_the_site(tmp_path: Path) -> None:
    missing = tmp_path / "patient4242" / "study1.png"
    manifest = tmp_path / "site.csv"
    manifest.write_text(f"path,label\n{missing},normal\n{missing},pneumonia\n")
    node_config = {
        "site-name": "a",
        "data-format": "manifest",
        "data-path": str(manifest),
        "out-dir": str(tmp_path),
    }
    context = _context(tmp_path, node_config)
    message, _ = _message(context, "train", {"server-round": 1, "num-rounds": 1})

    reply = app(message, context)

    assert reply.has_error()
    assert "patient4242" not in reply.error.reason
    assert str(tmp_path) not in reply.error.reason


def test_federated_student_rounds_reuse_the_teachers_logits_kept_at_the_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import common.local
    from client.app import GLOBAL_TEACHER_LOGITS_FILE
    from common.local import student_config
    from common.models import build_model

    context = _context(tmp_path, _synthetic_site(tmp_path))
    context.run_config.update(
        {
            "kd-federated-student-rounds": 1,
            "kd-epochs": 1,
            "kd-width-mult": 0.35,
            "kd-no-kd-baseline": False,
            "kd-cache-teacher-logits": True,
        }
    )
    settings = run_settings_from_config(context.run_config)
    teacher_message, _ = _message(context, "train.distill", {"server-round": 1})
    assert not (reply := app(teacher_message, context)).has_error(), reply.error.reason
    logits_path = tmp_path / "site" / GLOBAL_TEACHER_LOGITS_FILE
    kept = torch.load(logits_path, weights_only=True)
    assert kept.shape[1] == settings.task.num_classes

    student = build_model(student_config(settings.distill, settings.teacher, settings.teacher.norm), 3)

    def student_round() -> Message:
        content = RecordDict(
            {"arrays": ArrayRecord(student.state_dict()), "config": ConfigRecord({"server-round": 1})}
        )
        return app(Message(content, dst_node_id=1, message_type="train.student"), context)

    def no_teacher_pass(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the teacher's logits were computed again")

    with monkeypatch.context() as patched:
        patched.setattr(common.local, "compute_teacher_logits", no_teacher_pass)
        assert not (reply := student_round()).has_error(), reply.error.reason

    logits_path.write_bytes(b"not a tensor")  # a damaged cache is recomputed and replaced
    assert not (reply := student_round()).has_error(), reply.error.reason
    assert torch.equal(torch.load(logits_path, weights_only=True), kept)


def test_delivered_json_names_the_site_student_until_the_federated_one_arrives(tmp_path: Path) -> None:
    import json

    from client.app import SITE_BN_TEACHER_FILE
    from client.export import DELIVERED_FILE
    from common.local import student_config
    from common.models import build_model

    # Prepare: a run with one federated-student round
    context = _context(tmp_path, _synthetic_site(tmp_path))
    context.run_config.update(
        {"kd-federated-student-rounds": 1, "kd-epochs": 1, "kd-width-mult": 0.35, "kd-no-kd-baseline": False}
    )
    settings = run_settings_from_config(context.run_config)
    site_dir = tmp_path / "site"
    student = build_model(student_config(settings.distill, settings.teacher, settings.teacher.norm), 3)

    def student_message(message_type: str, config: dict[str, object]) -> Message:
        content = RecordDict({"arrays": ArrayRecord(student.state_dict()), "config": ConfigRecord(config)})
        return Message(content, dst_node_id=1, message_type=message_type)

    # Execute + Assert: after the distillation round the site's own student is the deliverable
    teacher_message, _ = _message(context, "train.distill", {"server-round": 1})
    assert not (reply := app(teacher_message, context)).has_error(), reply.error.reason
    record = json.loads((site_dir / DELIVERED_FILE).read_text())
    assert (record["folder"], record["delivered"]) == ("student", "site")
    assert (site_dir / record["onnx"]).is_file()
    # a BatchNorm teacher: its site-adapted copy serves the student rounds (no re-estimation there)
    assert settings.teacher.norm == "batch"
    assert (site_dir / SITE_BN_TEACHER_FILE).is_file()

    # a student round the run does not have is refused (the server only places it on the schedule)
    refused = app(student_message("train.student", {"server-round": 2}), context)
    assert refused.has_error()
    assert "such round" in refused.error.reason

    assert not (reply := app(student_message("train.student", {"server-round": 1}), context)).has_error()
    assert not (reply := app(student_message("evaluate.student", {"phase": "student"}), context)).has_error()
    record = json.loads((site_dir / DELIVERED_FILE).read_text())
    assert (record["folder"], record["delivered"]) == ("global_student", "global")
    assert (site_dir / record["onnx"]).is_file()
    card = json.loads((site_dir / "global_student" / "model_card.json").read_text())
    assert card["distillation"]["delivered"] == "global"


def test_the_delivered_student_is_the_global_one_unless_its_fine_tune_wins_on_validation(
    tmp_path: Path,
) -> None:
    import torch

    from client.app import GLOBAL_TEACHER_FILE, _personalise, _val, data_request
    from client.site import site_from_node_config
    from common.checkpoint import save_model
    from common.local import BestStudent, build_loaded_model, load_site_data, student_config

    context = _context(tmp_path, _synthetic_site(tmp_path))
    context.run_config.update({"kd-student": "tiny-cnn", "kd-personalise-epochs": 1, "kd-batch-size": 8})
    settings = run_settings_from_config(context.run_config)
    site = site_from_node_config(context.node_config, settings)
    data = load_site_data(data_request(settings, site))
    torch.manual_seed(0)
    teacher = build_loaded_model(settings.teacher, settings.task, None).state_dict()
    config = student_config(settings.distill, settings.teacher, settings.teacher.norm)
    global_state = build_loaded_model(config, settings.task, None).state_dict()
    site.out_dir.mkdir(parents=True, exist_ok=True)
    save_model(teacher, site.out_dir / GLOBAL_TEACHER_FILE)  # what the distillation round keeps

    state, delivered, metrics = _personalise(settings, site, data, global_state)

    global_score = BestStudent.score(_val(settings, data, global_state, site))
    delivered_score = BestStudent.score(_val(settings, data, state, site))
    if delivered.choice == "personalised":
        assert delivered_score > global_score
        assert metrics["student_personalised"] == 1.0
    else:
        assert delivered.choice == "global"
        assert all(torch.equal(state[k], global_state[k]) for k in global_state)
        assert metrics["student_personalised"] == 0.0
    assert "validation" in delivered.reason


def _distill_message_with_student_start(context: Context, student: dict[str, torch.Tensor]) -> Message:
    message, _ = _message(context, "train.distill", {"server-round": 1})
    message.content[STUDENT_START_KEY] = ArrayRecord(student)
    return message


def _run_student(context: Context) -> dict[str, torch.Tensor]:
    from common.local import student_config

    settings = run_settings_from_config(context.run_config)
    config = student_config(settings.distill, settings.teacher, settings.teacher.norm)
    return build_model(config, settings.task.num_classes).state_dict()


def test_the_site_student_starts_from_the_coordinators_student_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import client.app

    context = _context(tmp_path, _synthetic_site(tmp_path))
    start = {
        name: tensor + 0.5 if tensor.is_floating_point() else tensor
        for name, tensor in _run_student(context).items()
    }
    started_from: list[object] = []

    def record_start(*_args: object, **kwargs: object) -> None:
        started_from.append(kwargs.get("student_state"))
        raise DataError("stop after the first distillation")

    monkeypatch.setattr(client.app, "distill_student", record_start)
    reply = app(_distill_message_with_student_start(context, start), context)

    assert reply.has_error()
    assert "stop after" in reply.error.reason
    received = started_from[0]
    assert isinstance(received, dict)
    assert all(torch.equal(received[name], tensor) for name, tensor in start.items())


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (lambda state: {k: v for k, v in list(state.items())[1:]}, "not this run's"),
        (
            lambda state: {**state, "features.0.0.weight": state["features.0.0.weight"][:1]},
            "features.0.0.weight",
        ),
        (
            lambda state: {
                **state,
                "classifier.1.bias": torch.full_like(state["classifier.1.bias"], float("nan")),
            },
            "non-finite",
        ),
    ],
)
def test_a_student_start_that_is_not_this_runs_student_is_refused(
    tmp_path: Path, spoil: Any, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import client.app

    context = _context(tmp_path, _synthetic_site(tmp_path))
    monkeypatch.setattr(client.app, "distill_student", lambda *_a, **_k: pytest.fail("distilled anyway"))

    reply = app(_distill_message_with_student_start(context, spoil(_run_student(context))), context)

    assert reply.has_error()
    assert reply.error.code == SITE_BAD_INPUT
    assert "student start" in reply.error.reason
    assert expected in reply.error.reason
