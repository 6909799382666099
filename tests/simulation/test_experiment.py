"""python -m simulation run / report and the default command: settings, bad input, whole runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import simulation.cli as cli
from common.errors import ConfigError, CxrFlError, UnknownNameError
from simulation.experiment import (
    Experiment,
    ExperimentConfig,
    PartitionSpec,
    SourceSpec,
    check_run_config,
    experiment_config,
)

TINY_RUN = {
    "teacher-name": "tiny-cnn",
    "image-size": 32,
    "num-rounds": 2,
    "batch-size": 16,
    "lr": 0.05,
    "kd-epochs": 1,
    "kd-width-mult": 0.35,
    "kd-federated-student-rounds": 1,
    "min-train-sites": 2,
    "min-evaluate-sites": 2,
    "min-available-sites": 2,
}
TINY_SOURCE = (SourceSpec("synthetic", None, {"n-images": "120", "image-size": "32"}),)


def _alive_with_env(marker: str) -> list[int]:
    """PIDs of live (non-zombie) processes whose environment mentions ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if stat[stat.rindex(")") + 2] == "Z":
                continue
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_the_simulation_checks_the_strategy_settings_too() -> None:
    with pytest.raises(UnknownNameError, match="fedavg"):
        check_run_config({"strategy": "fedbest"})
    with pytest.raises(ConfigError, match="proximal-mu"):
        check_run_config({"strategy": "fedprox"})
    assert check_run_config({"num-rounds": 5})["num-rounds"] == 5


def test_config_file_and_command_line_merge(tmp_path: Path) -> None:
    config = tmp_path / "exp.toml"
    config.write_text(
        'out = "runs/x"\nbaselines = true\n[[sources]]\nformat = "synthetic"\noptions = { n-images = "90" }\n'
        '[partition]\nname = "iid"\nsites = 4\n[run]\nnum-rounds = 7\nteacher-name = "tiny-cnn"\n'
    )
    resolved = experiment_config(
        config_file=config,
        out=None,
        sources=[],
        data=[],
        source_options=[],
        task=None,
        partition={"sites": 2},
        run_settings={"num-rounds": 3},
        dp_epsilon=8.0,
        baselines=None,
        set_items=["kd-alpha=0.5"],
        default_out=tmp_path / "default",
    )
    assert resolved.out == (Path("runs/x")).resolve()
    assert resolved.baselines is True
    assert resolved.sources == (SourceSpec("synthetic", None, {"n-images": "90"}),)
    assert resolved.partition == PartitionSpec(name="iid", sites=2)
    assert resolved.run_config == {
        "num-rounds": 3,
        "teacher-name": "tiny-cnn",
        "dp-enabled": True,
        "dp-target-epsilon": 8.0,
        "teacher-norm": "group",
        "kd-alpha": 0.5,
    }


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"sources": (SourceSpec("dicom-folder", "/tmp"),)}, UnknownNameError, "image-folder"),
        ({"partition": PartitionSpec(name="by-hospital")}, UnknownNameError, "dirichlet"),
        ({"partition": PartitionSpec(name="dirichlet", alpha=0.0)}, ConfigError, "alpha"),
        ({"partition": PartitionSpec(name="iid", sites=500)}, CxrFlError, "sites"),
        (
            {"sources": (SourceSpec("synthetic", None, {"class-weights": "1,1,0", "n-images": "60"}),)},
            CxrFlError,
            "covid-19",
        ),
        ({"run_config": {"teacher-name": "vit-huge"}}, UnknownNameError, "resnet18"),
    ],
)
def test_bad_input_fails_before_any_training(
    tmp_path: Path, change: dict[str, object], error: type[Exception], match: str
) -> None:
    settings: dict[str, object] = {
        "out": tmp_path / "exp",
        "sources": TINY_SOURCE,
        "run_config": dict(TINY_RUN),
    }
    settings.update(change)
    experiment = Experiment(ExperimentConfig(**settings))  # type: ignore[arg-type]

    with pytest.raises(error, match=match):
        experiment.prepare()

    assert not (tmp_path / "exp" / "run").exists()


