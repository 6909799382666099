"""Run settings: the one place that owns their schema, reading, coercion and checking.

``[tool.flwr.app.config]`` in pyproject.toml is the one schema of run settings (kebab-case keys,
each default's type is the setting's type) and the one place their defaults are decided (a
dataclass field's default is the same value: tests/test_settings_defaults.py); :func:`load_schema`
reads it, so a key added there works everywhere. This module also owns

- reading TOML files (:func:`read_toml`: UTF-8, a clear error naming the file) and ``--set
  KEY=VALUE`` items (:func:`parse_set_option`);
- the one coercer (:func:`coerce`) and the one boolean parser (:func:`parse_bool`): a value must
  already have the setting's type (TOML gives ``2`` and ``true``; ``"2"`` and ``"no"`` are
  errors, never an int or a boolean);
- the one loader: :func:`check_run_config` (schema defaults + overrides, checked before any work
  starts; both command lines, the simulation, the benchmarks and the study) on top of
  :func:`run_settings_from_config` (also what the ServerApp and the ClientApp call on the
  run_config Flower hands them), which builds the typed, validated :class:`FederatedRunConfig`
  and enforces the rules between settings (:func:`check_rules`, the one list of them), e.g.
  DP-SGD and central DP need GroupNorm, central DP needs FedAvg, and a label-skew ``local-loss``
  needs a single-label task and no DP (common/label_skew.py).

Keys are grouped by prefix: ``teacher-*`` (ModelConfig of the teacher), ``dp-*`` (PrivacyConfig
requested by the server), ``kd-*`` (DistillConfig), ``central-dp-*`` (CentralDPSettings),
un-prefixed training keys (TrainConfig), aggregation keys (StrategySettings) and the run-level
keys of :class:`RunSettings`. The server and every site read the same mapping, so they agree on
architecture, normalisation, image size and task. A site's own policy (its privacy and resource
limits, client/site_policy.py) is not a run setting: it comes from the site's node config, never
from this mapping.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

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
from common.errors import ConfigError
from common.label_skew import check_local_loss
from common.tasks import Task, get_task

TeacherChoice = Literal["best", "last"]
SELECTION_METRICS = ("auroc_macro", "balanced_accuracy", "accuracy", "f1_macro", "loss")
"""Federated-validation metrics that can pick the best global teacher (lower is better for loss)."""
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
AUGMENT_CHOICES = ("default", "strong")
"""The ``augment`` presets (common.data.dataset.AUGMENT_PRESETS)."""
BN_STATISTICS_MODES = ("federated", "every-round", "averaged")
"""How the global models' BatchNorm statistics are set: recomputed with the sites for the
aggregated weights (common/batchnorm_stats.py) for the delivered teacher and the final federated
student (``federated``), also after every teacher round (``every-round``), or FedAvg's average of
the buffers (``averaged``)."""
MAX_BOOTSTRAP = 10_000
"""Most bootstrap resamples a run may ask of a site (``evaluate-bootstrap``)."""
SELECT_ON = ("sites", "coordinator")
"""Which validation picks the delivered teacher and federated student: the sites' federated
validation, or the coordinator's own labelled hold-out (``central-eval-manifest``), where the
initial teacher and the students' start are candidates too (server/rounds.py, server/app.py)."""
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
    # the distillation phases (site students, federated-student rounds): many KD epochs per message
    distill_round_timeout: float = 3600.0
    site_wait_timeout: float = 600.0
    selection_metric: str = "auroc_macro"
    distill_teacher: TeacherChoice = "best"
    run_dir: str = ""
    cache_dir: str = ""
    simulation_manifest_dir: str = ""
    central_eval_manifest: str = ""
    select_on: str = "sites"
    """``sites`` or ``coordinator`` (see :data:`SELECT_ON`)."""
    validation_mode: str = "in-train"
    """``in-train``: one message per site per round (server/rounds.py); ``separate``: two."""
    initial_teacher_sha256: str = ""
    """Weights hash of the initial global teacher (common/initial_teacher.py); "" = not checked."""
    preprocess_equalize: bool = False
    """Histogram equalisation of every image, at training, evaluation and in the export."""
    augment: str = "default"
    """Training augmentation preset: ``default`` or ``strong`` (common/data/dataset.py)."""
    bn_statistics: str = "federated"
    """``federated``, ``every-round`` or ``averaged`` (see :data:`BN_STATISTICS_MODES`)."""
    coordinator_dir: str = ""
    """The folder of the coordinator that serves this run (``cxr-fl-server serve``: registered sites,
    audit log) when the run's own folder is below it (``RUN_DIR/runs/<name>``); "" = ``run-dir``."""
    evaluate_model: str = ""
    """An evaluation-only run: the model file at the coordinator every site scores (server/cross_site.py)."""
    evaluate_sites: str = ""
    """The sites (comma-separated names) an evaluation-only run asks; "" = every connected site."""
    evaluate_bootstrap: int = 1000
    cross_site_matrix: bool = False
    """At the end of a training run, score every opted-in site's delivered student at every other site."""
    """Bootstrap resamples of the sites' 95% intervals in an evaluation-only run."""

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ConfigError("num-rounds", self.num_rounds, "an integer >= 1")
        check_image_size("image-size", self.image_size)
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
        if self.distill_round_timeout <= 0:
            raise ConfigError("distill-round-timeout", self.distill_round_timeout, "a number of seconds > 0")
        if self.site_wait_timeout <= 0:
            raise ConfigError("site-wait-timeout", self.site_wait_timeout, "a number of seconds > 0")
        if self.selection_metric not in SELECTION_METRICS:
            raise ConfigError(
                "selection-metric", self.selection_metric, "one of " + ", ".join(SELECTION_METRICS)
            )
        if self.select_on not in SELECT_ON:
            raise ConfigError("select-on", self.select_on, "one of " + ", ".join(SELECT_ON))
        if self.select_on == "coordinator" and not self.central_eval_manifest:
            raise ConfigError(
                "select-on",
                self.select_on,
                '"sites", or "coordinator" with central-eval-manifest naming the coordinator\'s '
                "labelled hold-out",
            )
        if self.validation_mode not in VALIDATION_MODES:
            raise ConfigError(
                "validation-mode", self.validation_mode, "one of " + ", ".join(VALIDATION_MODES)
            )
        if self.bn_statistics not in BN_STATISTICS_MODES:
            raise ConfigError("bn-statistics", self.bn_statistics, "one of " + ", ".join(BN_STATISTICS_MODES))
        if not 1 <= self.evaluate_bootstrap <= MAX_BOOTSTRAP:
            raise ConfigError(
                "evaluate-bootstrap", self.evaluate_bootstrap, f"an integer in [1, {MAX_BOOTSTRAP}]"
            )
        if self.augment not in AUGMENT_CHOICES:
            raise ConfigError("augment", self.augment, "one of " + ", ".join(AUGMENT_CHOICES))
        if self.distill_teacher not in ("best", "last"):
            raise ConfigError("distill-teacher", self.distill_teacher, "'best' or 'last'")
        if self.initial_teacher_sha256 and not _HEX64.match(self.initial_teacher_sha256):
            raise ConfigError(
                "initial-teacher-sha256",
                self.initial_teacher_sha256,
                "64 lower-case hexadecimal digits (the weights hash printed by `cxr-fl-server "
                'pretrain`), or ""',
            )
        for option, path in (
            ("run-dir", self.run_dir),
            ("cache-dir", self.cache_dir),
            ("simulation-manifest-dir", self.simulation_manifest_dir),
            ("central-eval-manifest", self.central_eval_manifest),
            ("evaluate-model", self.evaluate_model),
            ("coordinator-dir", self.coordinator_dir),
        ):
            if path and not Path(path).is_absolute():
                raise ConfigError(
                    option,
                    path,
                    "an absolute path (Flower runs apps from other working directories)",
                )


