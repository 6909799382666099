"""A site's privacy budget and disk against a server that tries to get round them.

Each test calls the ClientApp as Flower does, with crafted Messages and Contexts: the server
controls the run_config and the message; the site controls only its node_config.
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from flwr.app import Message
from typer.testing import CliRunner

from client.cli import app as cli_app
from common.protocol import SITE_DECLINED, SITE_RECORD, WEIGHT_KEY
from common.run_settings import run_settings_from_config
from tests.client.helpers import SITE_EPSILON, ask, ask_train, dp_context, dp_site, replied
from tests.helpers import flower_run_config

if TYPE_CHECKING:
    from client.privacy_ledger import LedgerEntry

pytestmark = pytest.mark.usefixtures("flower_task_identity")


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
    first = replied(ask_train(dp_context(tmp_path, dp_site(tmp_path)), 1, 2))
    assert 0 < first.metric_records["metrics"]["dp_epsilon"] <= SITE_EPSILON

    attack = dp_context(tmp_path, dp_site(tmp_path), local_epochs=10)
    reason = _declined(ask_train(attack, 2, 2), "differs from this site's DP plan")
    assert "local epochs" in reason
    bigger_batches = dp_context(tmp_path, dp_site(tmp_path), batch_size=64)
    _declined(ask_train(bigger_batches, 2, 2), "sampling rate")
    assert len(_spent(tmp_path)) == 1  # nothing trained, nothing spent

    second = replied(ask_train(dp_context(tmp_path, dp_site(tmp_path)), 2, 2))
    assert second.metric_records["metrics"]["dp_epsilon"] <= SITE_EPSILON
    assert max(_spent(tmp_path)) <= SITE_EPSILON


def test_a_resumed_run_with_another_run_folder_and_seed_cannot_restart_the_budget(tmp_path: Path) -> None:
    """``cxr-fl-server start --resume --set num-rounds=3 --set seed=1``: a new Flower run,
    new settings, the same site data: the budget planned for two rounds is spent after two."""
    replied(ask_train(dp_context(tmp_path, dp_site(tmp_path)), 1, 2))
    resumed = dp_context(tmp_path, dp_site(tmp_path), run_id=8, run_dir=str(tmp_path / "run") + "/", seed=1)
    replied(ask_train(resumed, 2, 3))
    _declined(ask_train(resumed, 3, 3), "privacy budget spent")
    elsewhere = dp_context(tmp_path, dp_site(tmp_path), run_id=9, run_dir=str(tmp_path / "other"), seed=5)
    _declined(ask_train(elsewhere, 1, 1), "privacy budget spent")
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
    replied(ask_train(dp_context(tmp_path, dp_site(tmp_path)), 1, 2))
    ledger = _ledger(tmp_path)
    assert stat.S_IMODE(_key(ledger).stat().st_mode) == 0o600

    tamper(ledger)  # type: ignore[operator]
    reason = _declined(ask_train(dp_context(tmp_path, dp_site(tmp_path)), 2, 2), "privacy ledger")
    assert "privacy-ledger reset" in reason
    assert str(tmp_path) not in reason.replace(str(ledger), "")
    # evaluation spends no budget: the site keeps serving it
    replied(ask(dp_context(tmp_path, dp_site(tmp_path)), "evaluate", **{"server-round": 2}))

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
    replied(ask_train(dp_context(tmp_path, dp_site(tmp_path)), 1, 2))  # a new budget, on purpose


def test_the_ledger_lives_where_the_site_says(tmp_path: Path) -> None:
    own = tmp_path / "vault" / "ledger.json"
    replied(ask_train(dp_context(tmp_path, dp_site(tmp_path, **{"privacy-ledger": str(own)})), 1, 1))
    assert _entry(own).spent
    assert not _ledger(tmp_path).exists()
    assert not (tmp_path / "site" / "privacy").exists()
    assert not (tmp_path / "run").exists()


def test_a_site_under_dp_declines_federated_student_rounds(tmp_path: Path) -> None:
    context = dp_context(tmp_path, dp_site(tmp_path))
    _declined(ask(context, "train.student", **{"server-round": 1}), "without DP")


def test_a_site_under_dp_declines_to_send_batchnorm_statistics(tmp_path: Path) -> None:
    # (a site under DP refuses a BatchNorm run outright; a server that asks anyway is declined)
    context = dp_context(tmp_path, dp_site(tmp_path))
    reason = _declined(ask(context, "query.bn_statistics", **{"server-round": 1, "model": "teacher"}), "DP")
    assert "BatchNorm statistics" in reason


# item 5: delta and accountant are the site's


def test_a_site_that_sets_only_epsilon_keeps_a_safe_delta_and_its_own_accountant(tmp_path: Path) -> None:
    greedy = dp_context(
        tmp_path, dp_site(tmp_path), dp_enabled=True, dp_target_delta=0.5, dp_accountant="prv"
    )
    reply = replied(ask_train(greedy, 1, 1))
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
    site = site_from_node_config(dp_site(tmp_path, **{"dp-target-delta": 1e-3}), settings)
    looser = PrivacyConfig(enabled=True, target_epsilon=50.0, target_delta=0.5, accountant="gdp")
    tighter = PrivacyConfig(enabled=True, target_epsilon=1.0, target_delta=1e-7)
    assert site.effective_privacy(looser, 1000).target_epsilon == SITE_EPSILON
    assert site.effective_privacy(looser, 1000).target_delta == 1e-3  # the site said so
    assert site.effective_privacy(looser, 1000).accountant == "rdp"
    assert site.effective_privacy(tighter, 1000).target_epsilon == 1.0
    assert site.effective_privacy(tighter, 1000).target_delta == 1e-7
    default = site_from_node_config(dp_site(tmp_path), settings)
    assert default.effective_privacy(looser, 10**6).target_delta == 1e-6  # 1/N below 1e-5
    no_policy = {k: v for k, v in dp_site(tmp_path).items() if k != "dp-target-epsilon"}
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
    from client.site_privacy import SitePrivacy

    settings = SiteNodeSettings(
        server="127.0.0.1:9092",
        site="a",
        data_format="synthetic",
        data_path=None,
        out_dir=tmp_path,
        insecure=True,
        privacy=SitePrivacy(
            epsilon=2.0, accountant="prv", ledger=tmp_path / "ledger.json", share_per_class_metrics=True
        ),
    )
    node_config = settings.node_config()
    for part in (
        "dp-target-epsilon=2.0",
        'dp-accountant="prv"',
        f'privacy-ledger="{tmp_path / "ledger.json"}"',
        "share-per-class-metrics=true",
    ):
        assert part in node_config


def test_the_site_fixes_its_state_dir_when_it_starts(tmp_path: Path) -> None:
    """The SuperNode's app processes use the ledger of the state dir the site started with."""
    from client.deploy import SiteNodeSettings
    from client.privacy_ledger import default_state_dir

    def node_config(**extra: object) -> str:
        settings = SiteNodeSettings(
            server="127.0.0.1:9092",
            site="a",
            data_format="synthetic",
            data_path=None,
            out_dir=tmp_path,
            **extra,
        )
        return settings.node_config()

    assert f'state-dir="{default_state_dir()}"' in node_config()
    assert f'state-dir="{tmp_path / "state"}"' in node_config(state_dir=tmp_path / "state")


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
        # how the coordinator picks its models on its hold-out is not the site's to act on
        context = dp_context(tmp_path, node, select_on="coordinator", **paths)
        for kind in ("train", "evaluate"):
            reply = ask(context, kind, **{"server-round": 1, "num-rounds": 1})
            content = replied(reply)
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
    context = dp_context(tmp_path, {k: v for k, v in dp_site(tmp_path).items() if k != "dp-target-epsilon"})
    metrics = replied(ask_train(context, 1, 1)).metric_records["metrics"]
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


