"""The real-data study's machinery (research/study/cells.py, study_report.py) on tiny synthetic data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import research.study.__main__ as study_cli
from common.data.sources import load_catalog
from common.errors import ConfigError, DataError
from common.tasks import get_task
from research.study.cells import Cell, load_settings, prepare, run_cell, table_cells, with_overrides
from research.study.report import build_study_report
from tests.study.helpers import fake_result, write_config, write_pool

REPO = Path(__file__).resolve().parents[2]


def test_the_checked_in_study_config_loads(shared_data: Path) -> None:
    settings = load_settings(REPO / "research" / "study" / "study.toml")

    assert settings.seeds == (0, 1, 2)
    assert settings.run["teacher-name"] == "resnet18"
    assert settings.datasets["cxr"].sources[0].path == (shared_data / "kermany-pneumonia").resolve()
    assert settings.results == REPO / "benchmarks" / "results"
    assert settings.dp_headline_epsilon in settings.dp_epsilons


@pytest.mark.parametrize(
    ("extra", "run", "named"),
    [
        ("colour = 1", "", "colour"),
        ("", "num-round = 3", "num-round"),
        ("", "kd-alpha = 2.0", "kd-alpha"),
        ("federated-student-rounds = 0", "", "federated-student-rounds"),
        ("[privacy.run]\nbatch-size = -1", "", "batch-size"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(tmp_path: Path, extra: str, run: str, named: str) -> None:
    config = write_config(tmp_path, tmp_path / "pool.csv", extra=extra, run=run)

    with pytest.raises(ConfigError, match=named):
        load_settings(config)


ATTEMPTS = """
[[attempts]]
name = "rounds4"
about = "twice the rounds"
pooled = true
run = { num-rounds = 4 }
seeds = [0, 1]

