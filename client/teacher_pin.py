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

With a pin, the site refuses (an error reply naming both hashes, nothing trained) a round-1
train message whose global model does not hash to the pin, and a run whose
``initial-teacher-sha256`` announces another teacher. It records the verified pin in
``OUT/initial_teacher.json``; a later round is trained only after this site has verified a
round 1 from that pin (e.g. before a restart or a resumed run), so a coordinator cannot skip
the check by starting the site at round 2. The pin and the file come from the site's own
options: run settings that name files (``teacher-weights``) are never opened at a deployed site
(client/site.py).

Without a pin, a site still checks a round-1 model against the run's ``initial-teacher-sha256``
when the run announces one (a model damaged or swapped on its way), but then trusts the
coordinator's announcement.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from client.site import SiteConfig, is_simulated
from common.errors import ConfigError, IntegrityError
from common.initial_teacher import build_initial_teacher, check_sha256_hex, verify_weights, weights_sha256
from common.jsonio import write_json
from common.run_settings import FederatedRunConfig

logger = logging.getLogger(__name__)

PIN_RECORD = "initial_teacher.json"
HASH_KEY = "initial-teacher-sha256"
FILE_KEY = "initial-teacher"


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


def check_global_teacher(
    node_config: Mapping[str, Any],
    settings: FederatedRunConfig,
    site: SiteConfig,
    server_round: int,
    state: Mapping[str, torch.Tensor],
) -> None:
    """Refuse (IntegrityError) a global teacher that the site's pin or the run's hash rules out."""
    announced = settings.run.initial_teacher_sha256
    pin = site_pin(node_config)
    if pin is None:
        if server_round == 1 and announced:
            verify_weights(
                weights_sha256(state),
                announced,
                "the global teacher received in round 1",
                "it is not the initial teacher the run announces (initial-teacher-sha256); the model "
                "was changed on its way or the run is misconfigured",
            )
        return
    expected = _pinned_hash(pin, settings)
    record_path = site.out_dir / PIN_RECORD
    if server_round == 1:
        if announced and announced != expected:
            raise IntegrityError(
                f"the run announces initial teacher {announced}, but this site pins {expected} "
                "(--initial-teacher-sha256 / --initial-teacher): refusing to join a federation that "
                "starts from another teacher"
            )
        verify_weights(
            weights_sha256(state),
            expected,
            "the global teacher received in round 1",
            "it is not the initial teacher this site pins; refusing to train on it (nothing was trained "
            "or sent)",
        )
        write_json(record_path, {"sha256": expected, "verified_at": time.time()})
        logger.info("round 1: the global teacher is the pinned initial teacher %s", expected)
        return
    recorded = _recorded_pin(record_path)
    if recorded != expected:
        raise IntegrityError(
            f"round {server_round}: this site pins initial teacher {expected} but has not verified a "
            f"round 1 that started from it ({record_path} "
            + ("is missing" if recorded is None else f"records {recorded}")
            + "); a site with a pin joins a federation from its first round, or is started without the pin"
        )


def _recorded_pin(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    value = data.get("sha256") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None
