"""Saving and loading model weights with checksums, never leaving half-written files.

:func:`save_model` writes a state_dict with ``torch.save`` to a temporary file in the target
folder and moves it into place with ``os.replace`` (atomic on one file system), then writes

* ``<file>.sha256`` in ``sha256sum`` format (``"<hex>  <name>\\n"``, so ``sha256sum -c`` works
  in that folder), and
* ``<file>.json`` with the caller's metadata, when given,

each of those atomically too. Saved state_dicts are always unwrapped (:func:`unwrap_state_dict`)
and on the CPU, so a file written from an Opacus-wrapped model loads into a plain one.
:func:`load_model_state` checks the checksum before unpickling anything (``weights_only=True``)
and raises :class:`~common.errors.IntegrityError` naming the file when it does not match or is
missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from common.errors import IntegrityError, ModelError

logger = logging.getLogger(__name__)

OPACUS_PREFIX = "_module."
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def checksum_path(path: str | os.PathLike[str]) -> Path:
    """Where the checksum of ``path`` lives: ``<path>.sha256``."""
    p = Path(path)
    return p.with_name(p.name + ".sha256")


def metadata_path(path: str | os.PathLike[str]) -> Path:
    """Where the metadata of ``path`` lives: ``<path>.json``."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def sha256_file(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def unwrap_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The same state_dict with Opacus' ``_module.`` key prefix removed (repeatedly, if nested)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(OPACUS_PREFIX):
            name = name[len(OPACUS_PREFIX) :]
        if name in out:
            raise ModelError(
                f"state_dict has both '{key}' and its unwrapped twin '{name}'; cannot unwrap it."
            )
        out[name] = value
    return out


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync, then move it into place."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; weights and sidecars are ordinary files
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def save_model(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Save weights atomically with a ``.sha256`` (and optional ``.json``) beside; return the digest."""
    target = Path(path)
    if not target.parent.is_dir():
        raise ModelError(f"cannot save weights to '{target}': folder '{target.parent}' does not exist.")
    if isinstance(model_or_state_dict, nn.Module):
        state: Mapping[str, Tensor] = model_or_state_dict.state_dict()
    else:
        state = model_or_state_dict
    unwrapped = unwrap_state_dict(state)
    clean = {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in unwrapped.items()}
    _atomic_write(target, lambda handle: torch.save(clean, handle))
    digest = sha256_file(target)
    _atomic_write(checksum_path(target), lambda handle: handle.write(f"{digest}  {target.name}\n".encode()))
    if metadata is not None:
        text = json.dumps(dict(metadata), indent=2, sort_keys=True, default=str) + "\n"
        _atomic_write(metadata_path(target), lambda handle: handle.write(text.encode()))
    logger.debug("saved %d tensors to %s (sha256 %s)", len(clean), target, digest)
    return digest


def read_checksum(path: str | os.PathLike[str]) -> str:
    """The hex digest recorded in ``<path>.sha256`` (IntegrityError when missing or malformed)."""
    sums = checksum_path(path)
    if not sums.is_file():
        raise IntegrityError(
            f"checksum file '{sums}' is missing, so '{path}' cannot be verified; re-save the weights with "
            "common.checkpoint.save_model, or load with verify=False if you trust the file."
        )
    fields = sums.read_text(encoding="utf-8").split()
    if not fields or not _HEX64.match(fields[0].lower()):
        raise IntegrityError(f"checksum file '{sums}' is malformed; expected '<64 hex digits>  <file name>'.")
    return fields[0].lower()


def load_model_state(
    path: str | os.PathLike[str], *, verify: bool = True, map_location: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """Load a state_dict saved by :func:`save_model` (checksum verified unless ``verify=False``)."""
    source = Path(path)
    if not source.is_file():
        raise ModelError(f"weights file '{source}' not found; check the path.")
    if verify:
        expected = read_checksum(source)
        actual = sha256_file(source)
        if actual != expected:
            raise IntegrityError(
                f"'{source}' has sha256 {actual} but '{checksum_path(source).name}' records {expected}: "
                "the file is corrupt or was changed after saving; copy it again from its origin."
            )
    try:
        state = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ModelError(f"'{source}' is not a readable torch weights file: {exc}") from exc
    if not isinstance(state, Mapping):
        raise ModelError(f"'{source}' holds a {type(state).__name__}, not a state_dict.")
    return unwrap_state_dict(state)


def load_metadata(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The metadata saved beside ``path`` (None when there is none)."""
    meta = metadata_path(path)
    if not meta.is_file():
        return None
    data = json.loads(meta.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ModelError(f"metadata file '{meta}' does not hold a JSON object.")
    return data
