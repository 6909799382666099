"""A site's privacy budget and disk against a server that tries to get round them.

Each test calls the ClientApp as Flower does, with crafted Messages and Contexts: the server
controls the run_config and the message; the site controls only its node_config.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from typer.testing import CliRunner

from client.app import app
from client.cli import app as cli_app
from common.protocol import SITE_DECLINED, SITE_RECORD, WEIGHT_KEY
from common.run_settings import run_settings_from_config
from server.app import initial_teacher
from tests.conftest import flower_run_config

if TYPE_CHECKING:
    from client.privacy_ledger import LedgerEntry

pytestmark = pytest.mark.usefixtures("flower_task_identity")

SITE_EPSILON = 2.0


def _site(tmp_path: Path, **extra: object) -> dict[str, object]:
    """A deployed site with its own budget (``cxr-fl-client start --epsilon 2``)."""
    return {
        "site-name": "st-test",
        "data-format": "synthetic",
        "out-dir": str(tmp_path / "site"),
        "dp-target-epsilon": SITE_EPSILON,
        **extra,
    }


def _context(tmp_path: Path, node_config: dict[str, object], *, run_id: int = 7, **run: object) -> Context:
    settings: dict[str, object] = {
        "teacher_name": "tiny-cnn",
        "teacher_norm": "group",
        "image_size": 32,
        "batch_size": 32,
        "run_dir": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"),
    }
    settings.update(run)
    return Context(
        run_id=run_id,
        node_id=1,
        node_config=node_config,
        state=RecordDict(),
        run_config=flower_run_config(**settings),
    )


def _ask(context: Context, message_type: str, **config: object) -> Message:
    server_side = {**context.run_config, "teacher-weights": ""}  # names a file at the site (item 8)
    arrays = initial_teacher(run_settings_from_config(server_side))
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(dict(config))})
    return app(Message(content, dst_node_id=1, message_type=message_type), context)


def _train(context: Context, server_round: int, num_rounds: int) -> Message:
    return _ask(context, "train", **{"server-round": server_round, "num-rounds": num_rounds})


def _ok(reply: Message) -> RecordDict:
    assert not reply.has_error(), reply.error.reason
    return reply.content


def _declined(reply: Message, *words: str) -> str:
    assert reply.has_error(), "the site sent a reply instead of declining"
    assert reply.error.code == SITE_DECLINED, reply.error.reason
    for word in words:
        assert word in reply.error.reason
    return reply.error.reason


def _ledger(tmp_path: Path) -> Path:
    """The site-wide ledger (tests/conftest.py points CXR_FL_STATE_DIR at a fresh folder)."""
    from client.privacy_ledger import default_ledger_path, default_state_dir

    return default_ledger_path(default_state_dir())


def _key(ledger: Path) -> Path:
    return ledger.with_name(ledger.name + ".key")


def _entry(ledger: Path) -> LedgerEntry:
    from client.privacy_ledger import PrivacyLedger, default_state_dir

    (entry,) = PrivacyLedger.open(ledger, default_state_dir()).entries.values()
    return entry


def _spent(tmp_path: Path) -> list[float]:
    return [float(s["epsilon"]) for s in _entry(_ledger(tmp_path)).spent]


# item 3: the server cannot overspend a site's budget


def test_server_raising_local_epochs_after_round_one_is_declined_before_training(tmp_path: Path) -> None:
    """The attack: site --epsilon 2, server raises local-epochs to 10 in round 2."""
    first = _ok(_train(_context(tmp_path, _site(tmp_path)), 1, 2))
    assert 0 < first.metric_records["metrics"]["dp_epsilon"] <= SITE_EPSILON

    attack = _context(tmp_path, _site(tmp_path), local_epochs=10)
    reason = _declined(_train(attack, 2, 2), "differs from this site's DP plan")
    assert "10 local epochs" in reason
    bigger_batches = _context(tmp_path, _site(tmp_path), batch_size=64)
    _declined(_train(bigger_batches, 2, 2), "sampling rate")
    assert len(_spent(tmp_path)) == 1  # nothing trained, nothing spent

    second = _ok(_train(_context(tmp_path, _site(tmp_path)), 2, 2))
    assert second.metric_records["metrics"]["dp_epsilon"] <= SITE_EPSILON
    assert max(_spent(tmp_path)) <= SITE_EPSILON


def test_a_resumed_run_with_another_run_folder_and_seed_cannot_restart_the_budget(tmp_path: Path) -> None:
    """``cxr-fl-server start --resume --set num-rounds=3 --set seed=1``: a new Flower run,
    new settings, the same site data: the budget planned for two rounds is spent after two."""
    _ok(_train(_context(tmp_path, _site(tmp_path)), 1, 2))
    resumed = _context(tmp_path, _site(tmp_path), run_id=8, run_dir=str(tmp_path / "run") + "/", seed=1)
    _ok(_train(resumed, 2, 3))
    _declined(_train(resumed, 3, 3), "privacy budget spent")
    elsewhere = _context(tmp_path, _site(tmp_path), run_id=9, run_dir=str(tmp_path / "other"), seed=5)
    _declined(_train(elsewhere, 1, 1), "privacy budget spent")
    assert len(_spent(tmp_path)) == 2
    assert max(_spent(tmp_path)) <= SITE_EPSILON


# item 4: the ledger is the site's, tamper-evident and fail-closed


def _tamper_delete(ledger: Path) -> None:
    ledger.unlink()


def _tamper_empty(ledger: Path) -> None:
    ledger.write_text("{}")


def _tamper_edit(ledger: Path) -> None:
    data = json.loads(ledger.read_text())
    for entry in data["entries"].values():
        entry["history"] = []
        entry["spent"] = []
    ledger.write_text(json.dumps(data))


def _tamper_drop_key(ledger: Path) -> None:
    _key(ledger).unlink()


@pytest.mark.parametrize("tamper", [_tamper_delete, _tamper_empty, _tamper_edit, _tamper_drop_key])
def test_a_tampered_ledger_stops_dp_rounds_until_the_operator_resets_it(
    tmp_path: Path, tamper: object
) -> None:
    _ok(_train(_context(tmp_path, _site(tmp_path)), 1, 2))
    ledger = _ledger(tmp_path)
    assert stat.S_IMODE(_key(ledger).stat().st_mode) == 0o600

    tamper(ledger)  # type: ignore[operator]
    reason = _declined(_train(_context(tmp_path, _site(tmp_path)), 2, 2), "privacy ledger")
    assert "privacy-ledger reset" in reason
    assert str(tmp_path) not in reason.replace(str(ledger), "")
    # evaluation spends no budget: the site keeps serving it
    _ok(_ask(_context(tmp_path, _site(tmp_path)), "evaluate", **{"server-round": 2}))

    runner = CliRunner()
    reset = ["privacy-ledger", "reset", "--reason"]
    refused = runner.invoke(cli_app, [*reset, "x"])
    assert refused.exit_code == 2
    done = runner.invoke(cli_app, [*reset, "audit 42", "--yes"])
    assert done.exit_code == 0, done.output
    (logged,) = [json.loads(line) for line in (ledger.parent / "ledger-resets.log").read_text().splitlines()]
    assert logged["reason"] == "audit 42"
    assert logged["user"]
    assert logged["at"]
    _ok(_train(_context(tmp_path, _site(tmp_path)), 1, 2))  # a new budget, on purpose


def test_the_ledger_lives_where_the_site_says(tmp_path: Path) -> None:
    own = tmp_path / "vault" / "ledger.json"
    _ok(_train(_context(tmp_path, _site(tmp_path, **{"privacy-ledger": str(own)})), 1, 1))
    assert _entry(own).spent
    assert not _ledger(tmp_path).exists()
    assert not (tmp_path / "site" / "privacy").exists()
    assert not (tmp_path / "run").exists()


def test_a_site_under_dp_declines_federated_student_rounds(tmp_path: Path) -> None:
    context = _context(tmp_path, _site(tmp_path))
    _declined(_ask(context, "train.student", **{"server-round": 1}), "without DP")


# item 5: delta and accountant are the site's


def test_a_site_that_sets_only_epsilon_keeps_a_safe_delta_and_its_own_accountant(tmp_path: Path) -> None:
    greedy = _context(tmp_path, _site(tmp_path), dp_enabled=True, dp_target_delta=0.5, dp_accountant="prv")
    reply = _ok(_train(greedy, 1, 1))
    assert reply.metric_records["metrics"]["dp_epsilon"] <= SITE_EPSILON
    entry = _entry(_ledger(tmp_path))
    assert entry.plan is not None
    assert entry.plan.target_delta <= 1e-5
    assert entry.plan.accountant == "rdp"
    assert entry.plan.target_epsilon == SITE_EPSILON


def test_a_server_request_only_tightens_the_sites_policy(tmp_path: Path) -> None:
    from client.site import site_from_node_config
    from common.config import PrivacyConfig

    settings = run_settings_from_config(flower_run_config(teacher_norm="group"))  # site DP needs GroupNorm
    site = site_from_node_config(_site(tmp_path, **{"dp-target-delta": 1e-3}), settings)
    looser = PrivacyConfig(enabled=True, target_epsilon=50.0, target_delta=0.5, accountant="gdp")
    tighter = PrivacyConfig(enabled=True, target_epsilon=1.0, target_delta=1e-7)
    assert site.effective_privacy(looser, 1000).target_epsilon == SITE_EPSILON
    assert site.effective_privacy(looser, 1000).target_delta == 1e-3  # the site said so
    assert site.effective_privacy(looser, 1000).accountant == "rdp"
    assert site.effective_privacy(tighter, 1000).target_epsilon == 1.0
    assert site.effective_privacy(tighter, 1000).target_delta == 1e-7
    default = site_from_node_config(_site(tmp_path), settings)
    assert default.effective_privacy(looser, 10**6).target_delta == 1e-6  # 1/N below 1e-5
    no_policy = {k: v for k, v in _site(tmp_path).items() if k != "dp-target-epsilon"}
    unset = site_from_node_config(no_policy, settings)
    assert unset.effective_privacy(looser, 1000).target_delta == 1e-5


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--epsilon", "-1"], "--epsilon"),
        (["--epsilon", "nan"], "--epsilon"),
        (["--epsilon", "1", "--delta", "2"], "--delta"),
        (["--epsilon", "1", "--accountant", "moments"], "--accountant"),
        (["--delta", "1e-6"], "--epsilon"),
    ],
)
def test_a_bad_privacy_option_is_refused_at_start(tmp_path: Path, options: list[str], named: str) -> None:
    result = CliRunner().invoke(
        cli_app,
        [
            *("start", "--server", "127.0.0.1:1", "--site", "a", "--format", "synthetic"),
            *("--out", str(tmp_path / "out"), "--insecure", "--skip-check", *options),
        ],
    )
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert "Traceback" not in result.output


def test_the_sites_options_reach_its_node_config(tmp_path: Path) -> None:
    from client.deploy import SiteNodeSettings

    settings = SiteNodeSettings(
        server="127.0.0.1:9092",
        site="a",
        data_format="synthetic",
        data_path=None,
        out_dir=tmp_path,
        insecure=True,
        dp_target_epsilon=2.0,
        dp_accountant="prv",
        privacy_ledger=tmp_path / "ledger.json",
        share_per_class_metrics=True,
    )
    node_config = settings.node_config()
    for part in (
        "dp-target-epsilon=2.0",
        'dp-accountant="prv"',
        f'privacy-ledger="{tmp_path / "ledger.json"}"',
        "share-per-class-metrics=true",
    ):
        assert part in node_config


# item 8: run settings cannot name site files


SERVER_PATHS = ("teacher_weights", "cache_dir", "run_dir", "simulation_manifest_dir", "central_eval_manifest")


def test_server_named_paths_are_ignored_alike_whether_or_not_they_exist(tmp_path: Path) -> None:
    existing = tmp_path / "secret" / "patients.csv"
    existing.parent.mkdir()
    existing.write_text("path,label\n")
    missing = tmp_path / "secret" / "no-such-file.pt"
    node = {"site-name": "st-test", "data-format": "synthetic", "out-dir": str(tmp_path / "site")}
    replies = []
    for path in (existing, missing):
        paths = {key: str(path) for key in SERVER_PATHS}
        context = _context(tmp_path, node, **paths)
        for kind in ("train", "evaluate"):
            reply = _ask(context, kind, **{"server-round": 1, "num-rounds": 1})
            content = _ok(reply)
            keys = sorted(content.metric_records["metrics"].keys())
            replies.append((kind, keys, dict(content[SITE_RECORD])))
    assert replies[:2] == replies[2:]
    assert not (tmp_path / "secret" / "sites").exists()  # nothing written under a server-named path
    assert sorted(p.name for p in existing.parent.iterdir()) == ["patients.csv"]


def test_counts_are_bucketed_for_fedavg(tmp_path: Path) -> None:
    from client.disclosure import bucket_count

    assert [bucket_count(n) for n in (0, 1, 7, 57, 123, 1234, 56789)] == [0, 10, 10, 60, 120, 1200, 57000]
    for n in range(100, 20000, 37):
        assert abs(bucket_count(n) - n) <= 0.05 * n
    context = _context(tmp_path, {k: v for k, v in _site(tmp_path).items() if k != "dp-target-epsilon"})
    metrics = _ok(_train(context, 1, 1)).metric_records["metrics"]
    assert metrics[WEIGHT_KEY] % 10 == 0


def test_a_ledger_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    from client.privacy_ledger import LedgerIntegrityError, PrivacyLedger, default_state_dir

    ledger = tmp_path / "ledger.json"
    PrivacyLedger(ledger, default_state_dir()).save()
    assert PrivacyLedger.open(ledger, default_state_dir()).entries == {}
    show = ["privacy-ledger", "show", "--ledger", str(ledger)]
    assert "verified" in CliRunner().invoke(cli_app, show).output
    _key(ledger).chmod(0o644)
    with pytest.raises(LedgerIntegrityError, match="chmod 600"):
        PrivacyLedger.open(ledger, default_state_dir())
    refused = CliRunner().invoke(cli_app, show)
    assert refused.exit_code == 2
    assert "chmod 600" in refused.output
