"""The study's recipe cells: decisions at each site's own operating point (research/study/sites.py)
and the recipe section and targets of the report (research/study/recipe.py), on fabricated cell
folders and results (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import research.study.sites as study_sites
from common.config import ModelConfig
from common.errors import ConfigError
from common.export import Preprocessing, write_preprocessing
from common.metrics import compute_metrics
from common.operating_point import OperatingPoint
from common.tasks import get_task
from common.training import EvalResult
from research.study.cells import load_settings, table_cells
from research.study.report import build_study_report
from tests.study.helpers import fake_result, write_config

TASK = get_task("normal-pneumonia-covid")
COVID = TASK.classes.index("covid-19")
NORMAL = TASK.classes.index("normal")

RECIPE = """
[recipe]
new = "newrec"
old = "oldrec"

[[attempts]]
name = "newrec"
about = "the new recipe"
splits = ["natural", "dirichlet-0.1"]
kd = true
federated-student = true
run = { bn-statistics = "federated", kd-no-kd-baseline = false }
seeds = [0, 1]

[[attempts]]
name = "oldrec"
about = "the old recipe"
splits = ["natural", "dirichlet-0.1"]
kd = true
federated-student = true
run = { bn-statistics = "averaged", kd-no-kd-baseline = false }
seeds = [0, 1]
"""


# ----------------------------------------------------------------------------- settings


def test_recipe_attempts_run_on_each_of_their_splits_and_differ_only_in_bn_statistics(tmp_path: Path) -> None:
    from research.study.cells import cell_run_config

    settings = load_settings(write_config(tmp_path, tmp_path / "pool.csv", extra=RECIPE))

    cells = table_cells("attempts", settings)
    assert [c.name for c in cells] == [
        "cxr-natural-fedavg-fedstudent-newrec-s0",
        "cxr-natural-fedavg-fedstudent-newrec-s1",
        "cxr-dirichlet-0.1-fedavg-fedstudent-newrec-s0",
        "cxr-dirichlet-0.1-fedavg-fedstudent-newrec-s1",
        "cxr-natural-fedavg-fedstudent-oldrec-s0",
        "cxr-natural-fedavg-fedstudent-oldrec-s1",
        "cxr-dirichlet-0.1-fedavg-fedstudent-oldrec-s0",
        "cxr-dirichlet-0.1-fedavg-fedstudent-oldrec-s1",
    ]
    new, old = cell_run_config(cells[0], settings, 4), cell_run_config(cells[4], settings, 4)
    assert {k for k in new if new[k] != old.get(k)} == {"bn-statistics"}
    assert new["kd-no-kd-baseline"] is False
    assert new["kd-federated-student-rounds"] == settings.federated_student_rounds
    assert (settings.recipe.new, settings.recipe.old) == ("newrec", "oldrec")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (('new = "newrec"', 'new = "nosuch"'), "recipe.new"),
        (('old = "oldrec"', 'old = "nosuch"\ncolour = 1'), "recipe.colour"),
        (('old = "oldrec"', 'old = "oldrec"\nnatural = "nosuch"'), "recipe.natural"),
        (('splits = ["natural", "dirichlet-0.1"]\nkd', 'splits = ["natural", "random"]\nkd'), "splits"),
        (('splits = ["natural", "dirichlet-0.1"]\nkd', "splits = []\nkd"), "splits"),
        (('splits = ["natural", "dirichlet-0.1"]\nkd', 'splits = ["iid", "iid"]\nkd'), "splits"),
        (('splits = ["natural", "dirichlet-0.1"]\nkd', 'split = "iid"\nsplits = ["iid"]\nkd'), "not both"),
    ],
)
def test_bad_recipe_settings_are_refused_naming_the_key(
    tmp_path: Path, change: tuple[str, str], named: str
) -> None:
    extra = RECIPE.replace(*change, 1)
    assert extra != RECIPE

    with pytest.raises(ConfigError, match=named):
        load_settings(write_config(tmp_path, tmp_path / "pool.csv", extra=extra))


# ----------------------------------------------------------------------------- scoring at the site's point

# held-out outputs: 2 normal images, 2 COVID-19 images. The argmax calls every image normal; a
# site's rule that favours COVID-19 (log-prior shift +log 2) finds both COVID-19 images and no
# normal one is called COVID-19.
PROBS = np.array([[0.65, 0.10, 0.25], [0.65, 0.10, 0.25], [0.50, 0.10, 0.40], [0.50, 0.10, 0.40]])
LABELS = np.eye(3)[[NORMAL, NORMAL, COVID, COVID]]
STUDENT_SHIFT = tuple(math.log(2.0) if k == COVID else 0.0 for k in range(3))


def _point(shift: tuple[float, ...]) -> OperatingPoint:
    return OperatingPoint("balanced-accuracy", "multiclass", tuple(TASK.classes), log_prior_shift=shift)


def _eval(probabilities: np.ndarray) -> EvalResult:
    metrics = compute_metrics(TASK, LABELS, probabilities)
    return EvalResult(loss=0.5, n=len(probabilities), metrics=metrics, scores=probabilities, targets=LABELS)


def _site(folder: Path, *, teacher_point: OperatingPoint | None) -> Path:
    """A site's run folder as the federated-student phase leaves it (weights are fakes)."""
    student = folder / "global_student"
    student.mkdir(parents=True)
    (folder / "delivered.json").write_text(json.dumps({"folder": "global_student", "delivered": "global"}))
    (student / "student.pt").write_bytes(b"student")
    prep = Preprocessing.for_task(TASK, 32, operating_point=_point(STUDENT_SHIFT))
    write_preprocessing(prep, student / "student.onnx")
    if teacher_point is not None:
        (folder / "global_teacher.pt").write_bytes(b"teacher")
        (folder / "teacher_operating_point.json").write_text(json.dumps(teacher_point.to_dict()))
    return folder