IMAGE_SIZES = (16, 1024)
"""Smallest and largest image side, in pixels, of a run (and of ``cxr-fl-client check``)."""


def check_image_size(option: str, size: int) -> None:
    if not IMAGE_SIZES[0] <= size <= IMAGE_SIZES[1]:
        raise ConfigError(option, size, f"an integer between {IMAGE_SIZES[0]} and {IMAGE_SIZES[1]} pixels")


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
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)
    # the coordinator's aggregation and site sampling, and central DP (read by every party alike)
    strategy: StrategySettings = dataclasses.field(default_factory=StrategySettings)
    central_dp: CentralDPSettings = dataclasses.field(default_factory=CentralDPSettings)

    @property
    def uses_dp(self) -> bool:
        return self.privacy.enabled


def run_settings_from_config(config: Mapping[str, Any]) -> FederatedRunConfig:
    """Typed settings from a run_config mapping (missing keys keep their defaults).

    Raises ConfigError naming the setting when a value or a combination of values is not allowed.
    """
    task = get_task(coerce("task", config.get("task", TaskConfig().name), str))
    settings = FederatedRunConfig(
        task=task,
        run=from_mapping(RunSettings, config),
        teacher=from_mapping(ModelConfig, config, "teacher-"),
        train=from_mapping(TrainConfig, config),
        privacy=from_mapping(PrivacyConfig, config, "dp-"),
        distill=from_mapping(DistillConfig, config, "kd-"),
        kd_enabled=parse_bool("kd-enabled", config.get("kd-enabled", True)),
        kd_no_kd_baseline=parse_bool("kd-no-kd-baseline", config.get("kd-no-kd-baseline", False)),
        edge_compression=parse_bool("edge-compression", config.get("edge-compression", False)),
        kd_federated_student_rounds=_count(
            config, "kd-federated-student-rounds", DEFAULT_FEDERATED_STUDENT_ROUNDS
        ),
        compute=from_mapping(ComputeConfig, config),
        strategy=from_mapping(StrategySettings, config),
        central_dp=from_mapping(CentralDPSettings, config, "central-dp-"),
    )
    check_rules(settings)
    return settings


