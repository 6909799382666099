"""The resolved settings of one federated run, built from Flower's run_config at the app boundary.

``[tool.flwr.app.config]`` in pyproject.toml is the one schema of run settings (kebab-case keys);
:func:`run_settings_from_config` turns such a mapping into typed, validated dataclasses. Keys
are grouped by prefix: ``teacher-*`` (ModelConfig of the teacher), ``dp-*`` (PrivacyConfig
requested by the server), ``kd-*`` (DistillConfig), un-prefixed training keys (TrainConfig) and
the run-level keys of :class:`RunSettings`. The server and every site read the same mapping, so
they agree on architecture, normalisation, image size and task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from common.config import (
    DistillConfig,
    ModelConfig,
    PrivacyConfig,
    TaskConfig,
    TrainConfig,
    from_mapping,
)
from common.device import ComputeConfig
from common.errors import ConfigError
from common.tasks import Task, get_task

TeacherChoice = Literal["best", "last"]
SELECTION_METRICS = ("auroc_macro", "balanced_accuracy", "accuracy", "f1_macro", "loss")
"""Federated-validation metrics that can pick the best global teacher (lower is better for loss)."""
VALIDATION_MODES = ("in-train", "separate")
"""When sites validate the global teacher: inside the next round's train message, or in a second message."""


@dataclass(frozen=True)
class RunSettings:
    """Run-level settings: rounds, image size, data split, where results go."""

    num_rounds: int = 3
    image_size: int = 64
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    round_timeout: float = 600.0
    site_wait_timeout: float = 600.0
    selection_metric: str = "auroc_macro"
    distill_teacher: TeacherChoice = "best"
    run_dir: str = ""
    cache_dir: str = ""
    simulation_manifest_dir: str = ""
    central_eval_manifest: str = ""
    validation_mode: str = "in-train"
    """``in-train``: one message per site per round (server/rounds.py); ``separate``: two."""

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ConfigError("num-rounds", self.num_rounds, "an integer >= 1")
        if not 16 <= self.image_size <= 1024:
            raise ConfigError("image-size", self.image_size, "an integer between 16 and 1024 pixels")
        for option, value in (("val-fraction", self.val_fraction), ("test-fraction", self.test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(option, value, "a number in [0, 1)")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ConfigError(
                "val-fraction + test-fraction",
                self.val_fraction + self.test_fraction,
                "less than 0.9, leaving images to train on",
            )
        if self.round_timeout <= 0:
            raise ConfigError("round-timeout", self.round_timeout, "a number of seconds > 0")
        if self.site_wait_timeout <= 0:
            raise ConfigError("site-wait-timeout", self.site_wait_timeout, "a number of seconds > 0")
        if self.selection_metric not in SELECTION_METRICS:
            raise ConfigError(
                "selection-metric", self.selection_metric, "one of " + ", ".join(SELECTION_METRICS)
            )
        if self.validation_mode not in VALIDATION_MODES:
            raise ConfigError(
                "validation-mode", self.validation_mode, "one of " + ", ".join(VALIDATION_MODES)
            )
        if self.distill_teacher not in ("best", "last"):
            raise ConfigError("distill-teacher", self.distill_teacher, "'best' or 'last'")
        for option, path in (
            ("run-dir", self.run_dir),
            ("cache-dir", self.cache_dir),
            ("simulation-manifest-dir", self.simulation_manifest_dir),
            ("central-eval-manifest", self.central_eval_manifest),
        ):
            if path and not Path(path).is_absolute():
                raise ConfigError(
                    option,
                    path,
                    "an absolute path (Flower runs apps from other working directories)",
                )


@dataclass(frozen=True)
class FederatedRunConfig:
    """Everything both sides need to know about a run, typed."""

    task: Task
    run: RunSettings
    teacher: ModelConfig
    train: TrainConfig
    privacy: PrivacyConfig
    distill: DistillConfig
    kd_enabled: bool
    kd_no_kd_baseline: bool
    edge_compression: bool
    kd_federated_student_rounds: int
    # device and mixed precision for simulated sites; a deployed site uses its own node config
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    @property
    def uses_dp(self) -> bool:
        return self.privacy.enabled


def run_settings_from_config(config: Mapping[str, Any]) -> FederatedRunConfig:
    """Typed settings from a run_config mapping (missing keys keep their defaults)."""
    task = get_task(str(config.get("task", TaskConfig().name)))
    return FederatedRunConfig(
        task=task,
        run=from_mapping(RunSettings, config),
        teacher=from_mapping(ModelConfig, config, "teacher-"),
        train=from_mapping(TrainConfig, config),
        privacy=from_mapping(PrivacyConfig, config, "dp-"),
        distill=from_mapping(DistillConfig, config, "kd-"),
        kd_enabled=_flag(config, "kd-enabled", True),
        kd_no_kd_baseline=_flag(config, "kd-no-kd-baseline", False),
        edge_compression=_flag(config, "edge-compression", False),
        kd_federated_student_rounds=_count(config, "kd-federated-student-rounds"),
        compute=from_mapping(ComputeConfig, config),
    )


def _count(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, value, "an integer >= 0")
    return value


def _flag(config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = config.get(key, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ConfigError(key, value, "true or false")