@pytest.fixture
def fake_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """The student's held-out outputs are PROBS; the teacher's put every image's COVID-19 mass on
    pneumonia (so it is right about COVID-19 at no rule)."""
    monkeypatch.setattr(study_sites, "load_model_state", lambda path: {"which": Path(path).name})

    def evaluate_state(config: ModelConfig, state: dict[str, str], dataset: Any, task: Any) -> EvalResult:
        if state["which"] == "global_teacher.pt":
            return _eval(PROBS[:, [0, 2, 1]])
        return _eval(PROBS)

    monkeypatch.setattr(study_sites, "evaluate_state", evaluate_state)


def test_a_site_is_scored_at_the_rule_of_its_export_not_at_the_argmax(
    tmp_path: Path, fake_models: None
) -> None:
    site = _site(tmp_path / "site_00", teacher_point=OperatingPoint.argmax(TASK))
    config = ModelConfig(name="tiny-cnn")

    record = study_sites.score_site(site, config, config, None, TASK)

    assert record["folder"] == "global_student"
    assert record["delivered"] == "global"
    assert record["balanced_accuracy"] == 0.5  # the argmax's, kept beside (normal right, COVID-19 wrong)
    assert record["op_sensitivity/covid-19"] == 1.0  # the argmax finds none of them
    assert record["op_specificity/covid-19"] == 1.0
    assert record["op_balanced_accuracy"] == 1.0  # over the classes present (normal, covid-19)
    assert record["op_never_predicted"] == 0.0
    assert "covid-19 +0.69" in record["operating_point"]
    teacher = record["teacher_at_site"]
    assert teacher["operating_point"].startswith("argmax")
    assert teacher["op_sensitivity/covid-19"] == 0.0
    assert teacher["op_never_predicted"] == 1.0  # never calls COVID-19


def test_the_rule_comes_from_the_weights_metadata_without_a_preprocessing_file(
    tmp_path: Path, fake_models: None
) -> None:
    site = _site(tmp_path / "site_00", teacher_point=None)
    (site / "global_student" / "student.preprocessing.json").unlink()
    meta = {"operating_point": _point(STUDENT_SHIFT).to_dict()}
    (site / "global_student" / "student.pt.json").write_text(json.dumps(meta))
    config = ModelConfig(name="tiny-cnn")

    record = study_sites.score_site(site, config, config, None, TASK)

    assert record["op_sensitivity/covid-19"] == 1.0
    assert "teacher_at_site" not in record  # the site kept no teacher: nothing to compare


def test_a_site_without_a_delivered_student_is_recorded_as_failed_and_counts_zero(tmp_path: Path) -> None:
    (tmp_path / "site_00").mkdir()
    config = ModelConfig(name="tiny-cnn")

    record = study_sites.score_site(tmp_path / "site_00", config, config, None, TASK)

    assert record == {"failed": True}
    result = {"delivered": {"site_00": record, "site_01": {"op_sensitivity/covid-19": 0.8}}}
    assert study_sites.mean_over_sites(result, "op_sensitivity/covid-19") == pytest.approx(0.4)
    # a cell scored before operating points: no figure, no mean (never a made-up one)
    assert (
        study_sites.mean_over_sites({"delivered": {"site_01": {"auroc_macro": 0.9}}}, "op_balanced_accuracy")
        is None
    )