def test_cli_reports_a_user_error_without_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.app, ["run", "--out", str(tmp_path / "x"), "--partition", "nope"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "dirichlet" in result.output


def test_default_command_runs_a_whole_federation_and_leaves_no_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "demo"
    monkeypatch.setattr(cli, "DEMO_RUN_CONFIG", dict(TINY_RUN))
    monkeypatch.setattr(cli, "DEMO_SOURCES", TINY_SOURCE)
    public = {"n-images": "40", "image-size": "32", "seed": "1"}
    monkeypatch.setattr(cli, "DEMO_PUBLIC_SOURCES", (SourceSpec("synthetic", None, public),))
    monkeypatch.setattr(cli, "DEMO_MIN_SITE_SIZE", 5)  # the tiny source has 60 patients
    monkeypatch.setattr(cli, "_default_out", lambda: out)

    result = CliRunner().invoke(cli.app, [])

    assert result.exit_code == 0, result.output
    assert "report:" in result.output
    lines = result.output.splitlines()  # piped: one plain line per stage and round, as they happen
    assert any(line.startswith("round 1/2: 3/3 sites, ") for line in lines), result.output
    assert any(line.startswith("round 2/2 validation: 3 sites, val auroc_macro ") for line in lines)
    assert any(line.startswith("student round 1/1: 3 sites, ") for line in lines)
    report = out / "report"
    text = (report / "report.md").read_text()
    assert text.index("## Claims") < text.index("## Run")
    for heading in (
        "Check before delivery",
        "Global teacher per round",
        "Final teacher vs baselines",
        "Teacher and student at each site",
        "Deployable students",
    ):
        assert heading in text
    results = json.loads((report / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert 0.0 <= results["baselines"]["pooled"]["pooled_test"]["auroc_macro"] <= 1.0
    assert 0.0 <= results["baselines"]["federated"]["pooled_test"]["op_balanced_accuracy"] <= 1.0
    assert all("student_op_balanced_accuracy" in row for row in results["delivered"])
    assert [c["name"] for c in results["claims"]] == [
        "teacher_vs_pooled",
        "students_vs_teacher",
        "kd_vs_nokd",
    ]
    assert "(" in results["claims"][0]["sentence"]  # the teacher claim has its interval
    assert (out / "baselines_scores.npz").is_file()
    assert (out / "site_scores.npz").is_file()
    # the report's rescoring of the sites' models reproduces their own figures: paired intervals
    students = results["claims"][1]["figures"]["auroc_macro"]
    assert students["interval_over"] == "over the sites' test images", results["claims"][1]
    assert results["baselines"]["local"] == {}  # the demo leaves the local-only teachers out (time)
    # every teacher started from the coordinator's public pretraining, scored alone beside them
    resolved = json.loads((out / "experiment.json").read_text())["resolved_run_config"]
    assert resolved["teacher-weights"] == str(out.resolve() / "public" / "teacher.pt")
    assert 0.0 <= results["baselines"]["start"]["pooled_test"]["auroc_macro"] <= 1.0
    assert "start alone (coordinator's public pretraining)" in text
    assert "publicly pretrained start, which alone scores macro-AUROC" in results["claims"][0]["sentence"]
    assert {r["site"] for r in results["distillation"]} == {"site_00", "site_01", "site_02"}
    for name in ("label_distribution.png", "learning_curves.png", "per_site.png", "student_vs_teacher.png"):
        assert (report / name).stat().st_size > 1000, name
    assert list((report / "gradcam").glob("*.png"))
    assert (out / "experiment.json").is_file()
    # the students started from the coordinator's student, distilled on the "public" images
    start = json.loads((out / "run" / "summary.json").read_text())["students_start"]
    public_images = len((out / "public" / "site_00.csv").read_text().splitlines()) - 1
    assert 0 < start["images"] < public_images == 40  # a tenth held out to measure the agreement
    assert 0.0 <= start["agreement_with_teacher"] <= 1.0
    assert (out / "run" / "checkpoints" / "public_student.pt").is_file()
    assert _alive_with_env(str(out / "flower" / "flwr-home")) == []

    rebuilt = CliRunner().invoke(cli.app, ["report", str(out)])
    assert rebuilt.exit_code == 0, rebuilt.output


def test_the_default_federation_takes_a_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[ExperimentConfig] = []

    def capture(config: ExperimentConfig) -> Path:
        seen.append(config)
        return tmp_path / "report.md"

    monkeypatch.setattr(cli, "run_experiment_with_progress", capture)
    monkeypatch.setattr(cli, "_default_out", lambda: tmp_path / "demo")

    result = CliRunner().invoke(cli.app, ["--seed", "7"])

    assert result.exit_code == 0, result.output
    (config,) = seen
    assert config.partition.seed == 7
    assert config.run_config["seed"] == 7
    assert config.partition.min_site_size == cli.DEMO_MIN_SITE_SIZE
    assert cli.DEMO_RUN_CONFIG["test-fraction"] == 0.55  # >= 200 test images at every site