[[attempts]]
name = "kd3"
about = "more distillation"
kd = true
federated-student = true
run = { kd-epochs = 3, kd-federated-student-rounds = 2 }
"""


@pytest.mark.parametrize(
    ("attempt", "named"),
    [
        ('name = "x"\nrun = { num-round = 4 }', "num-round"),
        ('name = "x"\nrun = { num-rounds = 0 }', "num-rounds"),
        ('name = "x"\nrun = {}', "attempts\\[0\\].run"),
        ('name = "Not ok"\nrun = { num-rounds = 4 }', "attempts\\[0\\].name"),
        ('name = "x"\nsplit = "random"\nrun = { num-rounds = 4 }', "attempts\\[0\\].split"),
        ('name = "x"\nrounds = 4', "attempts\\[0\\].rounds"),
        ('name = "x"\nrun = { num-rounds = 4 }\nseeds = []', "attempts\\[0\\].seeds"),
        ('name = "x"\nrun = { num-rounds = 4 }\nseeds = 2', "attempts\\[0\\].seeds"),
        ('name = "x"\nrun = { num-rounds = 4 }\nseeds = [7]', "seeds of the attempt 'x'"),
        ('name = "x"\npretrained = true\nrun = { num-rounds = 4 }', "attempts\\[0\\].run.teacher-norm"),
        ('name = "x"\npretrained = "yes"\nrun = { teacher-norm = "group" }', "pretrained"),
        (
            'name = "x"\ncoordinator-holdout = true\nrun = { num-rounds = 4 }',
            "attempts\\[0\\].coordinator-holdout",
        ),
    ],
)
def test_bad_attempts_are_refused_naming_the_key(tmp_path: Path, attempt: str, named: str) -> None:
    config = write_config(tmp_path, tmp_path / "pool.csv", extra=f"[[attempts]]\n{attempt}\n")

    with pytest.raises(ConfigError, match=named):
        load_settings(config)


def test_two_attempts_with_one_name_are_refused(tmp_path: Path) -> None:
    twice = ATTEMPTS.replace('name = "kd3"', 'name = "rounds4"')
    with pytest.raises(ConfigError, match="rounds4"):
        load_settings(write_config(tmp_path, tmp_path / "pool.csv", extra=twice))


def test_an_attempt_is_its_base_cell_with_the_run_settings_changed(tmp_path: Path) -> None:
    from research.study.cells import cell_run_config

    settings = load_settings(write_config(tmp_path, tmp_path / "pool.csv", extra=ATTEMPTS))

    rounds, rounds_seed_1, kd = table_cells("attempts", settings)

    assert rounds_seed_1.name == "cxr-dirichlet-0.5-fedavg-rounds4-s1"  # its own seeds
    assert kd.seed == 0  # the study's first seed
    assert rounds.name == "cxr-dirichlet-0.5-fedavg-rounds4-s0"
    only_seed_1 = with_overrides(settings, None, None, [1])  # --seed 1
    assert [c.name for c in table_cells("attempts", only_seed_1)] == [
        "cxr-dirichlet-0.5-fedavg-rounds4-s1",
        "cxr-dirichlet-0.5-fedavg-fedstudent-kd3-s1",
    ]
    assert rounds.base.name == "cxr-dirichlet-0.5-fedavg-s0"
    assert kd.name == "cxr-dirichlet-0.5-fedavg-fedstudent-kd3-s0"
    assert kd.base.name == "cxr-dirichlet-0.5-fedavg-fedstudent-s0"
    assert rounds.pooled
    assert kd.federated_student
    assert cell_run_config(rounds, settings, 2)["num-rounds"] == 4
    assert cell_run_config(rounds.base, settings, 2)["num-rounds"] == 2
    kd_config = cell_run_config(kd, settings, 2)
    assert (kd_config["kd-epochs"], kd_config["kd-federated-student-rounds"]) == (3, 2)


def test_a_pretrained_attempt_starts_from_the_coordinators_public_teacher(tmp_path: Path) -> None:
    from research.study.cells import cell_run_config
    from research.study.privacy import public_weights

    attempt = '[[attempts]]\nname = "public-bsm"\nsplit = "natural"\npretrained = true\n'
    attempt += 'run = { teacher-norm = "group", local-loss = "balanced-softmax" }\n'
    settings = load_settings(write_config(tmp_path, tmp_path / "pool.csv", extra=attempt))

    (cell,) = table_cells("attempts", settings)

    config = cell_run_config(cell, settings, 4)
    assert config["teacher-weights"] == str(public_weights(settings.out, str(settings.run["teacher-name"])))
    assert (config["teacher-norm"], config["local-loss"]) == ("group", "balanced-softmax")
    assert cell.name == "cxr-natural-fedavg-public-bsm-s0"
    assert "select-on" not in config  # the sites select, as by default


def test_a_coordinator_holdout_attempt_selects_on_the_public_images_its_teacher_held_out(
    tmp_path: Path,
) -> None:
    from common.pretrain import split_manifest_paths
    from research.study.cells import cell_run_config
    from research.study.privacy import public_weights

    attempt = '[[attempts]]\nname = "public-holdout"\nsplit = "natural"\npretrained = true\n'
    attempt += 'coordinator-holdout = true\nrun = { teacher-norm = "group" }\n'
    settings = load_settings(write_config(tmp_path, tmp_path / "pool.csv", extra=attempt))

    (cell,) = table_cells("attempts", settings)

    config = cell_run_config(cell, settings, 4)
    train, holdout = split_manifest_paths(public_weights(settings.out, str(settings.run["teacher-name"])))
    assert config["select-on"] == "coordinator"
    assert (config["kd-public-manifest"], config["central-eval-manifest"]) == (str(train), str(holdout))


def test_the_report_sets_each_attempt_beside_its_base_cell(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, tmp_path / "pool.csv", extra=ATTEMPTS))
    cells = {
        "cxr-dirichlet-0.5-fedavg-s0": fake_result("a", 0.90, pooled=0.95),
        "cxr-dirichlet-0.5-fedavg-rounds4-s0": fake_result("b", 0.94, pooled=0.95),
        "cxr-dirichlet-0.5-fedavg-s1": fake_result("c", 0.80, pooled=1.0),
        "cxr-dirichlet-0.5-fedavg-rounds4-s1": fake_result("d", 0.90, pooled=1.0),
    }
    for name, record in cells.items():
        path = settings.out / "cells" / name / "result.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record))

    text = build_study_report(settings).read_text()

    section = text[text.index("## What was tried") : text.index("## Cells not run yet")]
    assert "- **rounds4**: twice the rounds" in section
    # means and standard deviations over the attempt's seeds, for the attempt and its base cells
    assert "| study settings (seed 0, 1) | 0.850 ± 0.071 (n=2) | 0.975 ± 0.035 (n=2) |" in section
    assert "| **rounds4**: num-rounds = 4 | 0.920 ± 0.028 (n=2) |" in section
    ratios = ((0.94 / 0.95 + 0.90) / 2, (0.90 / 0.95 + 0.80) / 2)
    assert f"| {ratios[0]:.3f} ± " in section
    assert f"| {ratios[1]:.3f} ± " in section
    assert not [row for row in section.splitlines() if row.startswith("|") and "kd3" in row]  # not run yet
    assert "`cxr-dirichlet-0.5-fedavg-fedstudent-kd3-s0`" in text[text.index("Cells not run yet") :]


def test_a_headline_epsilon_outside_the_list_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "pool.csv")
    config.write_text(config.read_text().replace("headline-epsilon = 8.0", "headline-epsilon = 1.0"))

    with pytest.raises(ConfigError, match="headline-epsilon"):
        load_settings(config)


def test_prepare_holds_out_a_patient_grouped_test_set_once(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, write_pool(tmp_path / "data")))

    prepared = prepare(settings, "cxr")

    task = get_task("normal-pneumonia-covid")
    test = load_catalog("manifest", prepared.test, task)
    pool = load_catalog("manifest", prepared.pool, task)
    assert abs(len(test) - 30) <= 2
    assert abs(len(pool) - 80) <= 2
    assert not {r.patient_id for r in test.records} & {r.patient_id for r in pool.records}
    assert not {r.key for r in test.records} & {r.key for r in pool.records}
    assert set(test.class_counts().values()) != {0}
    assert {r.site for r in pool.records} == {"hospital-0", "hospital-1"}
    assert prepared.info["patient_grouped"]
    assert prepared.info["holdout_seed"] == 0
    before = prepared.test.stat().st_mtime_ns
    assert prepare(settings, "cxr").test.stat().st_mtime_ns == before  # written once, then reused


def test_prepare_names_a_missing_source_and_an_impossible_size(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, write_pool(tmp_path / "data", n_patients=30)))

    with pytest.raises(DataError, match="no-such-folder"):
        prepare(settings, "nih")
    with pytest.raises(ConfigError, match="test-images \\+ pool-images"):
        prepare(settings, "cxr")  # 30 + 80 > 60 images
    assert not (settings.out / "data" / "cxr").exists()


def test_tables_share_cells_and_run_dp_rows_as_configured(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, tmp_path / "pool.csv"))

    splits = {c.name for c in table_cells("splits", settings)}
    headline = [c.name for c in table_cells("headline", settings)]
    privacy = [c.name for c in table_cells("privacy", settings)]

    assert len(splits) == 8
    assert len(headline) == 4
    assert len(set(headline)) == 4
    assert "cxr-dirichlet-0.5-fedavg-s0" in splits & set(headline)
    assert "cxr-natural-fedavg-s0" in splits & set(headline)
    assert sorted(privacy) == sorted(
        [
            "cxr-dirichlet-0.5-fedavg-gn-s0",
            "cxr-dirichlet-0.5-fedavg-dp8-s0",
            "cxr-dirichlet-0.5-fedavg-dp3-s0",
            "cxr-dirichlet-0.5-fedavg-gn-s1",
            "cxr-dirichlet-0.5-fedavg-dp8-s1",
        ]
    )
    assert [c.name for c in table_cells("students", settings)] == [
        "cxr-dirichlet-0.5-fedavg-fedstudent-s0",
        "cxr-dirichlet-0.5-fedavg-fedstudent-s1",
    ]
    with pytest.raises(ConfigError, match="table"):
        table_cells("everything", settings)


def test_report_judges_each_target_on_the_seed_means(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, tmp_path / "pool.csv"))

    def delivered(*scores: float) -> dict[str, object]:
        return {
            f"site_0{i}": {"folder": "global_student", "delivered": "global", "auroc_macro": v}
            for i, v in enumerate(scores)
        }

    cells = {
        "cxr-dirichlet-0.5-fedavg-s0": fake_result("a", 0.90, pooled=0.92, local=[0.8, 0.7]),
        "cxr-dirichlet-0.5-fedavg-s1": fake_result("b", 0.94, pooled=0.94, local=[0.8, 0.7]),
        "cxr-natural-fedavg-s0": fake_result("c", 0.80, local=[0.85, 0.6]),
        "cxr-dirichlet-0.5-fedavg-gn-s0": fake_result("d", 0.90),
        "cxr-dirichlet-0.5-fedavg-dp8-s0": fake_result("e", 0.87, dp_epsilon_spent={"site_00": 7.9}),
        # the students table: KD and no-KD site students, the federated and delivered students
        "cxr-dirichlet-0.5-fedavg-fedstudent-s0": fake_result(
            "f",
            0.90,
            students=(0.89, 0.85),
            federated_student={"auroc_macro": 0.895},
            delivered=delivered(0.895, 0.905),
        ),
        "cxr-dirichlet-0.5-fedavg-fedstudent-s1": fake_result(
            "g",
            0.94,
            students=(0.90, 0.91),
            federated_student={"auroc_macro": 0.93},
            delivered=delivered(0.93, 0.93),
        ),
    }
    for name, record in cells.items():
        path = settings.out / "cells" / name / "result.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record))

    report = build_study_report(settings)

    summary = json.loads((settings.results / "study.json").read_text())["targets"]
    # FedAvg/pooled ratios 0.978 and 1.0: mean 0.989 >= 0.98
    assert summary["fedavg_vs_pooled"]["derived_mean"] == pytest.approx((0.90 / 0.92 + 1.0) / 2)
    assert summary["fedavg_vs_pooled"]["met"] is True
    # 0.80 < 0.85, but only seed 0 ran: a target is judged over every seed of the study
    assert summary["natural_vs_best_local"]["met"] is None
    assert summary["kd_student_vs_teacher"]["derived_mean"] == pytest.approx(
        ((0.89 - 0.90) + (0.90 - 0.94)) / 2
    )
    assert summary["kd_student_vs_teacher"]["met"] is False
    # KD beats no KD on the mean (+0.015) but not in seed 1 (0.90 < 0.91): the target is every seed
    assert summary["kd_vs_no_kd"]["derived_mean"] == pytest.approx(((0.89 - 0.85) + (0.90 - 0.91)) / 2)
    assert summary["kd_vs_no_kd"]["met"] is False
    # delivered: mean of sites 0.900 (seed 0, teacher 0.90) and 0.930 (seed 1, teacher 0.94)
    assert summary["delivered_student_vs_teacher"]["derived"] == pytest.approx([0.0, -0.01])
    assert summary["delivered_student_vs_teacher"]["met"] is True
    assert "federated_student_vs_teacher" not in summary
    assert summary["dp_cost"]["derived_mean"] == pytest.approx(0.03)
    assert summary["dp_cost"]["met"] is None  # met on seed 0, seed 1 not run
    text = report.read_text()
    assert "**missed**" in text
    assert "| missed on 1 of 2 seeds |" in text
    assert "| met on 1 of 2 seeds |" in text
    assert "| epsilon 8 | 0.870 |" in text
    assert "Cells not run yet" in text
    assert "`cxr-iid-fedavg-s0`" in text
    for plot in ("study_splits.png", "study_students.png", "study_privacy.png"):
        assert (settings.results / plot).stat().st_size > 1000


def test_study_command_refuses_an_unknown_table(tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "pool.csv")

    result = CliRunner().invoke(study_cli.app, ["everything", "--config", str(config)])

    assert result.exit_code == 2
    assert "everything" in result.output
    assert "headline" in result.output


@pytest.mark.slow
def test_one_cell_runs_end_to_end_and_is_reused(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, write_pool(tmp_path / "data")))
    cell = Cell(
        "headline",
        "cxr",
        "dirichlet-0.5",
        "fedavg",
        0,
        kd=True,
        pooled=True,
        local=True,
        federated_student=True,
    )

    result = run_cell(cell, settings)

    test_size = result["test_images"]
    assert test_size >= 28
    assert set(result["teachers"]) == {"federated", "pooled", "local"}
    assert set(result["teachers"]["local"]) == {"site_00", "site_01"}
    assert set(result["students"]) == {"site_00", "site_01"}
    for scores in [
        result["teachers"]["federated"],
        result["teachers"]["pooled"],
        result["students"]["site_00"]["kd"],
        result["federated_student"],
    ]:
        assert scores["n"] == test_size
        assert 0.0 <= scores["auroc_macro"] <= 1.0
    # brightness encodes the label, so the federated teacher learns it
    assert result["teachers"]["federated"]["auroc_macro"] > 0.8
    assert run_cell(cell, settings) == result  # a finished cell is read back, not re-run
    assert result["run_config"]["kd-federated-student-rounds"] == 1  # kept for the staleness check


def test_a_cell_whose_federated_student_was_not_delivered_is_not_kept(tmp_path: Path) -> None:
    from research.study.cells import PreparedData, score_cell

    run_dir = tmp_path / "experiment" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(
        json.dumps({"federated_student": "not completed (federated student round 11: 4 site(s) replied)"})
    )
    cell = Cell("students", "cxr", "dirichlet-0.5", "fedavg", 0, kd=True, federated_student=True)
    data = PreparedData(tmp_path / "pool.csv", tmp_path / "test.csv", {})

    with pytest.raises(DataError, match=r"federated student was not delivered.*4 site"):
        score_cell(cell, tmp_path / "experiment", data)


def _finish_cell(
    settings: Any, cell: Cell, run_config: dict[str, Any] | None, *, in_experiment: bool = False
) -> Path:
    """A finished cell's folder whose result records ``run_config`` (or, as cells finished before
    results kept it, only the experiment's ``run/run_config.json``)."""
    folder = settings.out / "cells" / cell.name
    folder.mkdir(parents=True)
    result: dict[str, Any] = {"cell": {"name": cell.name}}
    if run_config is not None and in_experiment:
        (folder / "experiment" / "run").mkdir(parents=True)
        (folder / "experiment" / "run" / "run_config.json").write_text(json.dumps(run_config))
    elif run_config is not None:
        result["run_config"] = run_config
    (folder / "result.json").write_text(json.dumps(result))
    return folder