# ----------------------------------------------------------------------------- the report


def _delivered(
    sens: list[float | None], spec: list[float], ba: list[float], teacher_ba: list[float]
) -> dict[str, Any]:
    sites: dict[str, Any] = {}
    for i, (se, sp, b, t) in enumerate(zip(sens, spec, ba, teacher_ba, strict=True)):
        if se is None:
            sites[f"site_0{i}"] = {"failed": True}
            continue
        sites[f"site_0{i}"] = {
            "folder": "global_student",
            "delivered": "global",
            "auroc_macro": 0.9,
            "balanced_accuracy": 0.4,
            "sensitivity/covid-19": 0.0,
            "specificity/covid-19": 1.0,
            "op_sensitivity/covid-19": se,
            "op_specificity/covid-19": sp,
            "op_balanced_accuracy": b,
            "teacher_at_site": {"op_balanced_accuracy": t},
        }
    return sites


def _write_cells(settings: Any, cells: dict[str, dict[str, Any]]) -> None:
    for name, record in cells.items():
        path = settings.out / "cells" / name / "result.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record))


def test_report_judges_the_natural_covid_targets_at_the_sites_points(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, tmp_path / "pool.csv", extra=RECIPE))
    _write_cells(
        settings,
        {
            # seed 0: a site whose phase failed counts 0 (mean of 1.0, 0.5, 0 = 0.5)
            "cxr-natural-fedavg-fedstudent-newrec-s0": fake_result(
                "a",
                0.8,
                delivered=_delivered([1.0, 0.5, None], [0.9, 0.8, 0.0], [0.7, 0.6, 0.0], [0.7, 0.7, 0.7]),
            ),
            "cxr-natural-fedavg-fedstudent-newrec-s1": fake_result(
                "b", 0.8, delivered=_delivered([0.9, 0.7], [0.9, 0.9], [0.8, 0.8], [0.8, 0.7])
            ),
            "cxr-natural-fedavg-fedstudent-oldrec-s0": fake_result(
                "c", 0.8, delivered=_delivered([0.2, 0.2], [0.9, 0.9], [0.5, 0.5], [0.6, 0.6])
            ),
            "cxr-dirichlet-0.1-fedavg-fedstudent-newrec-s0": fake_result(
                "d", 0.8, delivered=_delivered([0.9, 0.9], [0.9, 0.9], [0.70, 0.80], [0.75, 0.80])
            ),
            "cxr-dirichlet-0.1-fedavg-fedstudent-newrec-s1": fake_result(
                "e", 0.8, delivered=_delivered([0.9, 0.9], [0.9, 0.9], [0.80, 0.80], [0.80, 0.80])
            ),
            # a students cell scored before operating points (no op figures): the target stays open
            "cxr-dirichlet-0.5-fedavg-fedstudent-s0": fake_result(
                "f",
                0.9,
                students=(0.8, 0.7),
                delivered={
                    "site_00": {"folder": "global_student", "delivered": "global", "auroc_macro": 0.9}
                },
            ),
        },
    )

    text = build_study_report(settings).read_text()

    targets = json.loads((settings.results / "study.json").read_text())["targets"]
    sens = targets["natural_covid_sensitivity"]
    assert sens["derived"] == pytest.approx([0.5, 0.8])
    assert sens["derived_mean"] == pytest.approx(0.65)
    assert sens["met"] is True  # > 0.5 on the mean of both seeds
    assert sens["reference"] == pytest.approx([0.0])  # the old recipe at the argmax, seed 0 only
    spec = targets["natural_covid_specificity"]
    assert spec["derived"] == pytest.approx([1.7 / 3, 0.9])
    assert spec["met"] is False  # mean 0.733 < 0.8
    gap = targets["delivered_student_vs_teacher_op_dirichlet_0.1"]
    assert gap["derived"] == pytest.approx([-0.025, 0.0])
    assert gap["met"] is True  # -0.0125 >= -0.02
    assert targets["delivered_student_vs_teacher_op"]["derived"] == []
    assert targets["delivered_student_vs_teacher_op"]["met"] is None
    section = text[text.index("## The recipe under label skew") : text.index("## Cells not run yet")]
    assert "- **newrec** (new recipe): the new recipe" in section
    assert "| natural | new recipe `newrec` | 0, 1 |" in section
    assert "| dirichlet-0.1 | old recipe `oldrec` | none |" in section
    assert "| 0.650 ± 0.212 (n=2) |" in section  # COVID-19 sensitivity at the sites' points
    assert "## What was tried" not in text  # the recipe attempts have their own section
    assert "`cxr-natural-fedavg-fedstudent-oldrec-s1`" in text[text.index("Cells not run yet") :]


