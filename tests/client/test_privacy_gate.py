"""A site's privacy in one place: its policy (SitePrivacy) and the gate every phase passes first."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.config import parse_config_args

import client.app
from client.app import app
from client.deploy import SiteNodeSettings
from client.privacy_gate import (
    BN_STATISTICS,
    CROSS_SITE_STUDENT,
    DISTILLATION,
    EVALUATION,
    FEDERATED_STUDENT,
    PHASES,
    STUDENT_FINAL,
    TEACHER_ROUND,
    VALIDATION,
    PrivacyGate,
)
from client.site import SiteConfig, site_from_node_config
from client.site_policy import SitePolicyError
from client.site_privacy import SitePrivacy
from common.errors import ConfigError
from common.privacy import BudgetExhaustedError
from common.protocol import SITE_DECLINED
from common.run_settings import run_settings_from_config
from common.site_limits import PolicyFile
from server.app import initial_teacher
from tests.helpers import flower_run_config

PHASE_OF_MESSAGE = {
    "train": TEACHER_ROUND,
    "evaluate": VALIDATION,
    "train.distill": DISTILLATION,
    "train.student": FEDERATED_STUDENT,
    "evaluate.student": STUDENT_FINAL,
    "query.bn_statistics": BN_STATISTICS,
    "evaluate.model": EVALUATION,
    "query.delivered_student": CROSS_SITE_STUDENT,
}


class RefusingGate(PrivacyGate):
    """A gate that declines every phase, naming it (and remembers which it was asked for)."""

    entered: ClassVar[list[str]] = []

    def enter(self, phase: str) -> None:
        RefusingGate.entered.append(phase)
        raise SitePolicyError(f"the test's gate refuses the {phase} phase")


@pytest.mark.usefixtures("flower_task_identity")
def test_every_phase_passes_the_gate_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client.app, "PrivacyGate", RefusingGate)
    monkeypatch.setattr(RefusingGate, "entered", [])
    run_config = flower_run_config(
        teacher_name="tiny-cnn",
        image_size=32,
        run_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
    )
    node_config = {"site-name": "st-gate", "data-format": "synthetic", "out-dir": str(tmp_path / "site")}
    arrays = initial_teacher(run_settings_from_config(run_config))
    for message_type, phase in PHASE_OF_MESSAGE.items():
        context = Context(
            run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config
        )
        config = ConfigRecord({"server-round": 1, "num-rounds": 1})
        content = RecordDict({"arrays": arrays, "config": config})
        reply = app(Message(content, dst_node_id=1, message_type=message_type), context)

        assert reply.has_error(), message_type
        assert reply.error.code == SITE_DECLINED, reply.error.reason
        assert f"refuses the {phase} phase" in reply.error.reason, message_type
    assert RefusingGate.entered == list(PHASE_OF_MESSAGE.values())
    assert set(PHASE_OF_MESSAGE.values()) == set(PHASES)  # every phase has its message
    assert not (tmp_path / "site" / "student").exists()  # nothing distilled or exported


def _gate(tmp_path: Path, privacy: SitePrivacy, *, simulated: bool = False, **run: Any) -> PrivacyGate:
    site = SiteConfig(
        "st-gate", None, "synthetic", tmp_path, tmp_path / "cache", privacy, simulated=simulated
    )
    settings = run_settings_from_config(flower_run_config(teacher_norm="group", **run))
    data: Any = SimpleNamespace(split=SimpleNamespace(train=range(1000)))
    return PrivacyGate(site, settings, data, run_id=7)


def test_the_gate_declines_what_dp_forbids_in_each_phase(tmp_path: Path) -> None:
    under_dp = _gate(tmp_path, SitePrivacy(epsilon=2.0, share_delivered_student=True))
    assert under_dp.under_dp
    assert under_dp.privacy.target_epsilon == 2.0
    for phase in (TEACHER_ROUND, VALIDATION, DISTILLATION, STUDENT_FINAL, EVALUATION):
        under_dp.enter(phase)
    with pytest.raises(BudgetExhaustedError, match="without DP"):
        under_dp.enter(FEDERATED_STUDENT)
    with pytest.raises(SitePolicyError, match="BatchNorm statistics"):
        under_dp.enter(BN_STATISTICS)
    with pytest.raises(SitePolicyError, match="under DP never sends its student"):
        under_dp.enter(CROSS_SITE_STUDENT)
    # the run's request puts the site under DP as well; a simulated partition still trains the student
    requested = _gate(tmp_path, SitePrivacy(), simulated=True, dp_enabled=True)
    requested.enter(FEDERATED_STUDENT)
    with pytest.raises(SitePolicyError):
        requested.enter(BN_STATISTICS)
    without = _gate(tmp_path, SitePrivacy())
    for phase in PHASES[:-1]:
        without.enter(phase)
    with pytest.raises(SitePolicyError, match="no --share-delivered-student"):
        without.enter(CROSS_SITE_STUDENT)
    with pytest.raises(ValueError, match="unknown phase"):
        without.enter("teacher")


def test_the_gate_shapes_what_a_reply_carries(tmp_path: Path) -> None:
    figures = {"loss": 0.123456, "auroc_macro": 0.87654, "accuracy": 0.5}
    assert _gate(tmp_path, SitePrivacy(epsilon=2.0)).reply_metrics(figures) == {"auroc_macro": 0.88}
    assert _gate(tmp_path, SitePrivacy()).reply_metrics(figures) == {"loss": 0.12, "auroc_macro": 0.88}
    exact = SitePrivacy(share_exact_metrics=True, share_per_class_metrics=True)
    assert _gate(tmp_path, exact).reply_metrics(figures) == figures
    assert _gate(tmp_path, SitePrivacy()).teacher_round() is None  # no DP: no ledger opened
    assert _gate(tmp_path, SitePrivacy()).teacher_epsilon() is None


def _node_config(privacy: SitePrivacy, tmp_path: Path) -> dict[str, Any]:
    """``privacy`` as the SuperNode passes it to the ClientApp (Flower's own parser)."""
    settings = SiteNodeSettings(
        server="127.0.0.1:9092",
        site="a",
        data_format="synthetic",
        data_path=None,
        out_dir=tmp_path,
        privacy=privacy,
    )
    return parse_config_args([settings.node_config()])


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"dp-target-epsilon": 3},
        {
            "dp-target-epsilon": 3.0,
            "dp-target-delta": 1e-6,
            "dp-max-grad-norm": 0.5,
            "dp-accountant": "prv",
            "privacy-ledger": "vault/ledger.json",
            "share-per-class-metrics": True,
            "share-exact-metrics": True,
            "share-delivered-student": True,
        },
    ],
)
def test_the_sites_privacy_goes_from_its_options_to_its_node_config_and_back(
    tmp_path: Path, options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    privacy = SitePrivacy.from_options(options)
    node_config = _node_config(privacy, tmp_path)
    assert SitePrivacy.from_node_config(node_config) == privacy
    run = run_settings_from_config({"teacher-norm": "group"})
    assert site_from_node_config(node_config, run).privacy == privacy
    if "privacy-ledger" in options:
        assert privacy.ledger == tmp_path / "vault" / "ledger.json"  # absolute from the start
    assert privacy.epsilon == options.get("dp-target-epsilon")


def test_a_policy_file_only_tightens_the_sites_budget() -> None:
    looser, tighter = PolicyFile(dp_target_epsilon=9.0), PolicyFile(dp_target_epsilon=1.0)
    assert SitePrivacy.from_options({"dp-target-epsilon": 3.0}, looser).epsilon == 3.0
    assert SitePrivacy.from_options({"dp-target-epsilon": 3.0}, tighter).epsilon == 1.0
    assert SitePrivacy.from_options({}, tighter).epsilon == 1.0  # the file alone sets a budget
    assert SitePrivacy.from_options({"dp-target-delta": 1e-6}, tighter) == SitePrivacy(
        epsilon=1.0, delta=1e-6
    )
    assert SitePrivacy.from_options({}, PolicyFile()).epsilon is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("dp-target-epsilon", -1.0),
        ("dp-target-epsilon", math.nan),
        ("dp-target-epsilon", math.inf),
        ("dp-target-epsilon", True),
        ("dp-target-delta", 2.0),
        ("dp-max-grad-norm", math.inf),
        ("dp-accountant", "moments"),
    ],
)
def test_one_check_for_a_sites_dp_options_wherever_they_come_from(key: str, value: object) -> None:
    budget = {} if key == "dp-target-epsilon" else {"dp-target-epsilon": 1.0}
    refusals = []
    with pytest.raises(ConfigError) as at_start:
        SitePrivacy.from_options({**budget, key: value})
    refusals.append(at_start.value)
    with pytest.raises(ConfigError) as in_node_config:
        SitePrivacy.from_node_config({**budget, key: value})
    refusals.append(in_node_config.value)
    if key == "dp-target-epsilon":
        with pytest.raises(ConfigError) as in_policy_file:
            PolicyFile.from_mapping({key: value}, "site-policy.toml")
        refusals.append(in_policy_file.value)
        assert refusals[-1].option == f"site-policy.toml: '{key}'"
    assert len({refusal.allowed for refusal in refusals}) == 1  # one rule, one wording
    assert refusals[0].option.startswith("--")
    assert refusals[1].option == f"node_config '{key}'"