def check_rules(settings: FederatedRunConfig) -> None:
    """Rules between settings, checked once where the settings are built (before any round).

    The one list of such rules: every entry point (both command lines, the ServerApp, the
    ClientApp, the simulation, the benchmarks, the study) builds its settings with
    :func:`run_settings_from_config`, so each of them refuses a run with the same message.
    """
    check_dp_norm(settings.teacher.norm, settings.privacy.enabled, "dp-enabled = true")
    check_local_loss(settings.train.local_loss, settings.task, dp_enabled=settings.privacy.enabled)
    check_central_dp(settings.central_dp, settings.strategy.strategy, settings.teacher.norm)


def check_central_dp(settings: CentralDPSettings, strategy: str, norm: str) -> None:
    """Central DP (server/central_dp.py) needs FedAvg and a GroupNorm teacher (no integer buffers)."""
    if not settings.enabled:
        return
    if strategy != "fedavg":
        raise ConfigError(
            "strategy", strategy, '"fedavg" with central DP (the noise is calibrated to an average)'
        )
    if norm != "group":
        raise ConfigError(
            "teacher-norm",
            norm,
            '"group" with central DP: noise would be added to BatchNorm\'s running statistics and counters',
        )


def check_dp_norm(norm: str, dp_on: bool, why: str) -> None:
    """DP-SGD needs a GroupNorm teacher: ConfigError saying what to change otherwise."""
    if dp_on and norm != "group":
        raise ConfigError(
            "teacher-norm",
            norm,
            f'"group" when DP-SGD is on ({why}): Opacus computes one gradient per image and '
            'BatchNorm mixes the images of a batch. Set teacher-norm = "group" for the whole run, '
            "or turn DP off",
        )


