"""A site's own policy bounds the work a coordinator can ask of it (issue 24 item 8)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.common.config import parse_config_args
from typer.testing import CliRunner

import client.app
from client.cli import app as cli_app
from client.deploy import SiteNodeSettings
from client.site import site_from_node_config
from client.site_policy import SitePolicy, check_request
from common.errors import ConfigError
from common.protocol import DISTILL_MESSAGE_TYPE, SITE_BAD_INPUT, SITE_DECLINED
from common.run_settings import run_settings_from_config
from tests.client.helpers import as_sent, policy_run_config, policy_site, send
from tests.helpers import flower_run_config

pytestmark = pytest.mark.usefixtures("flower_task_identity")
runner = CliRunner()


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the site's data (the first work of every phase) fails the test."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the site loaded its data for a request beyond its policy")

    monkeypatch.setattr(client.app, "load_site_data", refuse)


@pytest.mark.parametrize(
    ("message_type", "run", "setting", "option"),
    [
        ("train", {"image_size": 1024}, "image-size = 1024", "--max-image-size"),
        ("train", {"local_epochs": 100000}, "local-epochs = 100000", "--max-local-epochs"),
        ("train", {"num_rounds": 1000}, "num-rounds = 1000", "--max-rounds"),
        ("evaluate", {"kd_epochs": 100000}, "kd-epochs = 100000", "--max-kd-epochs"),
        (DISTILL_MESSAGE_TYPE, {"kd_epochs": 100000}, "kd-epochs = 100000", "--max-kd-epochs"),
        (
            DISTILL_MESSAGE_TYPE,
            {"kd_personalise_epochs": 500},
            "kd-personalise-epochs = 500",
            "--max-kd-epochs",
        ),
        (
            "train",
            {"kd_federated_student_rounds": 1000},
            "kd-federated-student-rounds = 1000",
            "--max-rounds",
        ),
        ("train", {"teacher_name": "resnet50v2-vgg19"}, "43,530,499 parameters", "--max-teacher-parameters"),
    ],
)
@pytest.mark.usefixtures("no_work")
def test_a_request_beyond_the_policy_is_declined_before_any_work(
    tmp_path: Path, message_type: str, run: dict[str, object], setting: str, option: str
) -> None:
    node_config = policy_site(tmp_path, **{"max-teacher-parameters": 20_000_000})

    reply = send(tmp_path, node_config, policy_run_config(tmp_path, **run), message_type)

    assert reply.has_error()
    assert reply.error.code == SITE_DECLINED
    assert "st-policy" in reply.error.reason
    assert as_sent(setting) in reply.error.reason  # integers masked (client/disclosure.py)
    assert option in reply.error.reason
    assert not (tmp_path / "site" / "cache").exists()


@pytest.mark.usefixtures("no_work")
def test_round_numbers_the_message_carries_are_bounded_too(tmp_path: Path) -> None:
    node_config = policy_site(tmp_path, **{"max-rounds": 5})
    run_config = policy_run_config(tmp_path, num_rounds=2)

    claims_more = send(tmp_path, node_config, run_config, server_round=1, num_rounds=1000)
    late_round = send(tmp_path, node_config, run_config, server_round=6, num_rounds=2)

    assert claims_more.error.code == SITE_DECLINED
    assert as_sent("num-rounds = 1000") in claims_more.error.reason
    assert late_round.error.code == SITE_DECLINED
    assert as_sent("server-round = 6") in late_round.error.reason


def test_a_run_gets_at_most_max_rounds_messages_of_a_kind_whatever_their_numbers(tmp_path: Path) -> None:
    node_config = policy_site(tmp_path, **{"max-rounds": 2})
    run_config = policy_run_config(tmp_path, num_rounds=2, kd_enabled=False)  # no federated-student rounds

    replies = [send(tmp_path, node_config, run_config, server_round=1, num_rounds=2) for _ in range(3)]

    assert [r.has_error() for r in replies] == [False, False, True]
    assert replies[2].error.code == SITE_DECLINED
    assert as_sent("at most 2 rounds per run (--max-rounds)") in replies[2].error.reason


def test_a_site_can_raise_its_own_limits(tmp_path: Path) -> None:
    node_config = policy_site(tmp_path, **{"max-local-epochs": 12})

    reply = send(tmp_path, node_config, policy_run_config(tmp_path, local_epochs=11))

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""


@pytest.mark.parametrize(
    ("key", "value"), [("max-rounds", 0), ("max-image-size", 5000), ("max-kd-epochs", "lots")]
)
def test_a_bad_policy_in_the_node_config_is_a_site_error_naming_the_key(
    tmp_path: Path, key: str, value: object
) -> None:
    reply = send(tmp_path, policy_site(tmp_path, **{key: value}), policy_run_config(tmp_path))

    assert reply.error.code == SITE_BAD_INPUT
    assert f"node_config '{key}'" in reply.error.reason


def test_the_defaults_cover_what_the_readme_and_benchmarks_run(tmp_path: Path) -> None:
    policy = SitePolicy()
    for run in (
        {},  # pyproject's defaults
        {"image_size": 224, "local_epochs": 5, "kd_epochs": 6, "num_rounds": 10},
        {"teacher_name": "resnet50v2-vgg19", "kd_federated_student_rounds": 16},
        {"teacher_name": "densenet121", "kd_personalise_epochs": 10},
    ):
        settings = run_settings_from_config(policy_run_config(tmp_path, **run))
        check_request(policy, settings, DISTILL_MESSAGE_TYPE, {"server-round": 1, "num-rounds": 10})


def test_simulated_sites_have_no_policy(tmp_path: Path) -> None:
    settings = run_settings_from_config(policy_run_config(tmp_path, simulation_manifest_dir=str(tmp_path)))

    assert site_from_node_config({"partition-id": 0, "num-partitions": 2}, settings).policy is None


def test_start_options_reach_the_site_as_its_policy(tmp_path: Path) -> None:
    policy = SitePolicy.from_mapping({"max-rounds": 3, "max-image-size": 128}, lambda key: f"--{key}")
    node = SiteNodeSettings(
        server="127.0.0.1:9092",
        site="site-a",
        data_format="synthetic",
        data_path=None,
        out_dir=tmp_path / "out",
        insecure=True,
        policy=policy,
    )
    node_config = parse_config_args([node.node_config()])
    settings = run_settings_from_config(policy_run_config(tmp_path))

    site = site_from_node_config(node_config, settings)

    assert site.policy == SitePolicy(max_rounds=3, max_image_size=128)
    assert node_config["site-name"] == "site-a"


def _user_error(args: list[str]) -> str:
    result = runner.invoke(cli_app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--max-image-size", "5000"),
        ("--max-image-size", "8"),
        ("--max-local-epochs", "0"),
        ("--max-kd-epochs", "-1"),
        ("--max-rounds", "0"),
        ("--max-teacher-parameters", "0"),
        ("--max-rounds", "many"),
    ],
)
def test_check_and_start_refuse_a_bad_policy_option(tmp_path: Path, option: str, value: str) -> None:
    check = ["check", "--format", "synthetic", "-o", "n-images=4", "--cache-dir", str(tmp_path / "c")]
    start = ["start", "--server", "127.0.0.1:1", "--site", "a", "--format", "synthetic", "--insecure"]

    for output in (
        _user_error([*check, option, value]),
        _user_error([*start, "--out", str(tmp_path / "out"), "--skip-check", option, value]),
    ):
        assert option in output
        assert "No such option" not in output  # a known option, whose value is refused
    assert not (tmp_path / "c").exists()
    assert not (tmp_path / "out").exists()


def test_start_refuses_an_image_size_beyond_its_own_policy(tmp_path: Path) -> None:
    start = ["start", "--server", "127.0.0.1:1", "--site", "a", "--format", "synthetic", "--insecure"]

    output = _user_error([*start, "--out", str(tmp_path / "out"), "--image-size", "512"])

    assert "--image-size" in output
    assert "--max-image-size" in output


def test_check_prints_the_site_policy(tmp_path: Path) -> None:
    args = ["check", "--format", "synthetic", "-o", "n-images=4", "--image-size", "16"]
    result = runner.invoke(cli_app, [*args, "--cache-dir", str(tmp_path / "c"), "--max-rounds", "7"])

    assert result.exit_code == 0, result.output
    assert "max-rounds 7" in result.stdout


def test_the_policy_is_no_run_setting() -> None:
    schema = flower_run_config()

    assert not set(SitePolicy.keys()) & set(schema)
    with pytest.raises(ConfigError):
        SitePolicy.from_mapping({"max-rounds": True}, lambda key: key)


@pytest.mark.usefixtures("no_work")
def test_a_run_journal_that_cannot_be_read_is_never_taken_for_a_fresh_run(tmp_path: Path) -> None:
    journal = tmp_path / "site" / "runs" / "run_7.json"
    journal.parent.mkdir(parents=True)
    journal.write_text('{"messages": {"train": "many"}}', encoding="utf-8")

    reply = send(tmp_path, policy_site(tmp_path), policy_run_config(tmp_path))

    assert reply.error.code == SITE_BAD_INPUT
    assert as_sent("journal of run 7") in reply.error.reason
    assert "cannot be read" in reply.error.reason
