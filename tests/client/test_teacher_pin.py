"""A site's own pin of the initial teacher: a tampered model or file is refused, whatever the server says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.config import parse_config_args

from client.app import app
from client.deploy import SiteNodeSettings
from common.checkpoint import save_model
from common.errors import ConfigError
from common.initial_teacher import weights_sha256
from common.protocol import DISTILL_MESSAGE_TYPE, SITE_BAD_INPUT, STUDENT_ROUND_MESSAGE_TYPE
from common.run_settings import run_settings_from_config
from server.app import initial_teacher
from tests.helpers import flower_run_config

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _run_config(tmp_path: Path, **extra: object) -> dict[str, object]:
    settings: dict[str, object] = {"num_rounds": 2, **extra}
    return flower_run_config(
        teacher_name="tiny-cnn",
        image_size=32,
        run_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        **settings,
    )


def _site(tmp_path: Path, **pin: object) -> dict[str, object]:
    return {"site-name": "st-pin", "data-format": "synthetic", "out-dir": str(tmp_path / "site"), **pin}


def _initial(run_config: dict[str, object]) -> dict[str, torch.Tensor]:
    return initial_teacher(run_settings_from_config(run_config)).to_torch_state_dict()


def _send(
    tmp_path: Path,
    node_config: dict[str, object],
    state: dict[str, torch.Tensor],
    server_round: int = 1,
    *,
    run_id: int = 7,
    message_type: str = "train",
    **run: object,
) -> Message:
    """One message of Flower run ``run_id`` to the site, bringing ``state``."""
    run_config = _run_config(tmp_path, **run)
    context = Context(
        run_id=run_id, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config
    )
    config = ConfigRecord({"server-round": server_round, "num-rounds": 2})
    content = RecordDict({"arrays": ArrayRecord(state), "config": config})
    return app(Message(content, dst_node_id=1, message_type=message_type), context)


def _train(
    tmp_path: Path,
    node_config: dict[str, object],
    state: dict[str, torch.Tensor],
    server_round: int = 1,
    **run: object,
) -> Message:
    return _send(tmp_path, node_config, state, server_round, **run)


def _journal(tmp_path: Path, run_id: int = 7) -> Path:
    return tmp_path / "site" / "runs" / f"run_{run_id}.json"


def _tampered(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = {k: v.clone() for k, v in state.items()}
    changed["head.1.bias"][0] += 1e-3  # one number, e.g. a model crafted by the coordinator
    return changed


def test_the_hash_travels_as_arrays_do(tmp_path: Path) -> None:
    state = _initial(_run_config(tmp_path))
    received = ArrayRecord(state).to_torch_state_dict()  # what Flower hands a site
    assert weights_sha256(received) == weights_sha256(state)
    assert weights_sha256(_tampered(state)) != weights_sha256(state)


def test_a_site_trains_round_1_from_the_teacher_it_pinned(tmp_path: Path) -> None:
    state = _initial(_run_config(tmp_path))
    pin = weights_sha256(state)

    reply = _train(tmp_path, _site(tmp_path, **{"initial-teacher-sha256": pin}), state)

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert pin in _journal(tmp_path).read_text(encoding="utf-8")
    later = _train(tmp_path, _site(tmp_path, **{"initial-teacher-sha256": pin}), _tampered(state), 2)
    assert not later.has_error()  # later rounds bring trained models; round 1 was verified


def test_a_site_refuses_a_round_1_model_that_is_not_its_pin(tmp_path: Path) -> None:
    state = _initial(_run_config(tmp_path))
    pin = weights_sha256(state)

    reply = _train(tmp_path, _site(tmp_path, **{"initial-teacher-sha256": pin}), _tampered(state))

    assert reply.has_error()
    assert reply.error.code == SITE_BAD_INPUT
    assert "not the initial teacher this site pins" in reply.error.reason
    assert pin in reply.error.reason
    assert not _journal(tmp_path).exists()


def test_the_pin_wins_over_the_hash_the_run_announces(tmp_path: Path) -> None:
    state = _initial(_run_config(tmp_path))
    tampered = _tampered(state)

    reply = _train(
        tmp_path,
        _site(tmp_path, **{"initial-teacher-sha256": weights_sha256(state)}),
        tampered,
        initial_teacher_sha256=weights_sha256(tampered),  # the coordinator vouches for its own model
    )

    assert reply.has_error()
    assert "the run announces initial teacher" in reply.error.reason


def test_the_first_message_of_a_run_must_bring_the_pin_whatever_round_it_claims(tmp_path: Path) -> None:
    state = _initial(_run_config(tmp_path))
    site = _site(tmp_path, **{"initial-teacher-sha256": weights_sha256(state)})

    foreign = _train(tmp_path, site, _tampered(state), 2)  # "round 2": no round 1 to check
    from_pin = _train(tmp_path, site, state, 2)

    assert foreign.has_error()
    assert "not the initial teacher this site pins" in foreign.error.reason
    assert not from_pin.has_error(), from_pin.error.reason if from_pin.has_error() else ""


def test_a_pin_verified_in_one_run_does_not_vouch_for_another(tmp_path: Path) -> None:
    """Issue 24 item 7: a copied run folder with a crafted checkpoint, resumed (a new Flower run)
    at round 2: the site had verified round 1 of an earlier run from its pin."""
    state = _initial(_run_config(tmp_path))
    pin = weights_sha256(state)
    site = _site(tmp_path, **{"initial-teacher-sha256": pin})
    assert not _send(tmp_path, site, state, 1, run_id=7).has_error()
    crafted = _tampered(state)

    resumed = _send(tmp_path, site, crafted, 2, run_id=8, num_rounds=3)

    assert resumed.has_error()
    assert resumed.error.code == SITE_BAD_INPUT
    reason = resumed.error.reason
    assert "not the initial teacher this site pins" in reason
    assert pin in reason
    assert weights_sha256(crafted) in reason  # what its operator checks before pinning it
    assert "--initial-teacher-sha256" in reason
    assert not _journal(tmp_path, 8).exists()


@pytest.mark.parametrize("message_type", ["evaluate", DISTILL_MESSAGE_TYPE])
def test_no_phase_takes_a_foreign_model_as_the_first_message_of_a_run(
    tmp_path: Path, message_type: str
) -> None:
    state = _initial(_run_config(tmp_path))
    site = _site(tmp_path, **{"initial-teacher-sha256": weights_sha256(state)})

    reply = _send(tmp_path, site, _tampered(state), 1, message_type=message_type, kd_epochs=1)

    assert reply.has_error()
    assert "not the initial teacher this site pins" in reply.error.reason
    assert not (tmp_path / "site" / "student").exists()  # nothing distilled or exported


def test_a_federated_student_round_is_never_the_start_of_a_pinned_run(tmp_path: Path) -> None:
    state = _initial(_run_config(tmp_path))
    site = _site(tmp_path, **{"initial-teacher-sha256": weights_sha256(state)})
    run = {"kd_epochs": 1, "kd_federated_student_rounds": 1}
    distilled = _send(tmp_path, site, state, 1, message_type=DISTILL_MESSAGE_TYPE, **run)
    assert not distilled.has_error(), distilled.error.reason if distilled.has_error() else ""
    assert (tmp_path / "site" / "global_teacher.pt").is_file()  # a teacher of run 7 at the site
    student = _student_state(tmp_path)

    in_the_same_run = _send(tmp_path, site, student, 1, message_type=STUDENT_ROUND_MESSAGE_TYPE, **run)
    first_of_a_run = _send(
        tmp_path, site, student, 1, run_id=8, message_type=STUDENT_ROUND_MESSAGE_TYPE, **run
    )

    assert not in_the_same_run.has_error(), (
        in_the_same_run.error.reason if in_the_same_run.has_error() else ""
    )
    assert first_of_a_run.has_error()
    assert "federated-student message" in first_of_a_run.error.reason


def test_a_student_round_needs_this_runs_distillation_round(tmp_path: Path) -> None:
    state = _initial(_run_config(tmp_path))
    site = _site(tmp_path, **{"initial-teacher-sha256": weights_sha256(state)})
    run = {"kd_epochs": 1, "kd_federated_student_rounds": 1}
    assert not _send(tmp_path, site, state, 1, message_type=DISTILL_MESSAGE_TYPE, **run).has_error()
    assert not _send(tmp_path, site, state, 1, run_id=8).has_error()  # run 8: a teacher round only

    reply = _send(
        tmp_path, site, _student_state(tmp_path), 1, run_id=8, message_type=STUDENT_ROUND_MESSAGE_TYPE, **run
    )

    assert reply.has_error()
    assert "has not completed this run's distillation round" in reply.error.reason


def test_a_pin_set_in_the_middle_of_a_run_does_not_adopt_it(tmp_path: Path) -> None:
    state = _initial(_run_config(tmp_path))
    assert not _train(tmp_path, _site(tmp_path), _tampered(state)).has_error()  # no pin yet

    pinned = _train(tmp_path, _site(tmp_path, **{"initial-teacher-sha256": weights_sha256(state)}), state, 2)

    assert pinned.has_error()
    assert "was taken without a pin" in pinned.error.reason


def _student_state(tmp_path: Path) -> dict[str, torch.Tensor]:
    from common.local import build_loaded_model, student_config

    settings = run_settings_from_config(_run_config(tmp_path))
    config = student_config(settings.distill, settings.teacher, settings.teacher.norm)
    return build_loaded_model(config, settings.task, None).state_dict()


def test_a_site_checks_round_1_against_its_own_weights_file(tmp_path: Path) -> None:
    state = _initial(_run_config(tmp_path))
    good, bad = tmp_path / "given.pt", tmp_path / "swapped.pt"
    save_model(state, good)
    save_model(_tampered(state), bad)

    accepted = _train(tmp_path, _site(tmp_path, **{"initial-teacher": str(good)}), state)
    refused = _train(tmp_path, _site(tmp_path / "b", **{"initial-teacher": str(bad)}), state)
    both_disagree = _train(
        tmp_path,
        _site(tmp_path / "c", **{"initial-teacher": str(good), "initial-teacher-sha256": "ab" * 32}),
        state,
    )

    assert not accepted.has_error(), accepted.error.reason if accepted.has_error() else ""
    assert refused.has_error()
    assert "not the initial teacher this site pins" in refused.error.reason
    assert both_disagree.has_error()
    assert "disagree" in both_disagree.error.reason


def test_without_a_pin_round_1_is_checked_against_the_runs_hash(tmp_path: Path) -> None:
    state = _initial(_run_config(tmp_path))

    ok = _train(tmp_path, _site(tmp_path), state, initial_teacher_sha256=weights_sha256(state))
    refused = _train(
        tmp_path, _site(tmp_path), _tampered(state), initial_teacher_sha256=weights_sha256(state)
    )

    assert not ok.has_error()
    assert refused.has_error()
    assert "not the initial teacher the run announces" in refused.error.reason


def test_a_file_the_server_names_is_never_opened_at_a_site(tmp_path: Path) -> None:
    state = _initial(_run_config(tmp_path))
    swapped = tmp_path / "swapped.pt"
    save_model(_tampered(state), swapped)  # a file that exists at the site, named by the server

    reply = _train(tmp_path, _site(tmp_path), state, teacher_weights=str(swapped))

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""  # not a pin, not loaded


def test_start_options_reach_the_node_config_checked(tmp_path: Path) -> None:
    weights = tmp_path / "given.pt"
    save_model(_initial(_run_config(tmp_path)), weights)
    settings = SiteNodeSettings(
        server="127.0.0.1:9092",
        site="site-a",
        data_format="synthetic",
        data_path=None,
        out_dir=tmp_path / "out",
        insecure=True,
        initial_teacher_sha256="AB" * 32,
        initial_teacher=weights,
    )
    node_config = parse_config_args([settings.node_config()])
    assert node_config["initial-teacher-sha256"] == "ab" * 32
    assert node_config["initial-teacher"] == str(weights.resolve())
    with pytest.raises(ConfigError, match="--initial-teacher-sha256"):
        SiteNodeSettings(
            server="127.0.0.1:9092",
            site="site-a",
            data_format="synthetic",
            data_path=None,
            out_dir=tmp_path / "out",
            insecure=True,
            initial_teacher_sha256="not-a-hash",
        )
    with pytest.raises(ConfigError, match="--initial-teacher"):
        SiteNodeSettings(
            server="127.0.0.1:9092",
            site="site-a",
            data_format="synthetic",
            data_path=None,
            out_dir=tmp_path / "out",
            insecure=True,
            initial_teacher=tmp_path / "missing.pt",
        )