def test_dp_options_without_a_budget_are_refused_naming_the_budget() -> None:
    with pytest.raises(ConfigError, match="'--epsilon'"):
        SitePrivacy.from_options({"dp-target-delta": 1e-6})
    with pytest.raises(ConfigError, match="'dp-target-epsilon'"):
        SitePrivacy.from_node_config({"dp-accountant": "rdp"})


def test_start_hands_its_options_to_the_site_node_as_typed_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cxr-fl-client start``'s options, through the SuperNode's node config, back to the site."""
    from typer.testing import CliRunner

    import client.cli

    started: list[SiteNodeSettings] = []
    monkeypatch.setattr(client.cli, "_run_site", started.append)
    monkeypatch.chdir(tmp_path)
    for name in ("ca.crt", "site.key", "teacher.pt"):
        (tmp_path / name).write_text("x")
    result = CliRunner().invoke(
        client.cli.app,
        [
            *("start", "--server", "127.0.0.1:9092", "--site", "a", "--format", "image-folder"),
            *("--data", "data", "--out", "out", "--ca", "ca.crt", "--key", "site.key", "--skip-check"),
            *("--state-dir", "state", "--initial-teacher", "teacher.pt", "--epsilon", "3"),
            *("--delta", "1e-6", "--privacy-ledger", "ledger.json", "--share-delivered-student"),
        ],
    )
    assert result.exit_code == 0, result.output
    (settings,) = started
    assert settings.data_path == Path("data")  # a Path, as typer converts it (not click's str)
    assert settings.ca_cert == Path("ca.crt")
    node_config = parse_config_args([settings.node_config()])
    run = run_settings_from_config({"teacher-norm": "group"})
    site = site_from_node_config(node_config, run)
    assert site.privacy == settings.privacy
    assert site.privacy == SitePrivacy(
        epsilon=3.0, delta=1e-6, ledger=tmp_path / "ledger.json", share_delivered_student=True
    )
    assert site.data_path == tmp_path / "data"
    assert site.state_dir == tmp_path / "state"
