"""Run settings have their defaults in one place: pyproject's ``[tool.flwr.app.config]``.

Every settings dataclass field that is a run setting either has no default of its own or the very
default of pyproject; the loader's own defaults (``kd-enabled`` ...) are pyproject's too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from common.config import (
    CentralDPSettings,
    DistillConfig,
    ModelConfig,
    PrivacyConfig,
    StrategySettings,
    TaskConfig,
    TrainConfig,
)
from common.device import ComputeConfig
from common.run_settings import RunSettings, load_schema, run_settings_from_config
from common.tracking import TrackingSettings

# every dataclass read from run settings, with the prefix of its keys (common/run_settings.py)
SETTINGS_DATACLASSES: tuple[tuple[type, str], ...] = (
    (RunSettings, ""),
    (ModelConfig, "teacher-"),
    (TrainConfig, ""),
    (PrivacyConfig, "dp-"),
    (DistillConfig, "kd-"),
    (ComputeConfig, ""),
    (StrategySettings, ""),
    (CentralDPSettings, "central-dp-"),
    (TrackingSettings, ""),
)
# run settings the loader reads itself, not through a dataclass field's name
LOADER_KEYS = {"task", "kd-enabled", "kd-no-kd-baseline", "edge-compression", "kd-federated-student-rounds"}


def _as_setting(value: Any) -> Any:
    """A field's default as a run setting spells it (paths as text, None as "")."""
    if value is None:
        return ""
    return str(value) if isinstance(value, Path) else value


def _same(default: Any, setting: Any) -> bool:
    """Equal, and a boolean only where the other is one (``1 == True`` in Python)."""
    return bool(default == setting) and isinstance(default, bool) == isinstance(setting, bool)


def _field_defaults() -> dict[str, tuple[str, Any]]:
    """run-setting key -> (where the default is declared, the default) for every field with one."""
    defaults: dict[str, tuple[str, Any]] = {}
    for cls, prefix in SETTINGS_DATACLASSES:
        for field in dataclasses.fields(cls):
            key = prefix + field.name.replace("_", "-")
            if field.default is not dataclasses.MISSING:
                defaults[key] = (f"{cls.__name__}.{field.name}", _as_setting(field.default))
            elif field.default_factory is not dataclasses.MISSING:
                defaults[key] = (f"{cls.__name__}.{field.name}", _as_setting(field.default_factory()))
    return defaults


def test_every_dataclass_default_is_pyprojects() -> None:
    schema = load_schema()
    differing = [
        f"{where} = {default!r}, pyproject {key} = {schema[key]!r}"
        for key, (where, default) in _field_defaults().items()
        if key in schema and not _same(default, schema[key])
    ]
    assert not differing, "defaults declared twice and different: " + "; ".join(differing)


def test_every_settings_field_is_a_run_setting_and_every_run_setting_is_read() -> None:
    schema = load_schema()
    fields = {
        prefix + field.name.replace("_", "-")
        for cls, prefix in SETTINGS_DATACLASSES
        for field in dataclasses.fields(cls)
    }
    assert sorted(fields - set(schema)) == []  # a field whose default nobody could set
    assert sorted(set(schema) - fields - LOADER_KEYS) == []  # a setting no dataclass reads
    assert TaskConfig().name == schema["task"]


def test_the_loaders_own_defaults_are_pyprojects() -> None:
    """A run_config without a key gives the settings of pyproject's default for it."""
    assert run_settings_from_config({}) == run_settings_from_config(load_schema())
