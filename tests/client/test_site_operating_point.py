"""A site's own operating points (issue 25, items 2 and 4): the criterion it chooses, the rule
its exports carry, ``predict``/``evaluate``/``explain`` deciding with it, and the check before
delivery with what of it leaves the site."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from client.cli import app
from client.disclosure import Disclosure
from client.site import site_from_node_config
from client.site_operating_point import AtOperatingPoint, delivery_check
from common.checkpoint import save_model
from common.config import ModelConfig
from common.errors import ConfigError, ModelError
from common.export import (
    OnnxPredictor,
    Preprocessing,
    export_onnx,
    model_metadata,
    preprocessing_path,
    read_preprocessing,
    write_preprocessing,
)
from common.metrics import compute_metrics
from common.models import build_model
from common.operating_point import Criterion, OperatingPoint, fit_operating_point
from common.run_settings import run_settings_from_config
from common.tasks import get_task
from common.training import EvalResult
from tests.helpers import flower_run_config

SIZE = 32
TASK = get_task("normal-pneumonia-covid")
FOLDERS = {"normal": "NORMAL", "pneumonia": "PNEUMONIA", "covid-19": "COVID"}
LEVELS = {"normal": 40, "pneumonia": 128, "covid-19": 220}
"""Each class's image brightness: the crafted model ranks the classes by it."""
runner = CliRunner(env={"COLUMNS": "400"})


