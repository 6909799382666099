"""The teacher a federation starts from, and the one hash every party can check it by.

A federation starts from the run's initial teacher: the registered architecture built with the
run's ``seed`` and, when ``teacher-weights`` names a file at the coordinator (e.g. one written by
``cxr-fl-server pretrain``), that file's weights loaded into it. A file trained for another task
(a 14-finding NIH teacher for the 3-class task) gives its backbone: the head layers whose shapes
differ are left as initialised (seeded) and reported, everything else is loaded.

**Weights hash.** :func:`weights_sha256` is the SHA-256 of a state_dict's *tensors*, not of a
file: for each entry in sorted key order, the key (UTF-8), the dtype name (``torch.float32``),
the shape (``3,3``) and the number of bytes, each followed by a NUL byte, then the tensor's
contiguous bytes in the machine's byte order (little-endian on x86 and ARM). The same weights
give the same hash in a ``torch.save`` file, in a checkpoint of another layout, and in the
arrays a site receives from Flower, which re-serialises them. ``sha256sum`` of a file is a
different number (the sidecar of ``cxr-fl-server pretrain`` records both).

The run setting ``initial-teacher-sha256`` carries the weights hash of the initial global
teacher (what the sites receive in round 1); the ServerApp refuses to start from anything else,
and a site may pin its own expected hash (client/teacher_pin.py).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from common.config import ModelConfig
from common.errors import ConfigError, IntegrityError
from common.models import build_model
from common.models.weights import head_shapes_differ, load_state, read_state_dict
from common.tasks import Task
from common.training import seed_everything

logger = logging.getLogger(__name__)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def weights_sha256(state: Mapping[str, Tensor]) -> str:
    """Hex SHA-256 of the canonical bytes of ``state`` (see the module docstring)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        shape = ",".join(str(d) for d in tensor.shape)
        header = f"{key}\0{tensor.dtype}\0{shape}\0{len(raw)}\0".encode()
        digest.update(header)
        digest.update(raw)
    return digest.hexdigest()


def check_sha256_hex(option: str, value: str) -> str:
    """``value`` as 64 lower-case hex digits; ConfigError naming ``option`` otherwise."""
    text = value.strip().lower()
    if not _HEX64.match(text):
        raise ConfigError(
            option,
            value,
            "64 hexadecimal digits: the weights hash printed by `cxr-fl-server pretrain` or "
            "`cxr-fl-server start --initial-teacher FILE`",
        )
    return text


@dataclass(frozen=True)
class InitialTeacher:
    """The initial global teacher: its weights, their hash, and which layers came from a file."""

    state: dict[str, Tensor]
    sha256: str
    source: Path | None
    loaded: tuple[str, ...] = ()
    reset: tuple[str, ...] = ()
    rgb_to_grey: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for logs and the coordinator's console."""
        if self.source is None:
            return f"initial teacher: random initialisation (weights sha256 {self.sha256})"
        text = f"initial teacher from '{self.source}': {len(self.loaded)} tensors loaded"
        if self.reset:
            text += f", {len(self.reset)} re-initialised for this task ({', '.join(self.reset)})"
        if self.rgb_to_grey:
            text += f", RGB kernels summed to grey in {', '.join(self.rgb_to_grey)}"
        return text + f"; weights sha256 {self.sha256}"


def build_initial_teacher(teacher: ModelConfig, task: Task, seed: int) -> InitialTeacher:
    """The run's initial teacher: ``teacher`` built with ``seed``, its weights file (if any) loaded.

    The same weights as :func:`common.local.initial_teacher_state` (the model is built, with
    the same random draws, before the file is read), plus the report of what was loaded.

    Raises:
        ModelError: the weights file cannot be read or does not fit (each layer named).
    """
    seed_everything(seed)
    model = build_model(replace(teacher, weights=None), task.num_classes)
    if teacher.weights is None:
        state = model.state_dict()
        return InitialTeacher(dict(state), weights_sha256(state), None)
    file_state = read_state_dict(teacher.weights)
    skip_head = head_shapes_differ(model, file_state)
    report = load_state(model, file_state, source=str(teacher.weights), skip_head=skip_head)
    state = dict(model.state_dict())
    loaded = tuple(k for k in state if k not in report.skipped_head)
    result = InitialTeacher(
        state,
        weights_sha256(state),
        Path(teacher.weights),
        loaded=loaded,
        reset=report.skipped_head,
        rgb_to_grey=report.rgb_to_grey,
    )
    logger.info("%s", result.describe())
    return result


def verify_weights(actual: str, expected: str, what: str, fix: str) -> None:
    """IntegrityError when the weights hash ``actual`` of ``what`` is not ``expected``."""
    if actual != expected:
        raise IntegrityError(f"{what} has weights sha256 {actual}, but {expected} was expected: {fix}")