def test_a_target_over_fewer_seeds_than_the_study_is_not_judged(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, tmp_path / "pool.csv", extra=RECIPE))
    _write_cells(
        settings,
        {
            "cxr-natural-fedavg-fedstudent-newrec-s0": fake_result(
                "a", 0.8, delivered=_delivered([0.9, 0.9], [0.9, 0.9], [0.8, 0.8], [0.8, 0.8])
            )
        },
    )

    text = build_study_report(settings).read_text()

    targets = json.loads((settings.results / "study.json").read_text())["targets"]
    assert targets["natural_covid_sensitivity"]["derived_mean"] == pytest.approx(0.9)
    assert targets["natural_covid_sensitivity"]["met"] is None
    assert "| met on 1 of 2 seeds |" in text


def test_real_weights_are_scored_at_the_site_point_as_the_site_decides(tmp_path: Path) -> None:
    """Untrained tiny models saved as a site saves them (no monkeypatching): the held-out
    figures at the site's point are those of the rule applied to the model's own outputs."""
    import torch
    from torch.utils.data import TensorDataset

    from common.checkpoint import save_model
    from common.export import model_metadata
    from common.models import build_model
    from common.operating_point import metrics_at

    config = ModelConfig(name="tiny-cnn")
    site = _site(tmp_path / "site_00", teacher_point=_point((0.0, 0.5, -0.5)))
    student, teacher = build_model(config, 3), build_model(config, 3)
    meta = model_metadata(config, TASK, 32, "student", operating_point=_point(STUDENT_SHIFT))
    save_model(student, site / "global_student" / "student.pt", metadata=meta)
    save_model(teacher, site / "global_teacher.pt")
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(12, 1, 32, 32, generator=generator)
    labels = torch.eye(3)[torch.arange(12) % 3]
    test = TensorDataset(images, labels)

    record = study_sites.score_site(site, config, config, test, TASK)

    outputs = study_sites.evaluate_state(config, student.state_dict(), test, TASK)
    expected = metrics_at(_point(STUDENT_SHIFT), outputs.scores, outputs.targets, TASK)
    assert record["op_balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"])
    assert record["op_sensitivity/covid-19"] == pytest.approx(expected["sensitivity/covid-19"])
    assert record["auroc_macro"] == pytest.approx(float(outputs.metrics.auroc_macro))
    teacher_outputs = study_sites.evaluate_state(config, teacher.state_dict(), test, TASK)
    teacher_expected = metrics_at(
        _point((0.0, 0.5, -0.5)), teacher_outputs.scores, teacher_outputs.targets, TASK
    )
    assert record["teacher_at_site"]["op_balanced_accuracy"] == pytest.approx(
        teacher_expected["balanced_accuracy"]
    )


def test_a_natural_split_recipe_is_what_the_natural_covid_targets_read(tmp_path: Path) -> None:
    natural = (
        RECIPE.replace('old = "oldrec"', 'old = "oldrec"\nnatural = "natrec"', 1)
        + """
[[attempts]]
name = "natrec"
about = "the natural split's recipe"
split = "natural"
kd = true
federated-student = true
run = { local-loss = "balanced-softmax" }
seeds = [0, 1]
"""
    )
    settings = load_settings(write_config(tmp_path, tmp_path / "pool.csv", extra=natural))
    good = _delivered([0.9, 0.7], [0.9, 0.9], [0.8, 0.8], [0.8, 0.7])
    bad = _delivered([0.1, 0.0], [1.0, 1.0], [0.5, 0.5], [0.5, 0.5])
    _write_cells(
        settings,
        {
            **{
                f"cxr-natural-fedavg-fedstudent-natrec-s{s}": fake_result("n", 0.8, delivered=good)
                for s in (0, 1)
            },
            **{
                f"cxr-natural-fedavg-fedstudent-newrec-s{s}": fake_result("o", 0.8, delivered=bad)
                for s in (0, 1)
            },
        },
    )

    text = build_study_report(settings).read_text()

    sens = json.loads((settings.results / "study.json").read_text())["targets"]["natural_covid_sensitivity"]
    assert sens["derived"] == pytest.approx([0.8, 0.8])
    assert sens["met"] is True
    section = text[text.index("## The recipe under label skew") : text.index("## Cells not run yet")]
    assert "- **natrec** (natural split): the natural split's recipe" in section
    assert "| natural | natural-split recipe `natrec` | 0, 1 |" in section
    assert "| natural | new recipe `newrec` | 0, 1 |" in section
    assert "| dirichlet-0.1 | natural-split recipe" not in section