class _CollapsedByBrightness(nn.Module):
    """Logits that rank every image's class first among the other classes' images (its distance
    to the class's brightness) but whose argmax is ``normal`` for every image: a model that
    learnt the federation's class mix, not this site's."""

    def __init__(self, centres: list[float]) -> None:
        super().__init__()
        self.register_buffer("centres", torch.tensor(centres))
        self.register_buffer("prior", torch.tensor([6.0, 0.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        brightness = x.mean(dim=(1, 2, 3))[:, None]
        return -0.5 * (brightness - self.centres[None, :]) ** 2 + self.prior[None, :]


def _labelled_images(root: Path, per_class: int = 6) -> list[tuple[Path, str]]:
    rng = np.random.default_rng(0)
    out = []
    for label, folder in FOLDERS.items():
        (root / folder).mkdir(parents=True)
        for i in range(per_class):
            level = LEVELS[label] + rng.uniform(-8, 8)
            pixels = np.clip(level + rng.uniform(-5, 5, (SIZE, SIZE)), 0, 255).astype(np.uint8)
            path = root / folder / f"img_{label}_{i}.png"
            Image.fromarray(pixels).save(path)
            out.append((path, label))
    return out


@pytest.fixture(scope="module")
def collapsed(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, list[tuple[Path, str]], OperatingPoint]:
    """An exported collapsed model whose preprocessing carries the operating point the site
    fitted on labelled images, and those images (an image folder)."""
    root = tmp_path_factory.mktemp("collapsed")
    images = _labelled_images(root / "data")
    prep = Preprocessing.for_task(TASK, SIZE)
    centres = [(LEVELS[c] / 255 - prep.mean) / prep.std for c in TASK.classes]
    onnx = export_onnx(_CollapsedByBrightness(centres), root / "model" / "student.onnx", SIZE)
    write_preprocessing(prep, onnx)
    plain = _plain_predictions(onnx, images)
    probabilities = np.array([[p.probabilities[c] for c in TASK.classes] for p in plain])
    assert (probabilities.argmax(axis=1) == 0).all()  # the premise: the argmax collapsed
    labels = np.eye(3)[[TASK.index(label) for _, label in images]]
    point = fit_operating_point(probabilities, labels, TASK, Criterion("balanced-accuracy"))
    write_preprocessing(Preprocessing.for_task(TASK, SIZE, operating_point=point), onnx)
    return onnx, images, point


def _plain_predictions(onnx: Path, images: list[tuple[Path, str]]) -> list:
    return OnnxPredictor(onnx, use_operating_point=False).predict_files([p for p, _ in images])


def _predict_csv(onnx: Path, images: Path, out: Path, *extra: str) -> dict[str, str]:
    result = runner.invoke(app, ["predict", str(onnx), str(images), "--csv", str(out), *extra])
    assert result.exit_code == 0, result.output
    with out.open(newline="", encoding="utf-8") as handle:
        return {Path(row["image"]).name: row["predicted"] for row in csv.DictReader(handle)}


def test_predict_decides_at_the_exports_operating_point(collapsed: tuple, tmp_path: Path) -> None:
    onnx, images, _ = collapsed
    truth = {path.name: label for path, label in images}

    at_point = _predict_csv(onnx, images[0][0].parents[1], tmp_path / "a.csv")
    plain = _predict_csv(onnx, images[0][0].parents[1], tmp_path / "b.csv", "--ignore-operating-point")

    assert at_point == truth
    assert set(plain.values()) == {"normal"}
    table = runner.invoke(app, ["predict", str(onnx), str(images[-1][0])])
    assert table.exit_code == 0, table.output
    assert "log-prior shift" in table.output  # the rule it decided by, in one line


def test_an_export_without_an_operating_point_decides_by_argmax(collapsed: tuple, tmp_path: Path) -> None:
    onnx, images, _ = collapsed
    old = tmp_path / "old.onnx"
    old.write_bytes(onnx.read_bytes())
    data = json.loads(preprocessing_path(onnx).read_text())
    del data["operating_point"]  # as written before operating points existed
    preprocessing_path(old).write_text(json.dumps(data))

    assert read_preprocessing(old).operating_point is None
    assert set(_predict_csv(old, images[0][0].parents[1], tmp_path / "c.csv").values()) == {"normal"}


def test_a_malformed_operating_point_in_the_preprocessing_file_is_refused(
    collapsed: tuple, tmp_path: Path
) -> None:
    onnx, images, point = collapsed
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(onnx.read_bytes())
    data = json.loads(preprocessing_path(onnx).read_text())
    data["operating_point"]["log_prior_shift"] = [0.0, "nan", 1.0]
    preprocessing_path(bad).write_text(json.dumps(data))
    with pytest.raises(ModelError, match="operating_point"):
        read_preprocessing(bad)
    data["operating_point"] = {**point.to_dict(), "classes": ["a", "b", "c"]}
    preprocessing_path(bad).write_text(json.dumps(data))
    result = runner.invoke(app, ["predict", str(bad), str(images[0][0])])
    assert result.exit_code == 2
    assert "operating_point" in result.stderr
    assert "Traceback" not in result.output


def _evaluate(collapsed: tuple, out: Path, *extra: str) -> dict:
    onnx, images, _ = collapsed
    data = images[0][0].parents[1]
    result = runner.invoke(
        app,
        ["evaluate", str(onnx), "--data", str(data), "--format", "image-folder", "--out", str(out),
         "--cache-dir", str(out.parent / "cache"), "--bootstrap", "50", *extra],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "evaluation.json").read_text())["results"]
    report["console"] = result.output
    report["markdown"] = (out / "evaluation.md").read_text()
    return report


def test_evaluate_gives_the_operating_point_beside_the_argmax(collapsed: tuple, tmp_path: Path) -> None:
    report = _evaluate(collapsed, tmp_path / "r")

    assert report["balanced_accuracy"]["value"] == pytest.approx(1 / 3)  # argmax: all normal
    site = report["site_operating_point"]
    assert site["rule"].startswith("site's operating point")
    assert site["balanced_accuracy"]["value"] == pytest.approx(1.0)
    assert set(site["log_prior_shift"]) == set(TASK.classes)
    for c in report["classes"]:
        assert c["sensitivity"]["value"] == (1.0 if c["name"] == "normal" else 0.0)
        assert c["site_operating_point"]["sensitivity"]["value"] == pytest.approx(1.0)
        assert c["site_operating_point"]["specificity"]["value"] == pytest.approx(1.0)
    assert "## Site operating point" in report["markdown"]
    assert "operating point" in report["console"]


def test_evaluate_without_the_operating_point_or_with_thresholds(collapsed: tuple, tmp_path: Path) -> None:
    ignored = _evaluate(collapsed, tmp_path / "i", "--ignore-operating-point")
    assert ignored["site_operating_point"] is None

    thresholds = _evaluate(collapsed, tmp_path / "t", "--threshold", "0.4")
    assert thresholds["site_operating_point"]["rule"] == "site's thresholds"
    assert thresholds["site_operating_point"]["thresholds"] == {c: 0.4 for c in TASK.classes}
    assert "Site-chosen thresholds" in thresholds["markdown"]


def test_explain_names_the_class_decided_at_the_operating_point(tmp_path: Path) -> None:
    # Prepare: a student whose argmax is always 'normal' (a large bias); its operating point
    # shifts 'pneumonia' up by more than that bias, so every decision is 'pneumonia'
    config = ModelConfig(name="tiny-cnn")
    torch.manual_seed(0)
    model = build_model(config, TASK.num_classes).eval()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))
    point = OperatingPoint("balanced-accuracy", TASK.kind, TASK.classes, log_prior_shift=(0.0, 12.0, -12.0))
    meta = model_metadata(config, TASK, SIZE, "student", operating_point=point)
    (tmp_path / "student").mkdir()
    save_model(model, tmp_path / "student" / "student.pt", metadata=meta)
    images = _labelled_images(tmp_path / "data", per_class=1)
    prep = Preprocessing.for_task(TASK, SIZE)
    with torch.no_grad():
        logits = model(torch.stack([torch.from_numpy(prep.load_image(p)) for p, _ in images]))
    assert (logits.argmax(dim=1) == 0).all()  # the premises: argmax all 'normal', the point's not
    assert ((logits + torch.tensor([0.0, 12.0, -12.0])).argmax(dim=1) == 1).all()

    def explained(*extra: str) -> list[str]:
        args = ["explain", "--model", str(tmp_path / "student"), "--image", str(images[0][0]), "--out"]
        result = runner.invoke(app, [*args, str(tmp_path / "cams"), *extra])
        assert result.exit_code == 0, result.output
        row = next(line for line in result.stdout.splitlines() if images[0][0].name in line)
        return [cell.strip() for cell in row.split("│")[2:4]]  # decided, explained class

    assert explained() == ["pneumonia", "pneumonia"]
    assert explained("--ignore-operating-point") == ["normal", "normal"]
    assert explained("--class", "covid-19") == ["pneumonia", "covid-19"]


