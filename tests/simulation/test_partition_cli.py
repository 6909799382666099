"""``python -m simulation partition``: files written, manifests readable by the manifest source, errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from common.data.sources import load_catalog
from common.tasks import get_task
from simulation.cli import app

runner = CliRunner()
SMALL_SYNTHETIC = ["--source-option", "n-images=60", "--source-option", "image-size=16"]
SMALL_SYNTHETIC += ["--min-site-size", "2"]


def read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_synthetic_partition_writes_usable_manifests(tmp_path: Path) -> None:
    out = tmp_path / "split"
    args = ["partition", "--source", "synthetic", "--sites", "3", "--seed", "5", "--out", str(out)]
    result = runner.invoke(app, [*args, *SMALL_SYNTHETIC])
    assert result.exit_code == 0, result.output
    assert "site_02" in result.output
    assert "label skew" in result.output
    expected = {"site_00.csv", "site_01.csv", "site_02.csv", "partition.json", "label_distribution.md"}
    assert expected <= {p.name for p in out.iterdir()}
    with Image.open(out / "label_distribution.png") as png:
        assert png.format == "PNG"

    summary = json.loads((out / "partition.json").read_text())
    assert summary["settings"]["seed"] == 5
    assert summary["settings"]["partitioner"] == "dirichlet"
    assert summary["settings"]["alpha"] == 0.5
    assert summary["sources"] == {"synthetic": None}
    assert summary["source_options"] == {"synthetic": {"n-images": "60", "image-size": "16"}}
    assert summary["num_images"] == 60
    assert sum(summary["sizes"].values()) == 60

    # every site's file is a valid manifest for the client, with the counts partition.json states
    task = get_task("normal-pneumonia-covid")
    patients: dict[str, str] = {}
    for site, size in summary["sizes"].items():
        rows = read_manifest(out / f"{site}.csv")
        assert all(Path(r["path"]).is_absolute() for r in rows)
        for row in rows:
            assert patients.setdefault(row["patient_id"], site) == site  # no patient in two sites
        catalog = load_catalog("manifest", out / f"{site}.csv", task, strict=True)
        assert len(catalog) == size
        assert catalog.class_counts() == summary["label_counts"][site]
        assert catalog.read(0).shape == (16, 16)
    table = (out / "label_distribution.md").read_text()
    assert "| **all** |" in table


def test_same_seed_same_manifests(tmp_path: Path) -> None:
    args = ["partition", "--sites", "2", "--partition", "iid", *SMALL_SYNTHETIC]
    for name in ("a", "b"):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output

    def keys(folder: Path) -> list[list[str]]:
        return [[Path(r["path"]).name for r in read_manifest(folder / f"site_0{s}.csv")] for s in range(2)]

    assert keys(tmp_path / "a") == keys(tmp_path / "b")


def make_image_folder(root: Path, per_class: int, offset: int) -> Path:
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8), i, dtype=np.uint8)).save(root / cls / f"img{offset + i}.png")
    return root


def test_two_file_sources_natural_split_by_source(tmp_path: Path) -> None:
    first = make_image_folder(tmp_path / "hospital_a", 3, 0)
    second = make_image_folder(tmp_path / "hospital_b", 5, 100)
    out = tmp_path / "split"
    result = runner.invoke(
        app,
        [
            "partition",
            "--source", "image-folder", "--data", str(first),
            "--source", "image-folder", "--data", str(second),
            "--task", "normal-pneumonia",
            "--partition", "natural", "--natural-by", "source",
            "--min-site-size", "1",
            "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "partition.json").read_text())
    assert summary["settings"]["num_sites"] == 2
    assert summary["natural_ids"] == {"site_00": ["image-folder:1"], "site_01": ["image-folder:2"]}
    assert summary["sources"] == {
        "image-folder:1": str(first.resolve()),
        "image-folder:2": str(second.resolve()),
    }
    assert not (out / "images").exists()  # file-based sources are referenced, not copied
    rows = read_manifest(out / "site_01.csv")
    assert len(rows) == 10
    assert {Path(r["path"]).parent.parent for r in rows} == {second.resolve()}
    assert {r["site"] for r in rows} == {"image-folder:2"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--partition", "random"], "dirichlet, iid, natural, pathological, quantity-skew"),
        (["--alpha", "-1"], "alpha"),
        (["--sites", "500"], "500 sites"),
        (["--source", "synthetic", "--data", "a", "--data", "b"], "one --data PATH per --source"),
        (["--partition", "natural"], "--natural-by source"),
        (["--partition", "pathological", "--classes-per-site", "4"], "classes-per-site"),
        (["--source", "image-folder", "--data", "/nonexistent/xray"], "/nonexistent/xray"),
        (["--source-option", "colour=red"], "colour"),
    ],
)
def test_user_errors_exit_2_without_traceback(tmp_path: Path, args: list[str], message: str) -> None:
    synthetic = "--source" not in args or "synthetic" in args
    extra = SMALL_SYNTHETIC if synthetic else []
    result = runner.invoke(app, ["partition", "--out", str(tmp_path / "out"), *extra, *args])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("partition", "run", "report"):
        assert command in result.output


def test_module_entry_point_exit_code(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "simulation", "partition", "--partition", "nope", "--out", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "error: invalid value for 'partitioner': 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_drop_duplicates_leaves_one_copy_of_each_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_FL_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    # The same synthetic set twice: every image has an exact copy in the other source.
    args = ["partition", "--out", str(out), "--source", "synthetic", "--source", "synthetic"]
    args += ["--source-option", "n-images=30", "--source-option", "image-size=32"]
    args += ["--partition", "iid", "--sites", "2", "--min-site-size", "1", "--no-patient-split"]

    result = runner.invoke(app, [*args, "--drop-duplicates"])

    assert result.exit_code == 0, result.output
    assert "dropping duplicates" in result.output
    rows = sum(len((out / f"site_{i:02d}.csv").read_text().splitlines()) - 1 for i in range(2))
    assert rows == 30