@pytest.mark.parametrize("in_experiment", [False, True])
def test_a_finished_cell_run_with_other_settings_is_refused_before_any_work(
    tmp_path: Path, in_experiment: bool
) -> None:
    from research.study.cells import cell_run_config, check_finished_cells

    settings = load_settings(write_config(tmp_path, tmp_path / "pool.csv"))
    students = table_cells("students", settings)
    ran_with = {**cell_run_config(students[0], settings, 2), "kd-federated-student-rounds": 10}
    folder = _finish_cell(settings, students[0], ran_with, in_experiment=in_experiment)

    with pytest.raises(DataError) as refused:
        check_finished_cells(students, settings)

    message = str(refused.value)
    assert str(folder) in message
    assert "kd-federated-student-rounds = 10 (now 1)" in message
    assert "Move or delete" in message


def test_how_a_finished_cell_ran_may_change_without_refusing_it(tmp_path: Path) -> None:
    from research.study.cells import cell_run_config, check_finished_cells, stale_settings

    settings = load_settings(write_config(tmp_path, tmp_path / "pool.csv"))
    cells = table_cells("students", settings)
    ran_with = {
        **cell_run_config(cells[0], settings, 2),
        "num-threads": 2,  # --cpus-per-site 2
        "cache-dir": "/elsewhere/cache",  # another --out
        "round-timeout": 3600.0,
        "min-train-sites": 2,
    }
    _finish_cell(settings, cells[0], ran_with)
    _finish_cell(settings, cells[1], None)  # no record of its settings: nothing to compare

    assert [stale_settings(cell, settings) for cell in cells[:2]] == [{}, {}]
    check_finished_cells(cells, settings)
    # the record is read: a setting of what the cell computes, changed with them, is refused
    headline = table_cells("headline", settings)[0]
    _finish_cell(settings, headline, {**cell_run_config(headline, settings, 2), "kd-epochs": 7})
    with pytest.raises(DataError, match="kd-epochs = 7"):
        check_finished_cells([*cells, headline], settings)


