"""Where simulated sites run: device, Ray GPU share per site, an existing Ray cluster (no GPU needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import simulation.cli as cli
from common.device import DeviceUnavailableError
from common.errors import ConfigError
from simulation.experiment import Experiment, ExperimentConfig, SourceSpec, experiment_config
from simulation.runtime import FlowerSimulation, check_ray_address, federation_config

TINY_SOURCE = (SourceSpec("synthetic", None, {"n-images": "60", "image-size": "32"}),)
TINY_RUN = {"teacher-name": "tiny-cnn", "image-size": 32, "num-rounds": 1}


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_federation_config_carries_the_gpu_share_only_when_asked() -> None:
    assert federation_config(5, 1) == "num-supernodes=5 client-resources-num-cpus=1"
    assert federation_config(100, 2, 0.25) == (
        "num-supernodes=100 client-resources-num-cpus=2 client-resources-num-gpus=0.25"
    )
    assert (
        federation_config(4, 1, 2)
        == "num-supernodes=4 client-resources-num-cpus=1 client-resources-num-gpus=2.0"
    )


@pytest.mark.parametrize("bad", [-0.5, 1.5, float("nan"), float("inf")])
def test_a_bad_gpu_share_is_refused(bad: float) -> None:
    with pytest.raises(ConfigError, match="'--gpus-per-site'"):
        federation_config(2, 1, bad)


@pytest.mark.parametrize(
    "good", ["127.0.0.1:6379", "head-node.lan:6379", "ray://10.0.0.5:10001", "auto", "[::1]:6379"]
)
def test_ray_addresses_accepted(good: str) -> None:
    assert check_ray_address(f" {good} ") == good


@pytest.mark.parametrize("bad", ["http://10.0.0.5:6379", "10.0.0.5", "head:port", "a b:1"])
def test_a_bad_ray_address_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="'--ray-address'"):
        check_ray_address(bad)


def test_the_ray_address_reaches_flowers_simulation_process_as_ray_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")  # a caller's stray setting

    assert FlowerSimulation(tmp_path, ray_address="127.0.0.1:6379").env["RAY_ADDRESS"] == "127.0.0.1:6379"
    assert "RAY_ADDRESS" not in FlowerSimulation(tmp_path).env  # no address: a local Ray, always


def test_run_options_reach_the_experiment(tmp_path: Path) -> None:
    config = experiment_config(
        config_file=None, out=tmp_path / "x", sources=[], data=[], source_options=[], task=None,
        partition={}, run_settings={"device": "cpu"}, dp_epsilon=None, baselines=None, set_items=[],
        default_out=tmp_path, gpus_per_site=0.5, ray_address="127.0.0.1:6379",
    )  # fmt: skip

    assert config.gpus_per_site == 0.5
    assert config.ray_address == "127.0.0.1:6379"
    assert config.run_config["device"] == "cpu"


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--gpus-per-site", "-1", "gpus-per-site"),
        ("--ray-address", "nonsense", "ray-address"),
        ("--device", "gpu", "device"),
    ],
)
def test_cli_refuses_bad_resource_options_in_one_line(
    tmp_path: Path, option: str, value: str, expected: str
) -> None:
    result = CliRunner().invoke(cli.app, ["run", "--out", str(tmp_path / "x"), option, value])

    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert expected in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.usefixtures("no_cuda")
@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"run_config": {**TINY_RUN, "device": "cuda"}}, DeviceUnavailableError, "'device'.*'cuda'"),
        ({"gpus_per_site": 0.5}, ConfigError, "no CUDA GPU"),
    ],
)
def test_a_device_this_machine_lacks_is_refused_before_any_work(
    tmp_path: Path, changes: dict[str, object], error: type[Exception], match: str
) -> None:
    settings: dict[str, object] = {"out": tmp_path / "exp", "sources": TINY_SOURCE, "run_config": TINY_RUN}
    settings.update(changes)
    experiment = Experiment(ExperimentConfig(**settings))  # type: ignore[arg-type]

    with pytest.raises(error, match=match):
        experiment.prepare()

    assert not (tmp_path / "exp").exists()


@pytest.mark.usefixtures("no_cuda")
def test_on_a_ray_cluster_the_sites_device_is_not_checked_here(tmp_path: Path) -> None:
    config = ExperimentConfig(
        out=tmp_path / "exp",
        sources=TINY_SOURCE,
        run_config={**TINY_RUN, "device": "cuda"},
        gpus_per_site=1,
        ray_address="127.0.0.1:6379",
    )

    run_config, num_sites = Experiment(config).prepare()  # the cluster's GPUs are its own business

    assert run_config["device"] == "cuda"
    assert num_sites == 3