# ----------------------------------------------------------------------------- the site's criterion


class _NodeThatRecords:
    """Stands in for the SuperNode: keeps the settings ``start`` built, runs nothing."""

    settings: ClassVar[list[object]] = []

    def __init__(self, settings: object) -> None:
        _NodeThatRecords.settings.append(settings)

    def run(self, _on_event: object) -> str:
        return "run finished"

    def stop(self) -> None:  # pragma: no cover - only on Ctrl-C
        pass


def _start(tmp_path: Path, *extra: str) -> object:
    args = ["start", "--server", "127.0.0.1:1", "--site", "a", "--format", "synthetic", "--insecure"]
    return runner.invoke(app, [*args, "--out", str(tmp_path / "out"), "--skip-check", *extra])


def test_start_passes_the_sites_criterion_to_its_node_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import client.cli
    import client.deploy

    monkeypatch.setattr(client.deploy, "SiteNode", _NodeThatRecords)
    monkeypatch.setattr(client.cli, "exit_on_sigterm", lambda: None)
    _NodeThatRecords.settings.clear()

    assert _start(tmp_path, "--operating-point", "sensitivity:covid-19=0.9").exit_code == 0
    assert _start(tmp_path).exit_code == 0

    chosen, default = _NodeThatRecords.settings
    assert chosen.operating_point == "sensitivity:covid-19=0.9"
    assert 'operating-point="sensitivity:covid-19=0.9"' in chosen.node_config()
    assert default.operating_point == "balanced-accuracy"


@pytest.mark.parametrize("value", ["f1", "sensitivity:flu=0.9", "sensitivity:covid-19=2"])
def test_start_refuses_a_bad_criterion_before_anything_starts(tmp_path: Path, value: str) -> None:
    result = _start(tmp_path, "--operating-point", value)
    assert result.exit_code == 2
    assert "--operating-point" in result.stderr
    assert next(line for line in result.stderr.splitlines() if "operating-point" in line).startswith("error:")
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_sites_criterion_is_its_own_node_config_never_the_run_config(tmp_path: Path) -> None:
    settings = run_settings_from_config(
        flower_run_config(simulation_manifest_dir=str(tmp_path / "manifests"), run_dir=str(tmp_path / "run"))
    )
    deployed = {"site-name": "a", "data-format": "synthetic", "out-dir": str(tmp_path / "site")}

    assert site_from_node_config(deployed, settings).operating_point == Criterion("balanced-accuracy")
    own = site_from_node_config({**deployed, "operating-point": "argmax"}, settings)
    assert own.operating_point == Criterion("argmax")
    simulated = site_from_node_config({"partition-id": 0, "num-partitions": 2}, settings)
    assert simulated.operating_point == Criterion("balanced-accuracy")
    with pytest.raises(ConfigError, match="node_config 'operating-point'"):
        site_from_node_config({**deployed, "operating-point": "sensitivity:flu=1"}, settings)


# ----------------------------------------------------------------------------- the check before delivery