# issue 24 item 6: the budget is durable (site-wide, keyed by the data's content, no roll-back)


def _reset(reason: str) -> None:
    done = CliRunner().invoke(cli_app, ["privacy-ledger", "reset", "--reason", reason, "--yes"])
    assert done.exit_code == 0, done.output


def test_an_older_copy_of_the_ledger_is_refused_until_the_operator_resets_it(tmp_path: Path) -> None:
    """The attack: keep a valid copy of the ledger, spend more, put the copy back."""
    context = dp_context(tmp_path, dp_site(tmp_path))
    replied(ask_train(context, 1, 3))
    ledger = _ledger(tmp_path)
    older = {file: file.read_bytes() for file in (ledger, _key(ledger))}
    replied(ask_train(context, 2, 3))
    for file, content in older.items():
        file.write_bytes(content)

    reason = _declined(ask_train(context, 3, 3), "older copy", "privacy-ledger reset")
    assert "restore" not in reason.lower()
    assert "backup" not in reason.lower()
    shown = CliRunner().invoke(cli_app, ["privacy-ledger", "show"])
    assert shown.exit_code == 2
    assert "older copy" in shown.output
    _declined(ask_train(context, 3, 3), "older copy")  # still refused: only the operator ends it

    _reset("restored an old backup by mistake")
    (logged,) = [json.loads(line) for line in (ledger.parent / "ledger-resets.log").read_text().splitlines()]
    assert logged["reason"] == "restored an old backup by mistake"
    assert logged["user"]
    assert logged["at"]
    assert all(Path(kept).is_file() for kept in logged["kept"])
    assert len(logged["kept"]) == 2
    replied(ask_train(context, 1, 3))  # a new budget, on purpose and logged
    for file, content in older.items():  # the copy from before the reset stays refused
        file.write_bytes(content)
    _declined(ask_train(context, 2, 3), "older copy")