def test_the_study_command_refuses_stale_cells_without_a_traceback(tmp_path: Path) -> None:
    from research.study.cells import cell_run_config

    config = write_config(tmp_path, tmp_path / "pool.csv")
    settings = load_settings(config)
    cell = table_cells("headline", settings)[0]
    _finish_cell(settings, cell, {**cell_run_config(cell, settings, 2), "num-rounds": 7})

    result = CliRunner().invoke(study_cli.app, ["report", "--config", str(config)])

    assert result.exit_code == 2
    assert "num-rounds = 7 (now 2)" in result.output
    assert "Traceback" not in result.output
    assert not (settings.results / "study.md").exists()  # nothing written from the stale cell


def test_a_corrupt_finished_cell_is_named_with_the_fix(tmp_path: Path) -> None:
    from research.study.cells import check_finished_cells

    settings = load_settings(write_config(tmp_path, tmp_path / "pool.csv"))
    cells = table_cells("students", settings)
    folder = _finish_cell(settings, cells[0], None)
    (folder / "result.json").write_text('{"cell": ', encoding="utf-8")  # cut off mid-write

    with pytest.raises(DataError, match=r"result\.json: not a readable result.*delete the folder"):
        check_finished_cells(cells, settings)


def test_restore_resumes_a_fresh_clone_from_the_committed_cells(tmp_path: Path) -> None:
    from research.study.cells import cell_run_config
    from research.study.report import restore_cells

    settings = load_settings(write_config(tmp_path, tmp_path / "pool.csv"))
    done, stale = table_cells("headline", settings)[:2]
    committed = {
        done.name: {"cell": done.name, "run_config": cell_run_config(done, settings, 2)},
        stale.name: {
            "cell": stale.name,
            "run_config": {**cell_run_config(stale, settings, 2), "num-rounds": 7},
        },
    }
    settings.results.mkdir(parents=True)
    (settings.results / "study.json").write_text(json.dumps({"cells": committed}), encoding="utf-8")
    kept = _finish_cell(settings, stale, cell_run_config(stale, settings, 2))  # already in the work folder

    assert restore_cells(settings.out, settings.results) == 1
    restored = json.loads((settings.out / "cells" / done.name / "result.json").read_text())
    assert restored == committed[done.name]
    assert json.loads((kept / "result.json").read_text())["run_config"]["num-rounds"] != 7  # left as it was
    assert restore_cells(settings.out, settings.results) == 0

    (settings.results / "study.json").write_text(json.dumps({"cells": {"../escape": {}}}), encoding="utf-8")
    with pytest.raises(DataError, match="not a plain folder name"):
        restore_cells(settings.out, settings.results)
    assert not (settings.out / "escape").exists()


def test_restore_without_committed_results_is_one_line_exit_2(tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "pool.csv")

    result = CliRunner().invoke(study_cli.app, ["restore", "--config", str(config)])

    assert result.exit_code == 2
    assert "study.json: no study results to restore" in result.output
    assert "Traceback" not in result.output
