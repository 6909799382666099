"""``cxr-fl-client``: bad input ends in one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.cli import app
from client.site import site_from_node_config
from common.errors import ConfigError
from common.run_settings import check_run_config, run_settings_from_config
from tests.common.data.helpers import write_image

runner = CliRunner()


def _user_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


def _site(root: Path) -> Path:
    for i in range(2):
        write_image(root / "NORMAL" / f"n{i}.png", seed=i)
        write_image(root / "PNEUMONIA" / f"p{i}.png", seed=10 + i)
    return root


def test_check_image_size_has_the_run_settings_bounds(tmp_path: Path) -> None:
    args = ["check", "--format", "synthetic", "-o", "n-images=4", "--cache-dir", str(tmp_path / "c")]
    output = _user_error([*args, "--image-size", "20000"])
    assert "--image-size" in output
    assert "1024" in output
    assert not (tmp_path / "c").exists()  # nothing was written


def test_check_cache_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "c").write_text("a file")
    args = ["check", "--format", "image-folder", "--data", str(_site(tmp_path / "site"))]
    output = _user_error([*args, "--task", "normal-pneumonia", "--cache-dir", str(tmp_path / "c")])
    assert "is a file" in output


def test_check_manifest_that_is_not_utf8(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "m.csv").write_bytes("path,label\na.png,normal\n# Hôpital\n".encode("latin-1"))
    output = _user_error(["check", "--format", "manifest", "--data", str(tmp_path / "m.csv")])
    assert "m.csv" in output
    assert "UTF-8" in output


@pytest.mark.parametrize(
    ("option", "value"), [("--epsilon", "-1"), ("--delta", "2"), ("--max-grad-norm", "0"), ("--threads", "0")]
)
def test_start_refuses_a_bad_site_policy_at_start(tmp_path: Path, option: str, value: str) -> None:
    args = ["start", "--server", "127.0.0.1:1", "--site", "a", "--format", "synthetic", "--insecure"]
    output = _user_error([*args, "--out", str(tmp_path / "out"), "--skip-check", option, value])
    assert option in output
    assert not (tmp_path / "out").exists()


def test_a_site_turning_dp_on_in_a_batchnorm_run_is_told_what_to_change(tmp_path: Path) -> None:
    settings = run_settings_from_config(check_run_config({}))
    node_config = {
        "site-name": "a",
        "data-format": "synthetic",
        "out-dir": str(tmp_path / "out"),
        "dp-target-epsilon": 3.0,
    }
    with pytest.raises(ConfigError, match=r"teacher-norm.*group.*this site's own DP policy"):
        site_from_node_config(node_config, settings)
    group = run_settings_from_config(check_run_config({"teacher-norm": "group"}))
    site = site_from_node_config(node_config, group)
    own = site.privacy.own_dp()
    assert own is not None
    assert own.target_epsilon == 3.0


def test_node_config_strict_is_true_or_false(tmp_path: Path) -> None:
    settings = run_settings_from_config(check_run_config({}))
    node_config = {"site-name": "a", "data-format": "synthetic", "out-dir": str(tmp_path / "out")}
    assert site_from_node_config({**node_config, "strict": "true"}, settings).strict is True
    assert site_from_node_config({**node_config, "strict": False}, settings).strict is False
    with pytest.raises(ConfigError, match="strict"):
        site_from_node_config({**node_config, "strict": "yes"}, settings)