def test_a_fresh_out_folder_or_a_new_site_name_does_not_start_a_fresh_budget(tmp_path: Path) -> None:
    """The attack: the budget planned for one round is spent; the site starts again elsewhere."""
    replied(ask_train(dp_context(tmp_path, dp_site(tmp_path)), 1, 1))
    for other in ({"out-dir": str(tmp_path / "fresh")}, {"site-name": "st-renamed"}):
        again = dp_context(tmp_path, dp_site(tmp_path, **other), run_id=9, run_dir=str(tmp_path / "run2"))
        _declined(ask_train(again, 1, 1), "privacy budget spent")
    assert len(_spent(tmp_path)) == 1


def _image_folder(root: Path, per_class: int = 40) -> Path:
    from PIL import Image

    for cls, name in enumerate(("normal", "pneumonia")):
        for i in range(per_class):
            pixels = np.random.default_rng([cls, i]).integers(0, 256, size=(40, 36), dtype=np.uint8)
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode="L").save(root / name / f"{i:03d}.png")
    return root


def test_the_same_images_at_another_path_size_or_split_spend_from_one_budget(tmp_path: Path) -> None:
    data = _image_folder(tmp_path / "mnt" / "a")
    moved = tmp_path / "mnt" / "b"
    shutil.copytree(data, moved)
    (moved / "normal" / "000.png").touch()  # another path, another mtime: the same images

    def site(path: Path) -> dict[str, object]:
        return dp_site(tmp_path, **{"data-format": "image-folder", "data-path": str(path)})

    run: dict[str, object] = {"task": "normal-pneumonia", "batch_size": 16}
    replied(ask_train(dp_context(tmp_path, site(data), **run), 1, 1))
    for path, settings in (
        (moved, {}),
        (data, {"image_size": 48}),
        (data, {"split_seed": 7}),
        (data, {"val_fraction": 0.3}),
    ):
        reason = _declined(ask_train(dp_context(tmp_path, site(path), run_id=9, **run, **settings), 1, 1))
        assert "privacy budget spent" in reason or "differs from this site's DP plan" in reason, reason
    assert len(_spent(tmp_path)) == 1  # one entry, one round


