"""``cxr-fl-server pretrain`` and starting a federation from its weights file (hash checked)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from common.checkpoint import load_model_state, sha256_file
from common.errors import IntegrityError
from common.initial_teacher import build_initial_teacher, weights_sha256
from common.local import initial_teacher_state
from common.run_settings import load_schema, run_settings_from_config
from server.app import initial_teacher
from server.cli import app
from server.initial_teacher import prepare_initial_teacher
from tests.common.data.helpers import write_csv, write_image
from tests.helpers import flower_run_config

runner = CliRunner()
TINY = ["--set", 'teacher-name="tiny-cnn"', "--set", "image-size=32", "--set", "batch-size=16"]


def _pretrain(out: Path, *extra: str) -> object:
    return runner.invoke(
        app,
        ["pretrain", "--out", str(out), "--epochs", "1", *TINY, *extra],
    )


def _synthetic(out: Path, *extra: str) -> object:
    return _pretrain(out, "--source", "synthetic", "-o", "n-images=40", *extra)


@pytest.fixture(scope="module")
def synthetic_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "teacher.pt"
    result = _synthetic(out)
    assert result.exit_code == 0, result.output
    return out


def test_pretrain_writes_weights_and_a_sidecar_that_describes_them(synthetic_teacher: Path) -> None:
    meta = json.loads(synthetic_teacher.with_name("teacher.pt.json").read_text(encoding="utf-8"))
    state = load_model_state(synthetic_teacher)  # the .sha256 beside it verifies

    assert meta["weights_sha256"] == weights_sha256(state)
    assert meta["file_sha256"] == sha256_file(synthetic_teacher)
    assert meta["task"] == "normal-pneumonia-covid"
    assert meta["num_outputs"] == 3
    assert meta["teacher"] == {
        "name": "tiny-cnn",
        "norm": "batch",
        "in_channels": 1,
        "width_mult": 1.0,
        "dropout": 0.2,
    }
    assert meta["image_size"] == 32
    assert [s["id"] for s in meta["sources"]] == ["synthetic"]
    assert meta["sources"][0]["images"] == 40 == meta["images"]["train"] + meta["images"]["val"]
    assert meta["images"]["val"] > 0
    assert meta["training"]["epochs"] == 1
    assert meta["training"]["differential_privacy"] is False
    assert "val_loss" in meta["val_metrics"]
    assert "holdout_manifest" not in meta["split"]  # synthetic images have no files to list
    assert not synthetic_teacher.with_name("teacher.pt.holdout.csv").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "no-such-format"], "no-such-format"),
        (["--source", "image-folder"], "image-folder"),  # a source that needs --data
        (["--source", "synthetic", "--exclude-manifest", "missing.csv"], "missing.csv"),
        (["--source", "synthetic", "--set", "dp-enabled=true", "--set", 'teacher-norm="group"'], "public"),
        (["--source", "synthetic", "--epochs", "0"], "--epochs"),
        (["--source", "synthetic", "--set", "num-round=2"], "num-round"),
    ],
)
def test_pretrain_refuses_bad_input_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "teacher.pt"
    result = runner.invoke(app, ["pretrain", "--out", str(out), *TINY, *args])

    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_pretrain_does_not_replace_a_file_unless_asked(synthetic_teacher: Path) -> None:
    before = sha256_file(synthetic_teacher)

    result = _synthetic(synthetic_teacher)

    assert result.exit_code == 2
    assert "--overwrite" in result.output
    assert sha256_file(synthetic_teacher) == before


def _public_and_pool(tmp_path: Path) -> tuple[Path, Path]:
    """An image-folder public set, and a manifest (a site's pool) holding copies of two of its images."""
    public = tmp_path / "public"
    for i in range(12):
        write_image(public / ("normal" if i % 2 else "pneumonia") / f"img{i}.png", seed=i, size=(40, 40))
    pool = tmp_path / "pool"
    pool.mkdir()
    rows = []
    for i in (0, 3):  # the same pixels under another name
        label = "normal" if i % 2 else "pneumonia"
        shutil.copy(public / label / f"img{i}.png", pool / f"copy{i}.png")
        rows.append((f"copy{i}.png", label))
    for i in range(100, 104):
        write_image(pool / f"own{i}.png", seed=i, size=(40, 40))
        rows.append((f"own{i}.png", "normal"))
    manifest = write_csv(pool / "pool.csv", ("path", "label"), rows)
    return public, manifest


def test_pretrain_refuses_images_that_a_given_manifest_also_holds(tmp_path: Path) -> None:
    public, manifest = _public_and_pool(tmp_path)
    out = tmp_path / "teacher.pt"
    args = ["--source", "image-folder", "--data", str(public), "--task", "normal-pneumonia"]

    refused = _pretrain(out, *args, "--exclude-manifest", str(manifest))
    assert refused.exit_code == 2, refused.output
    assert "2 pretraining image(s) are exact copies" in refused.output
    assert "--drop-overlap" in refused.output
    assert not out.exists()

    dropped = _pretrain(out, *args, "--exclude-manifest", str(manifest), "--drop-overlap")
    assert dropped.exit_code == 0, dropped.output
    meta = json.loads(out.with_name("teacher.pt.json").read_text(encoding="utf-8"))
    assert meta["images"]["dropped_overlap"] == 2
    assert meta["images"]["train"] + meta["images"]["val"] == 10
    assert meta["overlap_checks"][0]["overlapping_images"] == 2
    assert meta["overlap_checks"][0]["manifest_images"] == 6
    # the images it trained on and those it held out, for the coordinator's central-eval-manifest
    train, holdout = (out.with_name(meta["split"][key]) for key in ("train_manifest", "holdout_manifest"))
    train_paths, holdout_paths = (set(_manifest_paths(m)) for m in (train, holdout))
    assert (len(train_paths), len(holdout_paths)) == (meta["images"]["train"], meta["images"]["val"])
    assert not train_paths & holdout_paths
    assert {Path(p).name for p in train_paths | holdout_paths}.isdisjoint({"img0.png", "img3.png"})


def _manifest_paths(manifest: Path) -> list[str]:
    with manifest.open(newline="", encoding="utf-8") as handle:
        return [row["path"] for row in csv.DictReader(handle)]


def _run_overrides(**extra: object) -> dict[str, object]:
    return {"teacher-name": "tiny-cnn", "image-size": 32, **extra}


def test_start_takes_the_file_and_the_run_carries_its_hash(synthetic_teacher: Path) -> None:
    overrides = _run_overrides()

    teacher, notes = prepare_initial_teacher(overrides, load_schema(), synthetic_teacher)  # type: ignore[misc]

    meta = json.loads(synthetic_teacher.with_name("teacher.pt.json").read_text(encoding="utf-8"))
    assert overrides["teacher-weights"] == str(synthetic_teacher.resolve())
    assert overrides["initial-teacher-sha256"] == meta["weights_sha256"] == teacher.sha256
    assert teacher.reset == ()
    assert notes == []
    resumed = dict(overrides)  # --resume reads these back; naming the same file again is fine
    assert prepare_initial_teacher(resumed, load_schema(), synthetic_teacher) is not None
    assert resumed == overrides
    settings = run_settings_from_config(
        flower_run_config(**{k.replace("-", "_"): v for k, v in overrides.items()})
    )
    sent = initial_teacher(settings).to_torch_state_dict()
    assert weights_sha256(sent) == meta["weights_sha256"]
    # the baselines' initial teacher (common/local.py) is the same model
    assert weights_sha256(initial_teacher_state(settings.teacher, settings.task, settings.train.seed)) == (
        teacher.sha256
    )


def test_the_server_refuses_a_file_whose_teacher_lacks_the_runs_hash(
    synthetic_teacher: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.pt"
    state = load_model_state(synthetic_teacher)
    state["head.1.bias"] = state["head.1.bias"] + 0.5  # one changed number
    torch.save(state, other)
    meta = json.loads(synthetic_teacher.with_name("teacher.pt.json").read_text(encoding="utf-8"))
    config = flower_run_config(
        teacher_name="tiny-cnn",
        image_size=32,
        teacher_weights=str(other),
        initial_teacher_sha256=meta["weights_sha256"],
    )

    with pytest.raises(IntegrityError, match="weights sha256"):
        initial_teacher(run_settings_from_config(config))


def test_start_refuses_a_tampered_file_or_a_wrong_hash_before_the_superlink(
    synthetic_teacher: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "teacher.pt"
    for suffix in ("", ".sha256", ".json"):
        shutil.copy(str(synthetic_teacher) + suffix, str(copy) + suffix)
    start = ["start", "--insecure", "--initial-teacher", str(copy), *TINY]

    wrong = runner.invoke(
        app, [*start, "--run-dir", str(tmp_path / "a"), "--set", f'initial-teacher-sha256="{"0" * 64}"']
    )
    assert wrong.exit_code == 2, wrong.output
    assert "weights sha256" in wrong.output
    assert not (tmp_path / "a" / "deploy.json").exists()

    with copy.open("r+b") as handle:  # damage the file after it was written
        handle.seek(-8, 2)
        handle.write(b"\0" * 8)
    damaged = runner.invoke(app, [*start, "--run-dir", str(tmp_path / "b")])
    assert damaged.exit_code == 2, damaged.output
    assert "changed or damaged" in damaged.output
    assert not (tmp_path / "b" / "deploy.json").exists()


def test_start_refuses_a_file_made_for_another_architecture(synthetic_teacher: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "start",
            "--insecure",
            "--run-dir",
            str(tmp_path / "run"),
            "--initial-teacher",
            str(synthetic_teacher),
            *TINY,
            "--set",
            'teacher-norm="group"',
        ],
    )
    assert result.exit_code == 2, result.output
    assert "teacher-norm" in result.output
    assert "'batch'" in result.output


def _nih_layout(root: Path, n: int = 16) -> Path:
    findings = ["Effusion", "No Finding", "Mass|Effusion", "Cardiomegaly"]
    header = (
        "Image Index",
        "Finding Labels",
        "Follow-up #",
        "Patient ID",
        "Patient Age",
        "Patient Gender",
        "View Position",
    )
    rows = []
    for i in range(n):
        name = f"{i:08d}_000.png"
        write_image(root / "images" / name, seed=i, size=(40, 40))
        rows.append((name, findings[i % len(findings)], 0, i, 50, "F", "PA"))
    write_csv(root / "Data_Entry_2017_v2020.csv", header, rows)
    return root


def test_a_multilabel_nih_teacher_starts_the_three_class_task_with_a_new_head(tmp_path: Path) -> None:
    out = tmp_path / "nih.pt"
    made = _pretrain(
        out, "--source", "nih14", "--data", str(_nih_layout(tmp_path / "nih")), "--task", "nih14"
    )
    assert made.exit_code == 0, made.output
    assert json.loads(out.with_name("nih.pt.json").read_text(encoding="utf-8"))["num_outputs"] == 14
    overrides = _run_overrides()

    teacher, notes = prepare_initial_teacher(overrides, load_schema(), out)  # type: ignore[misc]

    file_state = load_model_state(out)
    assert teacher.reset == ("head.1.weight", "head.1.bias")
    assert set(teacher.loaded) == set(file_state) - set(teacher.reset)
    for key in teacher.loaded:
        assert torch.equal(teacher.state[key], file_state[key]), key
    assert teacher.state["head.1.weight"].shape[0] == 3
    assert any("task nih14" in note for note in notes)
    shown = runner.invoke(app, ["initial-teacher", str(out), *TINY])  # what the coordinator tells the sites
    assert shown.exit_code == 0, shown.output
    assert f"--initial-teacher-sha256 {teacher.sha256}" in " ".join(shown.output.split())
    assert "2 re-initialised" in shown.output
    assert "2 re-initialised" in teacher.describe()
    again = build_initial_teacher(
        run_settings_from_config(
            flower_run_config(teacher_name="tiny-cnn", teacher_weights=str(out))
        ).teacher,
        run_settings_from_config(flower_run_config()).task,
        0,
    )
    assert again.sha256 == teacher.sha256  # the new head is seeded: every party gets the same model
