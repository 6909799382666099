"""Saving and loading weights: checksums, atomic writes, metadata, Opacus prefixes."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from common import checkpoint
from common.checkpoint import (
    checksum_path,
    load_metadata,
    load_model_state,
    metadata_path,
    save_model,
    sha256_file,
    unwrap_state_dict,
)
from common.errors import IntegrityError, ModelError


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2))


def test_round_trip_with_checksum_and_metadata(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "teacher.pt"

    digest = save_model(model, path, metadata={"round": 3, "task": "nih14", "weights": Path("/x/y.pt")})
    state = load_model_state(path)

    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == sha256_file(path)
    assert checksum_path(path).read_text() == f"{digest}  teacher.pt\n"
    assert json.loads(metadata_path(path).read_text()) == {"round": 3, "task": "nih14", "weights": "/x/y.pt"}
    assert load_metadata(path) == {"round": 3, "task": "nih14", "weights": "/x/y.pt"}
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value)
    fresh = _model(seed=1)
    fresh.load_state_dict(state)


def test_checksum_file_is_sha256sum_compatible(tmp_path: Path) -> None:
    if shutil.which("sha256sum") is None:
        pytest.skip("sha256sum not installed")
    path = tmp_path / "m.pt"
    save_model(_model(), path)

    result = subprocess.run(
        ["sha256sum", "-c", checksum_path(path).name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_tampered_file_raises_integrity_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "student.pt"
    save_model(_model(), path)
    torch.save(_model(seed=5).state_dict(), path)  # replaced behind our back

    with pytest.raises(IntegrityError, match=r"student\.pt"):
        load_model_state(path)
    state = load_model_state(path, verify=False)
    assert torch.equal(state["2.bias"], _model(seed=5).state_dict()["2.bias"])


def test_missing_or_malformed_checksum(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_model(_model(), path)
    checksum_path(path).unlink()

    with pytest.raises(IntegrityError, match=r"m\.pt\.sha256.*missing"):
        load_model_state(path)
    assert load_model_state(path, verify=False).keys() == _model().state_dict().keys()

    checksum_path(path).write_text("not-a-digest  m.pt\n")
    with pytest.raises(IntegrityError, match="malformed"):
        load_model_state(path)


def test_missing_and_unreadable_weights_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_model_state(tmp_path / "absent.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a torch file")
    with pytest.raises(ModelError, match=r"junk\.pt"):
        load_model_state(junk, verify=False)
    with pytest.raises(ModelError, match="does not exist"):
        save_model(_model(), tmp_path / "no" / "such" / "dir.pt")


def test_failed_save_leaves_the_previous_file_and_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.pt"
    digest = save_model(_model(), path)
    before = path.read_bytes()

    def broken_save(obj: Any, handle: Any) -> None:
        handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(_model(seed=9), path)

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.pt.sha256"]
    monkeypatch.undo()
    assert sha256_file(path) == digest
    load_model_state(path)


def test_unwrap_state_dict_strips_opacus_prefix() -> None:
    weight, bias = torch.ones(2), torch.zeros(2)

    out = unwrap_state_dict({"_module.fc.weight": weight, "_module._module.fc.bias": bias, "plain": bias})

    assert list(out) == ["fc.weight", "fc.bias", "plain"]
    assert out["fc.weight"] is weight
    with pytest.raises(ModelError, match="twin"):
        unwrap_state_dict({"_module.fc.weight": weight, "fc.weight": weight})


def test_save_unwraps_and_moves_to_cpu(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.pt"
    state = {f"_module.{k}": v for k, v in _model().state_dict().items()}

    save_model(state, path, metadata=None)
    loaded = load_model_state(path)

    assert set(loaded) == set(_model().state_dict())
    assert all(t.device.type == "cpu" for t in loaded.values())
    assert not metadata_path(path).exists()
    assert load_metadata(path) is None