def _scored(point: OperatingPoint, probabilities: np.ndarray, labels: np.ndarray) -> AtOperatingPoint:
    metrics = compute_metrics(TASK, labels, probabilities)
    return AtOperatingPoint(point, EvalResult(0.5, len(labels), metrics, probabilities, labels))


def _site_test_split() -> tuple[np.ndarray, np.ndarray]:
    """Outputs that separate the three classes perfectly, on a test split holding all three."""
    labels = np.eye(3)[np.repeat(np.arange(3), 10)]
    return 0.1 + 0.7 * labels, labels


def test_a_student_that_never_predicts_a_present_class_fails_the_check() -> None:
    probabilities, labels = _site_test_split()
    teacher = _scored(OperatingPoint.argmax(TASK), probabilities, labels)
    never_covid = OperatingPoint(
        "balanced-accuracy", TASK.kind, TASK.classes, log_prior_shift=(0.0, 0.0, -12.0)
    )
    student = _scored(never_covid, probabilities, labels)

    reply, record = delivery_check(TASK, teacher, student, nokd=teacher, kd=student)

    assert reply["delivery_check_ok"] == 0.0
    assert reply["student_op_never_predicted"] == 1.0
    assert reply["teacher_op_balanced_accuracy"] == pytest.approx(1.0)
    assert reply["student_op_balanced_accuracy"] == pytest.approx(2 / 3)
    assert reply["student_op_sensitivity/covid-19"] == 0.0
    assert reply["nokd_op_balanced_accuracy"] == pytest.approx(1.0)
    assert reply["kd_op_balanced_accuracy"] == pytest.approx(2 / 3)
    assert record["never_predicted_by_student"] == ["covid-19"]
    assert record["ok"] is False


def test_the_check_holds_within_the_tolerance_and_fails_beyond_it() -> None:
    probabilities, labels = _site_test_split()
    teacher = _scored(OperatingPoint.argmax(TASK), probabilities, labels)
    same = _scored(OperatingPoint.argmax(TASK), probabilities, labels)
    worse_probabilities = probabilities.copy()
    worse_probabilities[0] = [0.1, 0.8, 0.1]  # one 'normal' image of 10 called pneumonia: -1/30
    slightly_worse = _scored(OperatingPoint.argmax(TASK), worse_probabilities.copy(), labels)
    worse_probabilities[1] = [0.1, 0.8, 0.1]  # two of 10: -2/30 > 0.05 below the teacher
    too_far = _scored(OperatingPoint.argmax(TASK), worse_probabilities, labels)

    reply, _ = delivery_check(TASK, teacher, same)
    assert reply["delivery_check_ok"] == 1.0
    assert {k for k in reply if "/" not in k} == {
        "teacher_op_balanced_accuracy",
        "student_op_balanced_accuracy",
        "student_op_never_predicted",
        "delivery_check_ok",
    }
    assert {k for k in reply if "/" in k} == {
        f"{role}_op_{rate}/{c}" for role in ("teacher", "student") for rate in ("sensitivity", "specificity")
        for c in TASK.classes
    }  # fmt: skip
    assert delivery_check(TASK, teacher, slightly_worse)[0]["delivery_check_ok"] == 1.0
    assert delivery_check(TASK, teacher, too_far)[0]["delivery_check_ok"] == 0.0


def test_a_deployed_site_sends_the_check_coarse_and_per_class_only_when_it_opted_in() -> None:
    probabilities, labels = _site_test_split()
    probabilities[0] = [0.1, 0.8, 0.1]
    reply, _ = delivery_check(
        TASK,
        _scored(OperatingPoint.argmax(TASK), probabilities, labels),
        _scored(OperatingPoint.argmax(TASK), *_site_test_split()),
    )

    deployed = Disclosure().metrics(reply)
    opted_in = Disclosure(per_class=True).metrics(reply)
    simulated = Disclosure(per_class=True, exact=True).metrics(reply)

    assert set(deployed) == {k for k in reply if "/" not in k}
    assert deployed["teacher_op_balanced_accuracy"] == 0.97  # 0.9666...: two significant digits
    assert deployed["delivery_check_ok"] == 1.0
    assert set(opted_in) == set(reply)
    assert opted_in["teacher_op_sensitivity/normal"] == 0.9
    assert simulated == reply
    assert math.isclose(simulated["teacher_op_balanced_accuracy"], 29 / 30)
    assert set(Disclosure().metrics(reply, dp=True)) == set(deployed)  # test-split figures, also under DP


# ----------------------------------------------------------------------------- at the site, end to end


