"""A site picks its own device: node config / ``start --device``, never the server's setting.

CUDA is simulated as absent (``torch.cuda.is_available`` replaced), so these run the same on
machines with and without a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.config import parse_config_args
from typer.testing import CliRunner

from client.app import app
from client.cli import app as client_cli
from client.deploy import SiteNodeSettings
from client.site import site_from_node_config
from common.errors import ConfigError
from common.protocol import SITE_BAD_INPUT
from common.run_settings import run_settings_from_config
from server.app import initial_teacher
from tests.helpers import flower_run_config


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def _deployed(tmp_path: Path, **extra: object) -> dict[str, object]:
    return {"site-name": "st-a", "data-format": "synthetic", "out-dir": str(tmp_path / "site"), **extra}


def test_a_deployed_site_ignores_the_servers_device_setting(tmp_path: Path) -> None:
    settings = run_settings_from_config({"device": "cuda:3", "amp": False})

    unset = site_from_node_config(_deployed(tmp_path), settings)
    own = site_from_node_config(_deployed(tmp_path, device="cpu", amp=True), settings)

    assert unset.compute.device == "auto"  # the site's default, not the server's cuda:3
    assert not unset.compute.amp  # the server's amp applies when the site sets none
    assert own.compute.device == "cpu"
    assert own.compute.amp


def test_a_simulated_site_uses_the_run_setting(tmp_path: Path) -> None:
    settings = run_settings_from_config(
        {"device": "cpu", "amp": False, "simulation-manifest-dir": str(tmp_path)}
    )

    site = site_from_node_config({"partition-id": 0, "num-partitions": 2}, settings)

    assert site.compute.device == "cpu"
    assert not site.compute.amp


def test_a_simulated_sites_threads_are_the_run_setting(tmp_path: Path) -> None:
    settings = run_settings_from_config({"num-threads": 3, "simulation-manifest-dir": str(tmp_path)})

    site = site_from_node_config({"partition-id": 1, "num-partitions": 2}, settings)

    assert site.num_threads == 3


def test_start_passes_the_device_in_the_node_config(tmp_path: Path) -> None:
    settings = SiteNodeSettings(
        server="127.0.0.1:9092", site="st-a", data_format="synthetic", data_path=None,
        out_dir=tmp_path, insecure=True, device="CUDA:1",
    )  # fmt: skip
    node_config = parse_config_args([settings.node_config()])  # as flower-supernode parses it

    site = site_from_node_config(node_config, run_settings_from_config({"device": "cpu"}))

    assert site.compute.device == "cuda:1"
    with pytest.raises(ConfigError, match="'--device'"):
        SiteNodeSettings(
            server="127.0.0.1:9092", site="st-a", data_format="synthetic", data_path=None,
            out_dir=tmp_path, insecure=True, device="gpu",
        )  # fmt: skip


@pytest.mark.usefixtures("no_cuda")
def test_start_with_cuda_on_a_machine_without_it_fails_at_once(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        client_cli,
        [
            "start", "--server", "127.0.0.1:1", "--site", "st-a", "--format", "synthetic",
            "--out", str(tmp_path / "out"), "--insecure", "--skip-check", "--device", "cuda",
        ],
    )  # fmt: skip

    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(lines) == 1, result.output
    assert "--device 'cuda' was asked for" in result.output
    assert not (tmp_path / "out" / "supernode.log").exists()  # no SuperNode was started


@pytest.mark.usefixtures("no_cuda", "flower_task_identity")
@pytest.mark.parametrize("message_type", ["train", "evaluate"])
def test_a_round_asking_cuda_without_it_gets_an_error_reply(tmp_path: Path, message_type: str) -> None:
    run_config = flower_run_config(
        teacher_name="tiny-cnn", image_size=32, run_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "c")
    )
    context = Context(
        run_id=7, node_id=1, node_config=_deployed(tmp_path, device="cuda"), state=RecordDict(),
        run_config=run_config,
    )  # fmt: skip
    arrays = initial_teacher(run_settings_from_config(run_config))
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, "num-rounds": 1})})
    message = Message(content, dst_node_id=1, message_type=message_type)

    reply = app(message, context)

    assert reply.has_error()
    assert reply.error.code == SITE_BAD_INPUT
    assert "device 'cuda' was asked for" in reply.error.reason
    assert "Traceback" not in reply.error.reason