DEFAULT_FEDERATED_STUDENT_ROUNDS = 5
"""The student each site deploys is, by default, one federated student trained by KD at every
site over this many rounds (0: each site deploys the student it distilled alone)."""


def _count(config: Mapping[str, Any], key: str, default: int = 0) -> int:
    value = coerce(key, config.get(key, default), int)
    if value < 0:
        raise ConfigError(key, value, "an integer >= 0")
    return value


# ---------------------------------------------------------------------------------------------
# values: the one boolean parser and the one coercer

C = TypeVar("C")


def parse_bool(option: str, value: object, *, text: bool = False) -> bool:
    """A boolean setting. A string is never a boolean (``"no"`` is an error, not True).

    ``text``: the value was typed as text where there are no types (a ``FORMAT.KEY=VALUE``
    command-line item, a SuperNode ``--node-config`` string); then exactly ``true`` or
    ``false`` (any case) is also accepted.
    """
    if isinstance(value, bool):
        return value
    if text and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(option, value, "true or false" + ("" if text else " (a TOML boolean, not a string)"))


def coerce(option: str, value: Any, kind: Any) -> Any:
    """``value`` checked against the setting's type ``kind``; ConfigError naming ``option``.

    ``kind`` is a type (bool, int, float, str, Path), a ``Literal[...]`` of choices, or
    ``X | None`` (None or "" give None). Values are not converted between kinds: an int
    setting takes an int (not ``"2"``, not ``2.5``), a float setting an int or a float, a string
    setting a string.
    """
    origin = get_origin(kind)
    if origin is typing.Union or origin is types.UnionType:
        if value is None or value == "":
            return None
        return coerce(option, value, next(a for a in get_args(kind) if a is not type(None)))
    if origin is Literal:
        choices = tuple(str(c) for c in get_args(kind))
        if value not in choices:
            raise ConfigError(option, value, "one of " + ", ".join(choices))
        return value
    if kind is bool:
        return parse_bool(option, value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    if kind is Path and isinstance(value, str | Path):
        return Path(value).expanduser()
    if kind not in (int, float, str, Path):
        return value
    names = {int: "an integer", float: "a number", str: "a string", Path: "a path (string)"}
    raise ConfigError(option, value, names[kind])


def from_mapping(cls: type[C], mapping: Mapping[str, Any], prefix: str = "", *, strict: bool = False) -> C:
    """Build config dataclass ``cls`` from a kebab-case mapping such as Flower's run_config.

    Keys are matched as ``prefix + field.replace("_", "-")``. Missing keys keep the defaults.
    With ``strict``, keys carrying the prefix that match no field raise ConfigError, so a typo
    like ``kd-temprature`` is not silently ignored.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    known: set[str] = set()
    for field in dataclasses.fields(cls):
        key = prefix + field.name.replace("_", "-")
        known.add(key)
        if key in mapping:
            kwargs[field.name] = coerce(key, mapping[key], hints[field.name])
    if strict:
        unknown = sorted(k for k in mapping if k.startswith(prefix) and k not in known)
        if unknown:
            raise ConfigError(unknown[0], mapping[unknown[0]], "one of " + ", ".join(sorted(known)))
    return cls(**kwargs)  # type: ignore[call-arg]


def to_mapping(config: Any, prefix: str = "") -> dict[str, Any]:
    """The inverse of :func:`from_mapping`: kebab-case keys, paths as strings, None as ''."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, Path):
            value = str(value)
        elif value is None:
            value = ""
        out[prefix + field.name.replace("_", "-")] = value
    return out


# ---------------------------------------------------------------------------------------------
# the schema, TOML files and overrides

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def read_toml(path: Path, option: str = "config", what: str = "an existing TOML file") -> dict[str, Any]:
    """A TOML file's tables; ConfigError naming ``option`` and the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(option, str(path), what)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            option, str(path), f"a UTF-8 text file (byte {exc.start} is not UTF-8; save it as UTF-8)"
        ) from None
    except OSError as exc:
        raise ConfigError(option, str(path), f"a readable TOML file ({exc.strerror})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(option, str(path), f"valid TOML ({exc})") from None


def load_schema(project_root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """The run-settings schema (key -> default) from the app's pyproject.toml."""
    path = project_root / "pyproject.toml"
    data = read_toml(path, "pyproject.toml", "the app's pyproject.toml")
    try:
        return dict(data["tool"]["flwr"]["app"]["config"])
    except (KeyError, TypeError):
        raise ConfigError(
            "pyproject.toml", str(path), "a file with a [tool.flwr.app.config] table of run settings"
        ) from None


def unknown_setting(key: str, schema: Mapping[str, Any], origin: str) -> ConfigError:
    return ConfigError(
        origin, key, "a run setting of pyproject's [tool.flwr.app.config]: " + ", ".join(sorted(schema))
    )


def coerce_setting(key: str, value: Any, schema: Mapping[str, Any], origin: str) -> Any:
    """``value`` of run setting ``key`` as its schema type; ConfigError naming ``origin`` otherwise."""
    if key not in schema:
        raise unknown_setting(key, schema, origin)
    default = schema[key]
    try:
        return coerce(key, value, type(default))
    except ConfigError as exc:
        raise ConfigError(f"{origin} '{key}'", value, f"{exc.allowed} (default {default!r})") from None


def parse_set_option(item: str) -> tuple[str, Any]:
    """``key=value`` with a TOML value (``num-rounds=5``, ``strategy=fedprox``) -> (key, value)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", item, "KEY=VALUE, e.g. --set num-rounds=5")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """``key=value`` pairs with TOML values (``num-rounds=5``, ``strategy="fedprox"`` or fedprox)."""
    return dict(parse_set_option(item) for item in items)


def resolve_run_config(
    schema: Mapping[str, Any],
    config_file: Path | None = None,
    sets: list[str] | None = None,
) -> dict[str, Any]:
    """Overrides from a TOML file and ``--set`` pairs, checked against the schema (file first)."""
    overrides: dict[str, Any] = {}
    if config_file is not None:
        data = read_toml(config_file, "--config", "an existing TOML file of run settings")
        for key, value in data.items():
            overrides[key] = coerce_setting(key, value, schema, f"key in {config_file}")
    for item in sets or []:
        key, value = parse_set_option(item)
        overrides[key] = coerce_setting(key, value, schema, "--set")
    return overrides


def check_run_config(overrides: Mapping[str, Any], *, origin: str = "run setting") -> dict[str, Any]:
    """Schema defaults with ``overrides``, every value and rule checked; the merged run_config.

    The one loader of a run's settings before work starts (both command lines, the simulation,
    the benchmarks, the study): the typed settings and their rules (:func:`run_settings_from_config`,
    which the ServerApp and the ClientApp call on the run_config Flower hands them), plus what only
    the coordinator's machine can tell beforehand: that the teacher has ``freeze-blocks`` blocks,
    and that the ``track``-ed tracker is installed there.
    """
    from common.tracking import TrackingSettings

    schema = load_schema()
    checked = {key: coerce_setting(key, value, schema, origin) for key, value in overrides.items()}
    merged = {**schema, **checked}
    settings = run_settings_from_config(merged)
    if settings.train.freeze_blocks:  # the number of blocks depends on the teacher: build it once here
        from common.freeze import check_freeze_blocks

        check_freeze_blocks(settings.teacher, settings.task.num_classes, settings.train.freeze_blocks)
    from_mapping(TrackingSettings, merged)
    return merged