def test_the_data_sets_identity_is_its_images_alone(tmp_path: Path) -> None:
    from client.privacy_ledger import dataset_key
    from common.local import cached_images, site_data_request
    from common.tasks import get_task

    data = _image_folder(tmp_path / "a", per_class=6)
    moved = tmp_path / "b"
    shutil.copytree(data, moved)
    task = get_task("normal-pneumonia")

    def key(path: Path, **run: object) -> str:
        settings = run_settings_from_config(flower_run_config(task="normal-pneumonia", **run))
        request = site_data_request(settings.run, task, "image-folder", path, tmp_path / "cache")
        return dataset_key(cached_images(request).pixel_hashes)

    same = {key(data), key(moved), key(data, image_size=48), key(data, split_seed=3, val_fraction=0.4)}
    assert len(same) == 1
    _image_folder(moved, per_class=7)  # one more image per class: another data set
    assert key(moved) not in same


def test_concurrent_writers_of_one_ledger_add_up_their_rounds(tmp_path: Path) -> None:
    """Two sites of one machine account share the site-wide ledger: no round is lost."""
    from client.privacy_ledger import PrivacyLedger, default_state_dir
    from common.privacy import DPPlan

    state, ledger = default_state_dir(), _ledger(tmp_path)
    plan = DPPlan(1.1, 0.25, 4, 2, 2.0, 1e-5, 1.0, "rdp")
    PrivacyLedger(ledger, state).save()
    first, second = PrivacyLedger.open(ledger, state), PrivacyLedger.open(ledger, state)
    for opened, key in ((first, "a"), (second, "a"), (second, "b")):
        entry = opened.entry(key)
        entry.plan, entry.history = plan, [(1.1, 0.25, 4)]
        entry.spent.append({"round": 1})
    first.save()
    second.save()
    merged = PrivacyLedger.open(ledger, state).entries
    assert merged["a"].history == [(1.1, 0.25, 4), (1.1, 0.25, 4)]
    assert len(merged["a"].spent) == 2
    assert merged["b"].history == [(1.1, 0.25, 4)]
    assert second.entries["a"].epsilon == merged["a"].epsilon  # the caller sees the sum


def test_a_ledger_of_the_earlier_version_is_migrated_once(tmp_path: Path) -> None:
    """A format-1 ledger in OUT/privacy: its budget for this data set moves to the content entry."""
    import hashlib
    import hmac

    from client.privacy_ledger import legacy_dataset_key

    replied(ask_train(dp_context(tmp_path, dp_site(tmp_path)), 1, 4))
    spent = _entry(_ledger(tmp_path)).to_json()
    _reset("test: set up an earlier version's ledger")
    old = tmp_path / "site" / "privacy" / "ledger.json"
    secret = b"k" * 32
    body = {"format": 1, "entries": {legacy_dataset_key("st-test", "synthetic", None): spent}}
    mac = hmac.new(secret, json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), hashlib.sha256)
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({**body, "mac": mac.hexdigest()}))
    _key(old).write_text(secret.hex())
    _key(old).chmod(0o600)

    replied(ask_train(dp_context(tmp_path, dp_site(tmp_path)), 2, 4))
    assert len(_spent(tmp_path)) == 2  # the earlier round counts
    assert not old.exists()
    assert list(old.parent.glob("ledger.json.migrated-*"))
    (logged,) = (_ledger(tmp_path).parent / "ledger-migrations.log").read_text().splitlines()
    assert json.loads(logged)["from"] == str(old)
    replied(ask_train(dp_context(tmp_path, dp_site(tmp_path)), 3, 4))
    assert len(_spent(tmp_path)) == 3  # migrated once
