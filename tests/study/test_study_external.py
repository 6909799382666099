"""The study's leave-one-source-out table (research/study/external.py) on tiny synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.bootstrap import percentile_interval, stratified_weights, weighted_auroc
from common.errors import ConfigError, DataError
from research.study.cells import (
    Cell,
    cell_run_config,
    load_settings,
    prepare,
    run_cell,
    table_cells,
)
from research.study.external import Holdout, interval_scores, read_rows, split_external
from research.study.report import build_study_report
from tests.study.helpers import CLASSES, write_config, write_manifest

# (site, label of its patients): two one-class COVID sources, a one-class normal source and a
# two-class hospital holding the only pneumonia images, as in the study's real pool
SOURCES = (
    ("covid-a", ("covid-19",)),
    ("covid-b", ("covid-19",)),
    ("normals", ("normal",)),
    ("hospital", ("normal", "pneumonia")),
)


def _write_sources(folder: Path, patients_per_source: int = 24) -> Path:
    """A manifest of the SOURCES, two images per patient."""
    patients = [
        (site, f"{site}-{patient:03d}", labels[patient % len(labels)])
        for site, labels in SOURCES
        for patient in range(patients_per_source)
    ]
    return write_manifest(folder, patients)


EXTERNAL = """
[external]
bootstrap = 200
bootstrap-seed = 3

[[external.holdouts]]
name = "covid-a"
site = "covid-a"

[[external.holdouts]]
name = "hospital-normal"
site = "hospital"
classes = ["normal"]

