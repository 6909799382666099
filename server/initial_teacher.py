"""The coordinator's side of starting a federation from a (pretrained) weights file.

``cxr-fl-server start --initial-teacher FILE`` (or the run settings ``teacher-weights`` and
``initial-teacher-sha256``) is checked here before the SuperLink starts: the file against the
``FILE.sha256`` beside it (when there is one), its sidecar ``FILE.json`` against the run's
teacher architecture, and the initial global teacher built from it against the hash the run
carries. Without a hash in the settings, the built teacher's hash is put into them, so the
ServerApp and every site check the same number. The ServerApp checks it again when it builds
the teacher (:func:`initial_global_teacher`), so a file changed after ``start`` is refused too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.checkpoint import checksum_path, metadata_path, read_checksum, sha256_file
from common.errors import ConfigError, IntegrityError
from common.initial_teacher import InitialTeacher, build_initial_teacher, verify_weights
from common.run_settings import FederatedRunConfig, run_settings_from_config

logger = logging.getLogger(__name__)

WEIGHTS_KEY = "teacher-weights"
HASH_KEY = "initial-teacher-sha256"


def initial_global_teacher(settings: FederatedRunConfig) -> InitialTeacher:
    """The run's initial teacher, refused (IntegrityError) when it is not the one the run names."""
    teacher = build_initial_teacher(settings.teacher, settings.task, settings.train.seed)
    expected = settings.run.initial_teacher_sha256
    if expected:
        verify_weights(
            teacher.sha256,
            expected,
            "the initial teacher built at the coordinator"
            + (f" from '{teacher.source}'" if teacher.source else " (no teacher-weights file)"),
            "the weights file changed, or the run names another one; start again with the file whose "
            "hash the run carries (initial-teacher-sha256)",
        )
    return teacher


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ConfigError("--initial-teacher", str(path), "an existing weights file")
    if checksum_path(path).is_file():
        recorded, actual = read_checksum(path), sha256_file(path)
        if recorded != actual:
            raise IntegrityError(
                f"'{path}' has sha256 {actual} but '{checksum_path(path).name}' records {recorded}: the "
                "file was changed or damaged after it was written; copy it again"
            )


def _check_sidecar(path: Path, settings: FederatedRunConfig) -> list[str]:
    """Differences between the file's sidecar and the run that make it unusable (error) or worth a note."""
    sidecar = metadata_path(path)
    if not sidecar.is_file():
        return []
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError("--initial-teacher", str(sidecar), f"a readable JSON sidecar ({exc})") from None
    teacher = meta.get("teacher") if isinstance(meta, dict) else None
    if not isinstance(teacher, dict):
        return []
    ours = settings.teacher
    for field, value in (("name", ours.name), ("norm", ours.norm), ("in_channels", ours.in_channels)):
        if field in teacher and teacher[field] != value:
            raise ConfigError(
                f"teacher-{field.replace('_', '-')}",
                value,
                f"{teacher[field]!r}, as in '{path}' (see {sidecar.name}), or a weights file made for "
                f"{value!r}",
            )
    notes = []
    if meta.get("image_size") not in (None, settings.run.image_size):
        notes.append(
            f"'{path}' was pretrained at {meta['image_size']} px; the run uses {settings.run.image_size} px"
        )
    if meta.get("task") not in (None, settings.task.name):
        notes.append(
            f"'{path}' was pretrained for task {meta['task']}; its backbone starts the {settings.task.name} "
            "task with a new head"
        )
    return notes


def prepare_initial_teacher(
    overrides: dict[str, Any], schema: Mapping[str, Any], initial_teacher: Path | None
) -> tuple[InitialTeacher, list[str]] | None:
    """Check the run's initial teacher and put its hash into ``overrides`` (changed in place).

    ``initial_teacher`` (``--initial-teacher``) becomes the ``teacher-weights`` setting, as an
    absolute path (the ServerApp runs in another working directory). Returns the built teacher
    and notes for the console, or None when the run starts from random weights and names no hash.

    Raises:
        ConfigError, IntegrityError, ModelError: a file that is missing, damaged, made for another
            architecture, or whose initial teacher does not have the run's hash.
    """
    if initial_teacher is not None:
        named = overrides.get(WEIGHTS_KEY)
        if named and Path(str(named)).expanduser().resolve() != initial_teacher.expanduser().resolve():
            raise ConfigError(
                "--initial-teacher",
                str(initial_teacher),
                f"the file the run already names (teacher-weights = {named!r}), or no --initial-teacher",
            )
        overrides[WEIGHTS_KEY] = str(initial_teacher)
    if overrides.get(WEIGHTS_KEY):
        path = Path(str(overrides[WEIGHTS_KEY])).expanduser().resolve()
        _check_file(path)
        overrides[WEIGHTS_KEY] = str(path)
    if not overrides.get(WEIGHTS_KEY) and not overrides.get(HASH_KEY):
        return None
    settings = run_settings_from_config({**schema, **overrides})
    notes = _check_sidecar(settings.teacher.weights, settings) if settings.teacher.weights else []
    teacher = initial_global_teacher(settings)
    overrides[HASH_KEY] = teacher.sha256
    return teacher, notes