CHECK_SCALARS = {
    "teacher_op_balanced_accuracy",
    "student_op_balanced_accuracy",
    "student_op_never_predicted",
    "delivery_check_ok",
}


def _site_context(tmp_path: Path, **node: object) -> Any:
    from flwr.app import Context, RecordDict

    run_config = flower_run_config(
        teacher_name="tiny-cnn",
        image_size=32,
        run_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        kd_student="tiny-cnn",
        kd_epochs=1,
        kd_no_kd_baseline=True,
    )
    node_config = {
        "site-name": "st-test",
        "data-format": "synthetic",
        "out-dir": str(tmp_path / "site"),
        **node,
    }
    return Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)


def _send(
    context: Any, message_type: str, state: dict[str, torch.Tensor], **config: object
) -> dict[str, float]:
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from client.app import app as client_app

    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(dict(config))})
    reply = client_app(Message(content, dst_node_id=1, message_type=message_type), context)
    assert not reply.has_error(), reply.error.reason
    return dict(reply.content.metric_records["metrics"])


def _teacher_state(context: Any) -> dict[str, torch.Tensor]:
    from server.app import initial_teacher

    return initial_teacher(run_settings_from_config(context.run_config)).to_torch_state_dict()


@pytest.mark.usefixtures("flower_task_identity")
def test_a_site_that_delivers_its_own_student_checks_it_and_keeps_every_rule_at_home(tmp_path: Path) -> None:
    context = _site_context(tmp_path, **{"operating-point": "sensitivity:covid-19=0.5"})
    context.run_config["kd-federated-student-rounds"] = 0

    metrics = _send(context, "train.distill", _teacher_state(context), **{"server-round": 1})

    site = tmp_path / "site"
    # a deployed site without opt-ins: the check's scalars, coarse; no per-class figure
    assert CHECK_SCALARS | {"kd_op_balanced_accuracy", "nokd_op_balanced_accuracy"} <= set(metrics)
    assert not [k for k in metrics if "/" in k]
    assert metrics["delivery_check_ok"] in (0.0, 1.0)
    record = json.loads((site / "delivery_check.json").read_text())
    assert record["ok"] == bool(metrics["delivery_check_ok"])
    assert set(record) >= {"teacher", "student", "nokd", "kd", "never_predicted_by_student"}
    assert metrics["student_op_balanced_accuracy"] == pytest.approx(
        record["student"]["at_operating_point"]["balanced_accuracy"], rel=0.05
    )
    teacher_point = OperatingPoint.from_dict(json.loads((site / "teacher_operating_point.json").read_text()))
    assert teacher_point.criterion == "sensitivity:covid-19=0.5"
    exported = read_preprocessing(site / "student" / "student.onnx").operating_point
    assert exported is not None
    assert exported.criterion == "sensitivity:covid-19=0.5"
    card = json.loads((site / "student" / "model_card.json").read_text())
    assert card["operating_point"] == exported.describe()
    assert f"Operating point: {exported.describe()}" in (site / "student" / "model_card.md").read_text()
    nokd = json.loads((site / "nokd_student.pt.json").read_text())
    assert OperatingPoint.from_dict(nokd["operating_point"]).criterion == "sensitivity:covid-19=0.5"


@pytest.mark.usefixtures("flower_task_identity")
def test_the_delivered_federated_student_is_checked_and_carries_its_rule(tmp_path: Path) -> None:
    from common.local import student_config

    context = _site_context(tmp_path, **{"share-per-class-metrics": True})
    context.run_config["kd-federated-student-rounds"] = 1
    settings = run_settings_from_config(context.run_config)
    student = build_model(student_config(settings.distill, settings.teacher, settings.teacher.norm), 3)

    distilled = _send(context, "train.distill", _teacher_state(context), **{"server-round": 1})
    assert not CHECK_SCALARS & set(distilled)  # nothing is delivered yet
    _send(context, "train.student", student.state_dict(), **{"server-round": 1})
    final = _send(context, "evaluate.student", student.state_dict(), phase="student")

    assert CHECK_SCALARS | {"nokd_op_balanced_accuracy"} <= set(final)
    assert {f"student_op_sensitivity/{c}" for c in TASK.classes} <= set(final)  # the site opted in
    assert {"teacher_auroc_macro", "student_auroc_macro"} <= set(final)
    site = tmp_path / "site"
    assert json.loads((site / "delivery_check.json").read_text())["ok"] == bool(final["delivery_check_ok"])
    exported = read_preprocessing(site / "global_student" / "student.onnx").operating_point
    assert exported is not None
    assert exported.criterion == "balanced-accuracy"