[[external.variants]]
name = "equalized"
about = "histogram equalisation"
run = { preprocess-equalize = true }
"""


def _write_config(tmp_path: Path, manifest: Path, external: str = EXTERNAL) -> Path:
    return write_config(tmp_path, manifest, test_images=60, pool_images=132, epsilons="[8.0]", tail=external)


def test_external_cells_are_named_by_the_cell_scheme(tmp_path: Path) -> None:
    settings = load_settings(_write_config(tmp_path, tmp_path / "pool.csv"))

    cells = table_cells("external", settings)

    assert [c.name for c in cells] == [
        "cxr-dirichlet-0.5-fedavg-fedstudent-without-covid-a-s0",
        "cxr-dirichlet-0.5-fedavg-fedstudent-without-hospital-normal-s0",
        "cxr-dirichlet-0.5-fedavg-fedstudent-equalized-without-covid-a-s0",
        "cxr-dirichlet-0.5-fedavg-fedstudent-equalized-without-hospital-normal-s0",
    ]
    assert all(c.kd and c.federated_student and c.holdout for c in cells)
    assert dict(cells[2].overrides) == {"preprocess-equalize": True}
    config = cell_run_config(cells[2], settings, 2)
    assert config["preprocess-equalize"] is True
    assert config["kd-enabled"] is True
    assert config["kd-no-kd-baseline"] is False  # the external table needs no no-KD twins
    assert config["kd-federated-student-rounds"] == settings.federated_student_rounds
    assert "preprocess-equalize" not in cell_run_config(cells[0], settings, 2)
    assert cells[2].base.name == cells[0].name  # the variant set beside the study's settings
    # the cell name is derived from the Cell's fields, never re-spelled
    assert Cell("", "cxr", "dirichlet-0.5", "fedavg", 0, federated_student=True, holdout="covid-a").name == (
        cells[0].name
    )


def test_no_external_table_means_no_cells(tmp_path: Path) -> None:
    settings = load_settings(_write_config(tmp_path, tmp_path / "pool.csv", external=""))

    assert table_cells("external", settings) == []


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ("[external]\ncolour = 1", "external.colour"),
        ('[[external.holdouts]]\nname = "Bad Name"\nsite = "x"', "external.holdouts\\[0\\].name"),
        ('[[external.holdouts]]\nname = "x"', "external.holdouts\\[0\\].site"),
        ('[[external.holdouts]]\nname = "x"\nsite = "x"\nclasses = ["flu"]', "holdouts\\[0\\].classes"),
        ('[[external.holdouts]]\nname = "x"\nsite = "x"\n[[external.holdouts]]\nname = "x"\nsite = "y"', "x"),
        ('[[external.variants]]\nname = "v"\nrun = { num-round = 2 }', "num-round"),
        ('[[external.variants]]\nname = "v"\nrun = {}', "external.variants\\[0\\].run"),
        ("[external]\nbootstrap = 0", "external.bootstrap"),
        ("[external]\nseeds = [7]", "external.seeds"),
    ],
)
def test_bad_external_settings_are_refused_naming_the_key(tmp_path: Path, table: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(_write_config(tmp_path, tmp_path / "pool.csv", external=table))


@pytest.fixture
def prepared(tmp_path: Path) -> tuple[object, object]:
    settings = load_settings(_write_config(tmp_path, _write_sources(tmp_path / "data")))
    return settings, prepare(settings, "cxr")


def test_a_held_out_source_never_reaches_the_training_pool(prepared: tuple, tmp_path: Path) -> None:
    _, data = prepared
    holdout = Holdout("covid-a", "covid-a")

    split = split_external(holdout, data.pool, data.test, tmp_path / "cell", CLASSES)

    train = read_rows(split.pool)
    assert train
    assert not any(r["site"] == "covid-a" for r in train)
    assert {r["label"] for r in train} == set(CLASSES)  # covid-b still teaches COVID-19
    pool_ids = {r["patient_id"] for r in read_rows(data.pool)}
    external = read_rows(split.external)
    # the slice: every held-out covid-a image; paired with the other classes of the other
    # sources' held-out images, never the other COVID source and never a pool image
    test = read_rows(data.test)
    assert {r["path"] for r in external if r["site"] == "covid-a"} == {
        r["path"] for r in test if r["site"] == "covid-a"
    }
    assert {r["site"] for r in external} == {"covid-a", "normals", "hospital"}
    assert {r["label"] for r in external if r["site"] != "covid-a"} == {"normal", "pneumonia"}
    assert not {r["patient_id"] for r in external} & pool_ids
    comp = split.composition
    assert comp["slice_classes"] == ["covid-19"]
    assert comp["external"]["images"] == len(external)
    assert comp["external_slice"]["by_source"] == {
        "covid-a": {"covid-19": sum(r["site"] == "covid-a" for r in test)}
    }
    paired = comp["external_paired"]
    assert paired["images"] + comp["external_slice"]["images"] == len(external)
    assert set(paired["by_class"]) == {"normal", "pneumonia"}
    assert sum(sum(v.values()) for v in paired["by_source"].values()) == paired["images"]
    # the in-distribution reference: the held-out images of every training source
    in_dist = read_rows(split.in_distribution)
    assert {r["site"] for r in in_dist} == {"covid-b", "normals", "hospital"}
    assert len(in_dist) == len(test) - comp["external_slice"]["images"]


def test_a_slice_of_a_source_leaves_its_other_classes_in_the_pool(prepared: tuple, tmp_path: Path) -> None:
    _, data = prepared

    split = split_external(
        Holdout("hospital-normal", "hospital", ("normal",)), data.pool, data.test, tmp_path / "c", CLASSES
    )

    train = read_rows(split.pool)
    assert not any(r["site"] == "hospital" and r["label"] == "normal" for r in train)
    assert any(r["site"] == "hospital" and r["label"] == "pneumonia" for r in train)
    external = read_rows(split.external)
    assert {r["label"] for r in external if r["site"] == "hospital"} == {"normal", "pneumonia"}
    assert {r["label"] for r in external if r["site"] != "hospital"} == {"covid-19"}
    assert {r["label"] for r in external if r["site"] == "normals"} == set()  # not the slice's class


def test_a_holdout_that_would_empty_a_class_is_refused_in_one_line(prepared: tuple, tmp_path: Path) -> None:
    _, data = prepared

    with pytest.raises(DataError, match="no 'pneumonia' image to train on") as caught:
        split_external(Holdout("hospital", "hospital"), data.pool, data.test, tmp_path / "c", CLASSES)
    assert "\n" not in str(caught.value)
    with pytest.raises(DataError, match="no image of the pool has site 'elsewhere'"):
        split_external(Holdout("x", "elsewhere"), data.pool, data.test, tmp_path / "c", CLASSES)
    assert not (tmp_path / "c").exists()


def test_the_intervals_are_those_of_common_bootstrap(prepared: tuple, tmp_path: Path) -> None:
    import torch
    from torch.utils.data import DataLoader

    from common.config import ModelConfig
    from common.local import load_eval_dataset, site_data_request
    from common.models import build_model
    from common.run_settings import run_settings_from_config
    from common.tasks import get_task
    from common.training import evaluate

    _, data = prepared
    split = split_external(Holdout("covid-a", "covid-a"), data.pool, data.test, tmp_path / "c", CLASSES)
    task = get_task("normal-pneumonia-covid")
    run = run_settings_from_config({"image-size": 32, "cache-dir": str(tmp_path / "cache")})
    dataset = load_eval_dataset(
        site_data_request(run.run, task, "manifest", split.external, tmp_path / "cache", whole=True)
    )
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny-cnn", width_mult=0.35), task.num_classes)

    scores = interval_scores(model, dataset, task, slice_classes=["covid-19"], n_bootstrap=200, seed=3)

    plain = evaluate(model, DataLoader(dataset, batch_size=64), task)
    truth = plain.targets.argmax(axis=1)
    weights = stratified_weights(truth, 200, 3)
    k = task.classes.index("covid-19")
    expected = percentile_interval(
        float(weighted_auroc(truth == k, plain.scores[:, k], np.ones((1, len(truth))))[0]),
        weighted_auroc(truth == k, plain.scores[:, k], weights),
    )
    assert scores["slice_auroc"]["covid-19"] == pytest.approx(expected.to_dict())
    assert scores["n"] == len(dataset)
    assert scores["bootstrap"] == {"resamples": 200, "seed": 3, "level": 0.95, "method": "percentile"}
    macro = scores["auroc_macro"]
    assert macro["low"] <= macro["value"] <= macro["high"]


def _interval(value: float) -> dict[str, float]:
    return {"value": value, "low": value - 0.05, "high": value + 0.04, "resamples": 200}


def _fake_external(teacher: float, student: float) -> dict[str, object]:
    def scores(ext: float, ind: float) -> dict[str, object]:
        return {
            "external": {"auroc_macro": _interval(ext), "slice_auroc": {"covid-19": _interval(ext - 0.1)}},
            "in_distribution": {"auroc_macro": _interval(ind), "slice_auroc": {"covid-19": _interval(ind)}},
        }

    def comp(n: int) -> dict[str, object]:
        return {"images": n, "by_class": {"covid-19": n}, "by_source": {"covid-a": {"covid-19": n}}}

    delivered = {"folder": "global_student", "delivered": "global", "sha256": "ab", **scores(student, 0.9)}
    return {
        "cell": {"name": "x"},
        "composition": {
            "slice_classes": ["covid-19"],
            "pool": comp(100),
            "left_out_of_pool": comp(20),
            "external": comp(30),
            "external_slice": comp(10),
            "external_paired": {
                "images": 20,
                "by_class": {"normal": 12, "pneumonia": 8},
                "by_source": {"normals": {"normal": 6}, "hospital": {"normal": 6, "pneumonia": 8}},
            },
            "in_distribution": comp(50),
        },
        "teachers": {"federated": scores(teacher, 0.95)},
        "delivered": {"site_00": delivered, "site_01": delivered},
        "seconds": {"federated": 1.0, "total": 2.0},
    }


def test_the_report_gives_each_external_cell_with_its_intervals(tmp_path: Path) -> None:
    settings = load_settings(_write_config(tmp_path, tmp_path / "pool.csv"))
    name = "cxr-dirichlet-0.5-fedavg-fedstudent-without-covid-a-s0"
    variant = "cxr-dirichlet-0.5-fedavg-fedstudent-equalized-without-covid-a-s0"
    for cell, record in ((name, _fake_external(0.71, 0.66)), (variant, _fake_external(0.81, 0.76))):
        path = settings.out / "cells" / cell / "result.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record))

    report = build_study_report(settings).read_text()

    assert "## Leave-one-source-out (external validity)" in report
    teacher_row = (
        "| without covid-a (seed 0) | FedAvg teacher | 0.710 (0.660-0.750) | covid-19 0.610 (0.560-0.650) |"
    )
    assert teacher_row in report
    student_row = "| without covid-a, **equalized** (seed 0) | delivered student (global; every site) | 0.760"
    assert student_row in report
    assert "normals: normal 6; hospital: normal 6, pneumonia 8" in report
    assert "`cxr-dirichlet-0.5-fedavg-fedstudent-without-hospital-normal-s0`" in report  # not run yet
    table = json.loads((settings.results / "study.json").read_text())["tables"]["external"]
    assert [row["cell"] for row in table] == [name, variant]
    first = table[0]
    assert (first["holdout"], first["variant"], first["run"]) == ("covid-a", "", {})
    assert first["models"]["FedAvg teacher"]["external"]["auroc_macro"]["value"] == 0.71
    assert first["models"]["delivered student (global; every site)"]["in_distribution"]["auroc_macro"][
        "value"
    ] == pytest.approx(0.9)
    assert table[1]["run"] == {"preprocess-equalize": True}


@pytest.mark.slow
def test_an_external_cell_runs_end_to_end(prepared: tuple) -> None:
    settings, _ = prepared
    cell = table_cells("external", settings)[2]  # without covid-a, with histogram equalisation
    assert cell.variant == "equalized"

    result = run_cell(cell, settings)

    comp = result["composition"]
    assert comp["left_out_of_pool"]["by_source"].keys() == {"covid-a"}
    assert "covid-a" not in comp["pool"]["by_source"]
    teacher = result["teachers"]["federated"]
    for part in ("external", "in_distribution"):
        interval = teacher[part]["slice_auroc"]["covid-19"]
        assert interval["low"] <= interval["value"] <= interval["high"]
        assert teacher[part]["n"] == comp[part]["images"]
    assert set(result["delivered"]) == {"site_00", "site_01"}
    # every site trained and exported with equalisation: the delivered model says so
    run_dir = settings.out / "cells" / cell.name / "experiment" / "run"
    for site, delivered in result["delivered"].items():
        prep = run_dir / "sites" / site / delivered["folder"] / "student.preprocessing.json"
        assert json.loads(prep.read_text())["equalize"] is True
    assert run_cell(cell, settings) == result


def test_a_variant_with_a_bad_option_value_stops_the_command_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import research.study.__main__ as study_cli

    variant = '[[external.variants]]\nname = "v"\nrun = { augment = "wild" }'
    config = _write_config(tmp_path, tmp_path / "pool.csv", external=variant)

    result = CliRunner().invoke(study_cli.app, ["external", "--config", str(config)])

    assert result.exit_code == 2
    assert "augment" in result.output
    assert "default, strong" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.realdata
def test_every_checked_in_holdout_splits_the_real_pool(shared_data: Path, tmp_path: Path) -> None:
    """The holdouts of research/study/study.toml name real sources; each leaves every class to train on."""
    from dataclasses import replace

    from common.tasks import get_task

    repo = Path(__file__).resolve().parents[2]
    settings = load_settings(repo / "research" / "study" / "study.toml")
    small = replace(settings.datasets["cxr"], test_images=400, pool_images=800, drop_duplicates=False)
    settings = replace(settings, out=tmp_path / "out", datasets={**settings.datasets, "cxr": small})
    data = prepare(settings, "cxr")
    classes = get_task(small.task).classes

    for holdout in settings.external.holdouts:
        split = split_external(holdout, data.pool, data.test, tmp_path / holdout.name, classes)

        comp = split.composition
        assert set(comp["pool"]["by_class"]) == set(classes), holdout.name
        assert holdout.site not in comp["pool"]["by_source"] or holdout.classes, holdout.name
        assert comp["external_slice"]["images"] > 0, holdout.name
        assert set(comp["external_slice"]["by_source"]) == {holdout.site}, holdout.name
        assert len(comp["external"]["by_class"]) >= 2, holdout.name
