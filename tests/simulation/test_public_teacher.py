"""The coordinator's public pretraining of a simulated run's teacher (simulation/public_teacher.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import simulation.cli as cli
from common.errors import ConfigError, DataError
from common.initial_teacher import weights_sha256
from simulation.experiment import (
    Experiment,
    ExperimentConfig,
    PartitionSpec,
    SourceArgs,
    SourceSpec,
    experiment_config,
)
from simulation.public_teacher import PublicPretraining
from tests.simulation.helpers import SITES, TINY_RUN

PUBLIC = (SourceSpec("synthetic", None, {"n-images": "60", "image-size": "32", "seed": "1"}),)


def _config(tmp_path: Path, **change: object) -> ExperimentConfig:
    settings: dict[str, object] = {
        "out": tmp_path / "exp",
        "sources": SITES,
        "partition": PartitionSpec(name="iid", sites=2),
        "run_config": dict(TINY_RUN),
        "public_sources": PUBLIC,
        "pretrain": PublicPretraining(images=40, epochs=2),
    }
    settings.update(change)
    return ExperimentConfig(**settings)  # type: ignore[arg-type]


def test_the_run_starts_from_the_teacher_pretrained_on_the_first_public_images(tmp_path: Path) -> None:
    stages: list[str] = []
    run_config, _ = Experiment(_config(tmp_path)).prepare(stages.append)

    weights = tmp_path / "exp" / "public" / "teacher.pt"
    assert run_config["teacher-weights"] == str(weights)
    state = torch.load(weights, weights_only=True)
    assert run_config["initial-teacher-sha256"] == weights_sha256(state)
    sidecar = json.loads((weights.parent / "teacher.pt.json").read_text())
    # the first 40 of the 60 public images, no more
    assert sidecar["images"]["train"] + sidecar["images"]["val"] == 40
    assert sidecar["training"]["epochs"] == 2
    assert any("pretraining the teacher on 40 public images (2 epochs)" in s for s in stages)
    written = json.loads((tmp_path / "exp" / "experiment.json").read_text())
    assert written["resolved_run_config"]["teacher-weights"] == str(weights)
    assert written["pretrain"] == {"images": 40, "epochs": 2}


def test_a_public_image_that_is_also_a_sites_image_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="site_0"):
        Experiment(_config(tmp_path, public_sources=SITES)).prepare()  # the same images as the sites'
    assert not (tmp_path / "exp").exists()  # nothing half-written left behind


def test_a_refused_public_set_leaves_an_existing_out_folder_without_partition(tmp_path: Path) -> None:
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "notes.txt").write_text("the user's", encoding="utf-8")
    with pytest.raises(DataError):
        Experiment(_config(tmp_path, public_sources=SITES)).prepare()
    assert sorted(p.name for p in (tmp_path / "exp").iterdir() if p.name != "cache") == ["notes.txt"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"pretrain": PublicPretraining(images=40, epochs=1), "public_sources": ()}, "--public-source"),
    ],
)
def test_pretraining_needs_public_images(tmp_path: Path, change: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _config(tmp_path, **change)


@pytest.mark.parametrize(("images", "epochs"), [(0, 1), (10, 0)])
def test_pretraining_needs_images_and_epochs(images: int, epochs: int) -> None:
    with pytest.raises(ConfigError):
        PublicPretraining(images=images, epochs=epochs)


def _resolve(tmp_path: Path, config_file: Path | None = None, **given: Any) -> ExperimentConfig:
    return experiment_config(
        config_file=config_file,
        out=None,
        sources=[],
        data=[],
        source_options=[],
        task=None,
        partition={},
        run_settings={},
        dp_epsilon=None,
        baselines=None,
        set_items=[],
        default_out=tmp_path / "default",
        **given,
    )


def test_run_takes_public_sources_and_pretraining_from_the_command_line(tmp_path: Path) -> None:
    public = SourceArgs(["synthetic"], [], ["n-images=50", "seed=1"], "public-source")
    resolved = _resolve(tmp_path, public=public, pretrain_images=30)

    assert resolved.public_sources == (SourceSpec("synthetic", None, {"n-images": "50", "seed": "1"}),)
    assert resolved.pretrain == PublicPretraining(images=30, epochs=3)
    assert _resolve(tmp_path, public=public).pretrain is None  # public images alone: students' start only


def test_run_takes_public_sources_and_pretraining_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "exp.toml"
    config.write_text(
        '[[public-sources]]\nformat = "manifest"\npath = "public.csv"\n\n'
        "[pretrain]\nimages = 800\nepochs = 2\n"
    )
    resolved = _resolve(tmp_path, config)

    assert resolved.public_sources == (SourceSpec("manifest", str(tmp_path / "public.csv"), {}),)
    assert resolved.pretrain == PublicPretraining(images=800, epochs=2)
    assert _resolve(tmp_path, config, pretrain_images=0).pretrain is None  # the command line wins


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--pretrain-images", "100"], "--public-source"),
        (["--public-data", "x.csv"], "public-data"),
        (
            ["--public-source", "synthetic", "--pretrain-images", "10", "--pretrain-epochs", "0"],
            "pretrain epochs",
        ),
    ],
)
def test_bad_public_options_are_one_line_exit_2(tmp_path: Path, args: list[str], named: str) -> None:
    result = CliRunner().invoke(cli.app, ["run", "--out", str(tmp_path / "x"), *args])

    assert result.exit_code == 2, result.output
    assert named in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[[public-sources]]\npath = "public.csv"\n', "public-sources[0].format"),
        ("[pretrain]\nimagez = 3\n", "pretrain.imagez"),
    ],
)
def test_a_bad_public_table_is_named(tmp_path: Path, text: str, named: str) -> None:
    config = tmp_path / "exp.toml"
    config.write_text(text)

    with pytest.raises(ConfigError) as caught:
        _resolve(tmp_path, config)
    assert named in str(caught.value)
