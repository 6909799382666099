"""A site's own check of the initial global teacher it is asked to train (node config only).

Whatever the coordinator claims, a site operator can fix what its federation starts from:

- ``cxr-fl-client start --initial-teacher-sha256 HEX`` (node config ``initial-teacher-sha256``):
  the weights hash (common/initial_teacher.py) of the initial global teacher, as printed by
  ``cxr-fl-server start --initial-teacher FILE`` (for a file made for the run's task, also by
  ``cxr-fl-server pretrain``);
- ``cxr-fl-client start --initial-teacher FILE`` (node config ``initial-teacher``): a weights file
  the operator received and checked (e.g. with its ``FILE.sha256``, and its sidecar naming the
  public data it was trained on). The site builds the run's initial teacher from it exactly as
  the coordinator does (the run's architecture and seed; a head for another task re-initialised)
  and takes that model's hash as its pin. With both options, the two must agree.

With a pin, every Flower run this site takes part in starts from the pin: the first message
of a run that the site accepts (whatever its phase and whatever round the coordinator calls
it) must bring a model whose weights hash is the pin, and the run must not announce another
``initial-teacher-sha256``; otherwise the site refuses (an error reply naming both hashes,
nothing trained). A first message of a federated-student phase (no teacher to check) is
refused too. The site records what each run started from in its journal, keyed by Flower's run
id (client/run_journal.py); later messages of a run are taken only when the run started from
the pin at this site, and a federated-student phase only after this site completed the run's
distillation round. A pin verified in one run vouches for no other: a resumed run
(``cxr-fl-server start --resume``) is a new Flower run that starts from a checkpoint, so a
pinned site declines it, and joins only once its operator has checked that checkpoint and pins
its hash instead. Models of later rounds are the coordinator's aggregates; a pin cannot check
them. The pin and the file come from the site's own options: run settings that name files
(``teacher-weights``) are never opened at a deployed site (client/site.py).

Without a pin, a site still checks a round-1 model against the run's ``initial-teacher-sha256``
when the run announces one (a model damaged or swapped on its way), but then trusts the
coordinator's announcement.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from client.run_journal import RunJournal
from client.site import is_simulated
from common.errors import ConfigError, IntegrityError
from common.initial_teacher import build_initial_teacher, check_sha256_hex, verify_weights, weights_sha256
from common.protocol import DISTILL_MESSAGE_TYPE, STUDENT_FINAL_MESSAGE_TYPE, STUDENT_ROUND_MESSAGE_TYPE
from common.run_settings import FederatedRunConfig

logger = logging.getLogger(__name__)

HASH_KEY = "initial-teacher-sha256"
FILE_KEY = "initial-teacher"
TEACHER_ROUND = "train"
STUDENT_KINDS = (STUDENT_ROUND_MESSAGE_TYPE, STUDENT_FINAL_MESSAGE_TYPE)


@dataclass(frozen=True)
class TeacherPin:
    """The site's own expectation of the initial teacher: a weights hash, a local file, or both."""

    sha256: str | None = None
    weights_file: Path | None = None


def site_pin(node_config: Mapping[str, Any]) -> TeacherPin | None:
    """The pin in a deployed site's node config (None without one; simulated sites have none)."""
    if is_simulated(node_config):
        return None
    raw_hash = str(node_config.get(HASH_KEY) or "")
    raw_file = str(node_config.get(FILE_KEY) or "")
    if not raw_hash and not raw_file:
        return None
    sha = check_sha256_hex(f"node_config '{HASH_KEY}'", raw_hash) if raw_hash else None
    path = Path(raw_file) if raw_file else None
    if path is not None and not (path.is_absolute() and path.is_file()):
        raise ConfigError(
            f"node_config '{FILE_KEY}'", raw_file, "the absolute path of an existing weights file"
        )
    return TeacherPin(sha, path)


def _pinned_hash(pin: TeacherPin, settings: FederatedRunConfig) -> str:
    if pin.weights_file is None:
        return pin.sha256 or ""
    built = build_initial_teacher(
        replace(settings.teacher, weights=pin.weights_file), settings.task, settings.train.seed
    )
    if pin.sha256 is not None:
        verify_weights(
            built.sha256,
            pin.sha256,
            f"the initial teacher this site builds from its file '{pin.weights_file}' for this run",
            "this site's --initial-teacher file and --initial-teacher-sha256 disagree; check which one "
            "the coordinator published",
        )
    return built.sha256


def check_run_start(
    node_config: Mapping[str, Any],
    settings: FederatedRunConfig,
    journal: RunJournal,
    kind: str,
    message: Mapping[str, Any],
    received: Callable[[], Mapping[str, torch.Tensor]],
) -> None:
    """Refuse (IntegrityError) a message of a run that did not start from the site's pin.

    ``kind`` is the message type, ``message`` its config record, ``received()`` the model it
    brought (hashed only when needed). Without a pin, a round-1 teacher round is checked
    against the hash the run announces, if any.
    """
    pin = site_pin(node_config)
    announced = settings.run.initial_teacher_sha256
    if pin is None:
        if kind == TEACHER_ROUND and message.get("server-round") == 1 and announced:
            verify_weights(
                weights_sha256(received()),
                announced,
                "the global teacher received in round 1",
                "it is not the initial teacher the run announces (initial-teacher-sha256); the model "
                "was changed on its way or the run is misconfigured",
            )
        return
    expected = _pinned_hash(pin, settings)
    if journal.is_new:
        _check_first_message(expected, announced, journal, kind, received)
        journal.started_from = expected
        logger.info("run %s starts from the pinned initial teacher %s", journal.run_id, expected)
        return
    if journal.started_from != expected:
        raise IntegrityError(
            f"run {journal.run_id}: this site pins initial teacher {expected}, but its first message of "
            "this run was taken "
            + ("without a pin" if journal.started_from is None else f"from {journal.started_from}")
            + f" ({journal.path}); the site takes no further part in this run"
        )
    if kind in STUDENT_KINDS and DISTILL_MESSAGE_TYPE not in journal.completed:
        raise IntegrityError(
            f"run {journal.run_id}: a federated-student message, but this site has not completed this "
            "run's distillation round, so it holds no teacher of this run to distil from"
        )


def _check_first_message(
    expected: str,
    announced: str,
    journal: RunJournal,
    kind: str,
    received: Callable[[], Mapping[str, torch.Tensor]],
) -> None:
    if kind in STUDENT_KINDS:
        raise IntegrityError(
            f"run {journal.run_id}: its first message to this site is a federated-student message "
            f"({kind}), which brings no teacher to check against the pinned initial teacher {expected}; "
            "a site with a pin joins a run from the initial teacher"
        )
    if announced and announced != expected:
        raise IntegrityError(
            f"the run announces initial teacher {announced}, but this site pins {expected} "
            "(--initial-teacher-sha256 / --initial-teacher): refusing to join a federation that "
            "starts from another teacher"
        )
    actual = weights_sha256(received())
    if actual != expected:
        raise IntegrityError(
            f"run {journal.run_id}: the model of this site's first message of the run ({kind}) has "
            f"weights sha256 {actual}; it is not the initial teacher this site pins ({expected}), "
            "whatever round the coordinator calls it: refusing to work on it (nothing was trained or "
            "sent). A resumed run starts from its checkpoint, not from the pin: a site joins it only "
            "if its operator checks that model and pins it (--initial-teacher-sha256)"
        )
