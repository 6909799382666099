"""Onboarding kits: the coordinator's kit, the site's `init`, policy files, bad kits (exit 2)."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.cli import app as client_app
from client.onboarding import set_up_site
from common.errors import ConfigError
from common.kit import read_kit
from common.site_limits import PolicyFile, SitePolicy, read_policy_file
from server.cli import app as server_app
from server.kit import write_kit
from server.security import make_certificates

runner = CliRunner()
APP_HASH = "ab" * 32


def _kit(tmp_path: Path, name: str = "kit", certs: str = "certs", **limits: int) -> Path:
    folder = tmp_path / certs
    if not (folder / "ca.crt").is_file():
        make_certificates(folder, ["127.0.0.1", "localhost"])
    policy = PolicyFile.from_mapping(limits, "test")
    write_kit("st-marys", tmp_path / name, folder, "127.0.0.1:9092", APP_HASH, policy)
    return tmp_path / name


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_kit_holds_public_files_only_and_reads_back(tmp_path: Path) -> None:
    kit = _kit(tmp_path, **{"max-rounds": 20, "cache-max-age-days": 7})
    assert sorted(p.name for p in kit.iterdir()) == [
        "README.md",
        "ca.crt",
        "cxr-fl-site.service",
        "kit.json",
        "server.crt",
        "site-policy.toml",
    ]
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in kit.iterdir())
    facts = read_kit(kit)
    assert (facts.site, facts.server, facts.app_hash) == ("st-marys", "127.0.0.1:9092", APP_HASH)
    assert facts.policy.limits.max_rounds == 20
    assert facts.policy.cache_max_age_days == 7
    readme = (kit / "README.md").read_text()
    assert "cxr-fl-client init" in readme
    assert "register-site st-marys.pub --name st-marys" in readme


def test_the_kit_command_refuses_an_address_its_certificate_does_not_name(tmp_path: Path) -> None:
    make_certificates(tmp_path / "certs", ["10.0.0.5"])
    args = ["kit", "st-marys", "--out", str(tmp_path / "kit"), "--certs", str(tmp_path / "certs")]
    result = runner.invoke(server_app, [*args, "--server", "127.0.0.1:9092", "--app-hash", APP_HASH])
    assert result.exit_code == 2
    assert "not for 127.0.0.1" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "kit").exists()
    made = runner.invoke(
        server_app, [*args, "--server", "10.0.0.5:9092", "--app-hash", APP_HASH, "--max-rounds", "5"]
    )
    assert made.exit_code == 0, made.output
    assert read_kit(tmp_path / "kit").policy.limits.max_rounds == 5


def test_a_kit_mixed_from_two_coordinators_is_refused(tmp_path: Path) -> None:
    kit = _kit(tmp_path)
    other = _kit(tmp_path, name="other-kit", certs="other-certs")
    shutil.copyfile(other / "ca.crt", kit / "ca.crt")
    with pytest.raises(ConfigError, match="belongs to another coordinator's kit"):
        read_kit(kit)


def test_a_kit_whose_address_its_ca_does_not_vouch_for_is_refused(tmp_path: Path) -> None:
    kit = _kit(tmp_path)
    facts = json.loads((kit / "kit.json").read_text())
    facts["server"] = "evil.example.org:9092"
    (kit / "kit.json").write_text(json.dumps(facts))
    with pytest.raises(ConfigError, match=r"not for evil\.example\.org"):
        read_kit(kit)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max-rounds = 10\nmax-epochs = 3\n", "'max-epochs'"),
        ("max-rounds = 0\n", "a whole number >= 1"),
        ("max-image-size = 100000\n", "max-image-size"),
        ("cache-max-age-days = -1\n", "cache-max-age-days"),
        ("dp-target-epsilon = 0\n", "dp-target-epsilon"),
        ("max-rounds = [\n", "TOML"),
    ],
)
def test_a_policy_file_with_unknown_keys_or_impossible_values_is_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "site-policy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_policy_file(path)


def test_the_kit_policy_only_tightens_the_sites_own_limits(tmp_path: Path) -> None:
    kit = read_kit(_kit(tmp_path, **{"max-rounds": 20, "max-image-size": 512, "cache-max-age-days": 30}))
    own = PolicyFile(
        SitePolicy(max_rounds=50, max_image_size=128), cache_max_age_days=90, dp_target_epsilon=3.0
    )
    setup = set_up_site(
        kit, tmp_path / "site", own, data=None, fmt="synthetic", task="normal-pneumonia", image_size=32
    )
    written = read_policy_file(tmp_path / "site" / "site-policy.toml")
    assert written == setup.policy
    assert written.limits.max_rounds == 20  # the kit's stricter limit
    assert written.limits.max_image_size == 128  # the site's own: the kit's 512 does not loosen it
    assert written.cache_max_age_days == 30
    assert written.dp_target_epsilon == 3.0


def test_init_makes_a_private_key_pair_and_refuses_another_coordinators_kit(tmp_path: Path) -> None:
    kit = _kit(tmp_path)
    site = tmp_path / "site"
    args = [
        "--site-dir",
        str(site),
        "--format",
        "synthetic",
        "--task",
        "normal-pneumonia",
        "--image-size",
        "16",
    ]
    result = runner.invoke(client_app, ["init", str(kit), *args])
    assert result.exit_code == 0, result.output
    assert _mode(site) == 0o700
    assert _mode(site / "st-marys.key") == 0o600
    assert (site / "st-marys.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert "readable images" in result.output  # the data check ran
    assert "register-site st-marys.pub --name st-marys" in result.output
    assert "the coordinator's certificate expires" in result.output
    start = (site / "start.sh").read_text()
    assert "--policy" in start
    assert str(site / "st-marys.key") in start
    assert "127.0.0.1:9092" in start
    facts = json.loads((site / "site.json").read_text())
    assert facts["kit_app_hash"] == APP_HASH  # information only: not on any allow-list
    assert APP_HASH not in start

    key = (site / "st-marys.key").read_bytes()
    again = runner.invoke(client_app, ["init", str(kit), *args])
    assert again.exit_code == 0, again.output
    assert (site / "st-marys.key").read_bytes() == key  # the same coordinator: the key is kept

    other = _kit(tmp_path, name="other-kit", certs="other-certs")
    refused = runner.invoke(client_app, ["init", str(other), *args])
    assert refused.exit_code == 2
    assert "another coordinator's" in refused.output
    assert "Traceback" not in refused.output
    assert (site / "st-marys.key").read_bytes() == key


def test_init_of_a_folder_that_is_no_kit_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(
        client_app, ["init", str(tmp_path), "--site-dir", str(tmp_path / "s"), "--format", "synthetic"]
    )
    assert result.exit_code == 2
    assert "no kit.json" in result.output


def test_start_reads_the_policy_file_and_refuses_a_bad_one(tmp_path: Path) -> None:
    policy = tmp_path / "site-policy.toml"
    policy.write_text("max-rounds = 3\nmax-teleport = 1\n")
    args = [
        "start",
        "--server",
        "127.0.0.1:9",
        "--site",
        "a",
        "--format",
        "synthetic",
        "--out",
        str(tmp_path / "o"),
    ]
    result = runner.invoke(client_app, [*args, "--insecure", "--policy", str(policy)])
    assert result.exit_code == 2
    phases = runner.invoke(client_app, [*args, "--insecure", "--phases", "teacher,inference"])
    assert phases.exit_code == 2
    assert "--phases" in phases.output
    assert "max-teleport" in result.output
    assert "Traceback" not in result.output


def test_phases_a_site_takes_part_in_are_tightened_and_checked(tmp_path: Path) -> None:
    from client.site_policy import SitePolicyError, check_request
    from common.run_settings import run_settings_from_config
    from tests.helpers import flower_run_config

    path = tmp_path / "site-policy.toml"
    path.write_text('phases = ["teacher", "distill"]\n')
    own = read_policy_file(path)
    assert own.limits.phases == ("teacher", "distill")
    assert SitePolicy.from_mapping(own.limits.node_config(), str) == own.limits  # node config text
    kit = PolicyFile(SitePolicy(phases=("teacher", "federated-student")))
    assert own.tightened_by(kit).limits.phases == ("teacher",)
    with pytest.raises(ConfigError, match="at least one phase in common"):
        PolicyFile(SitePolicy(phases=("distill",))).tightened_by(PolicyFile(SitePolicy(phases=("teacher",))))
    path.write_text('phases = ["teacher", "inference"]\n')
    with pytest.raises(ConfigError, match="one or more of teacher, distill, federated-student, evaluation"):
        read_policy_file(path)

    base = {"teacher_name": "tiny-cnn", "image_size": 32}
    federated = run_settings_from_config(flower_run_config(**base))  # KD and 5 federated-student rounds
    teacher_only = run_settings_from_config(flower_run_config(**base, kd_enabled=False))
    check_request(own.limits, teacher_only, "train", {})
    with pytest.raises(SitePolicyError, match="federated-student phase"):
        check_request(own.limits, federated, "train", {})
    with pytest.raises(SitePolicyError, match="distill phase"):
        check_request(SitePolicy(phases=("teacher",)), federated, "train", {})
