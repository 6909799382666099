"""The privacy table's product settings (research/study/privacy.py) on tiny synthetic data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from common.errors import ConfigError
from research.study.cells import load_settings, prepare, score_public_teacher, table_cells
from research.study.privacy import ensure_public_teacher, public_weights
from research.study.report import build_study_report
from tests.study.helpers import fake_result, write_config, write_pool

VARIANTS = """
[privacy.pretrain]
images = 40
epochs = 1

[[privacy.variants]]
name = "public"
about = "pretrained"
pretrained = true

[[privacy.variants]]
name = "public-freeze1"
about = "pretrained, first block frozen"
pretrained = true
run = { freeze-blocks = 1 }
seeds = [0]
"""
FREEZE = "run = { freeze-blocks = 1 }"


def _config(tmp_path: Path, manifest: Path, privacy: str = VARIANTS, headline: str = "public") -> Path:
    config = write_config(tmp_path, manifest)
    text = config.read_text(encoding="utf-8").replace(
        "headline-epsilon = 8.0", f'headline-epsilon = 8.0\nheadline-variant = "{headline}"'
    )
    config.write_text(text + privacy, encoding="utf-8")
    return config


def test_each_variant_adds_a_no_dp_and_a_dp_cell_per_seed_started_from_the_public_teacher(
    tmp_path: Path,
) -> None:
    settings = load_settings(_config(tmp_path, tmp_path / "pool.csv"))

    cells = [c for c in table_cells("privacy", settings) if c.variant]

    assert [c.name for c in cells] == [
        "cxr-dirichlet-0.5-fedavg-gn-public-s0",
        "cxr-dirichlet-0.5-fedavg-dp8-public-s0",
        "cxr-dirichlet-0.5-fedavg-gn-public-s1",
        "cxr-dirichlet-0.5-fedavg-dp8-public-s1",
        "cxr-dirichlet-0.5-fedavg-gn-public-freeze1-s0",
        "cxr-dirichlet-0.5-fedavg-dp8-public-freeze1-s0",
    ]
    weights = str(public_weights(settings.out, "tiny-cnn"))
    assert all(dict(c.overrides)["teacher-weights"] == weights for c in cells)
    assert all(c.norm == "group" for c in cells)
    assert dict(cells[-1].overrides)["freeze-blocks"] == 1


@pytest.mark.parametrize(
    ("privacy", "headline", "named"),
    [
        (VARIANTS.replace("images = 40", "images = 0"), "public", "privacy.pretrain.images"),
        (VARIANTS.replace("epochs = 1", "epoch = 1"), "public", "privacy.pretrain.epoch"),
        (VARIANTS.replace('name = "public"\n', 'name = "Public"\n'), "Public", "privacy.variants"),
        (
            VARIANTS.replace("run = { freeze-blocks = 1 }", 'run = { teacher-weights = "x.pt" }'),
            "public",
            "teacher-weights",
        ),
        (
            VARIANTS.replace("run = { freeze-blocks = 1 }", "run = { freeze-block = 1 }"),
            "public",
            "freeze-block",
        ),
        (VARIANTS.replace("seeds = [0]", "seeds = [7]"), "public", "public-freeze1"),
        (VARIANTS.replace("pretrained = true\n\n", "pretrain = true\n\n"), "public", "privacy.variants"),
        (VARIANTS, "nonesuch", "headline-variant"),
    ],
)
def test_bad_privacy_variants_are_refused_naming_the_key(
    tmp_path: Path, privacy: str, headline: str, named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(_config(tmp_path, tmp_path / "pool.csv", privacy, headline))


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_the_public_teacher_shares_no_image_or_patient_with_pool_and_test(tmp_path: Path) -> None:
    source = write_pool(tmp_path / "data", n_patients=80)
    settings = load_settings(_config(tmp_path, source))
    data = prepare(settings, "cxr")

    weights = ensure_public_teacher(settings, data.pool, data.test)

    public = _rows(weights.parent / "public.csv")
    used = _rows(data.pool) + _rows(data.test)
    assert 0 < len(public) <= 40
    assert not {r["path"] for r in public} & {r["path"] for r in used}
    assert not {r["patient_id"] for r in public} & {r["patient_id"] for r in used}
    sidecar = json.loads(weights.with_name(weights.name + ".json").read_text())
    assert sidecar["teacher"]["norm"] == "group"
    assert sidecar["training"]["differential_privacy"] is False
    assert {c["manifest"] for c in sidecar["overlap_checks"]} == {str(data.pool), str(data.test)}
    before = weights.stat().st_mtime_ns
    assert ensure_public_teacher(settings, data.pool, data.test).stat().st_mtime_ns == before  # made once


def test_the_public_set_catches_an_exact_copy_it_draws(tmp_path: Path) -> None:
    source = write_pool(tmp_path / "data", n_patients=80)
    config = _config(tmp_path, source, VARIANTS.replace("images = 40", "images = 1000"))
    settings = load_settings(config)
    data = prepare(settings, "cxr")
    pool_rows = _rows(data.pool)
    copy = tmp_path / "data" / "images" / "copy_of_pool_image.png"
    shutil.copyfile(pool_rows[0]["path"], copy)
    with source.open("a", newline="") as handle:
        csv.writer(handle).writerow([str(copy), pool_rows[0]["label"], "hospital-0", "p999", ""])

    weights = ensure_public_teacher(settings, data.pool, data.test)

    assert str(copy) in {r["path"] for r in _rows(weights.parent / "public.csv")}  # every image is drawn
    sidecar = json.loads(weights.with_name(weights.name + ".json").read_text())
    pool_check = next(c for c in sidecar["overlap_checks"] if c["manifest"] == str(data.pool))
    assert pool_check["overlapping_images"] == 1
    assert sidecar["images"]["dropped_overlap"] == 1
    alone = score_public_teacher(settings, data)  # the public teacher before any federated round
    assert 0.0 <= alone["auroc_macro"] <= 1.0
    assert alone["n"] == len(_rows(data.test))
    # the report says where the public teacher came from, what the check dropped, what it scores alone
    cell = settings.out / "cells" / "cxr-dirichlet-0.5-fedavg-gn-s0" / "result.json"
    cell.parent.mkdir(parents=True)
    cell.write_text(json.dumps(fake_result("a", 0.86)))
    report = build_study_report(settings).read_text()
    assert "pool.csv: 1 of its" in report
    assert "1 image(s) dropped" in report
    assert f"teacher reaches macro-AUROC {alone['auroc_macro']:.3f}" in report
    public = json.loads((settings.results / "study.json").read_text())["tables"]["public_pretraining"]
    assert public["images"]["dropped_overlap"] == 1


def test_the_headline_dp_cost_is_judged_on_the_headline_setting_against_itself_without_dp(
    tmp_path: Path,
) -> None:
    settings = load_settings(_config(tmp_path, tmp_path / "pool.csv"))
    cells = {
        "cxr-dirichlet-0.5-fedavg-gn-s0": fake_result("a", 0.86),
        "cxr-dirichlet-0.5-fedavg-dp8-s0": fake_result("b", 0.79, dp_epsilon_spent={"site_00": 7.9}),
        "cxr-dirichlet-0.5-fedavg-gn-public-s0": fake_result("c", 0.93),
        "cxr-dirichlet-0.5-fedavg-dp8-public-s0": fake_result("d", 0.90, dp_epsilon_spent={"site_00": 7.99}),
        "cxr-dirichlet-0.5-fedavg-gn-public-s1": fake_result("e", 0.95),
        "cxr-dirichlet-0.5-fedavg-dp8-public-s1": fake_result("f", 0.91, dp_epsilon_spent={"site_00": 8.0}),
    }
    for name, record in cells.items():
        path = settings.out / "cells" / name / "result.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record))

    report = build_study_report(settings).read_text()

    summary = json.loads((settings.results / "study.json").read_text())
    cost = summary["targets"]["dp_cost"]
    assert cost["derived"] == pytest.approx([0.03, 0.04])
    assert cost["met"] is True
    assert "setting 'public'" in report
    variant = summary["tables"]["privacy_variants"]["public"]
    assert variant["cost"] == pytest.approx([0.03, 0.04])
    assert variant["dp_vs_plain_no_dp"] == pytest.approx(0.905 - 0.86)
    assert "| **public** (seeds 0, 1): epsilon 8 | 0.905 ± 0.007 (n=2) |" in report
    assert "- **public-freeze1**: pretrained, first block frozen" in report
