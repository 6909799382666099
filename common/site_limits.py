"""A site's limits: the most one run may ask of it (:class:`SitePolicy`), and its policy file.

:class:`SitePolicy` is what ``cxr-fl-client start --max-*`` sets and client/site_policy.py checks
every message against. A *policy file* (TOML; ``cxr-fl-client start --policy FILE``) holds the
same limits plus the site's retention of decoded images and, optionally, its DP budget::

    max-image-size = 128
    max-local-epochs = 5
    max-kd-epochs = 10
    max-rounds = 20
    max-teacher-parameters = 30000000
    phases = ["teacher", "distill"]   # of teacher, distill, federated-student, evaluation
    cache-max-age-days = 30     # decoded images older than this are removed when the site starts
    dp-target-epsilon = 3.0     # optional: the site trains under DP with at most this budget

An onboarding kit (``cxr-fl-server kit``) carries such a file as a template of the limits the
coordinator's runs need; ``cxr-fl-client init`` writes the site's own file from it with
:meth:`PolicyFile.tightened_by`: every limit the smaller of the site's and the template's, so a
kit can only tighten a site's limits, never loosen them. Unknown keys and impossible values are
refused with the file and key named. ``phases`` lists the run phases the site takes part in
(tightened: the phases both accept). No Flower imports: the coordinator writes templates with it.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from common.config import check_site_dp_option
from common.errors import ConfigError
from common.run_settings import check_image_size

CACHE_MAX_AGE_KEY = "cache-max-age-days"
DP_EPSILON_KEY = "dp-target-epsilon"
PHASES = ("teacher", "distill", "federated-student", "evaluation")
"""The phases of a run a site may take part in: teacher rounds, the distillation of its student,
the federated-student rounds, evaluation-only runs (scoring a coordinator's model on its test
split: client/model_evaluation.py); client/site_policy.py maps messages and run settings onto them."""


@dataclass(frozen=True)
class SitePolicy:
    """The most one run may ask of this site."""

    max_image_size: int = 256
    max_local_epochs: int = 10
    max_kd_epochs: int = 20
    max_rounds: int = 100
    max_teacher_parameters: int = 60_000_000
    phases: tuple[str, ...] = PHASES

    @staticmethod
    def keys() -> tuple[str, ...]:
        """The node config keys of the policy (the ``cxr-fl-client start`` options without ``--``)."""
        return tuple(f.name.replace("_", "-") for f in fields(SitePolicy))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], name: Callable[[str], str]) -> SitePolicy:
        """The policy in ``values`` (node config keys; missing ones keep the defaults), checked;
        ``name(key)`` names a key in errors (``--max-rounds`` at the CLI)."""
        kwargs: dict[str, Any] = {}
        for item in fields(cls):
            key = item.name.replace("_", "-")
            if key in values and values[key] is not None:
                check = _phases if key == "phases" else _positive_int
                kwargs[item.name] = check(name(key), values[key])
        policy = cls(**kwargs)
        check_image_size(name("max-image-size"), policy.max_image_size)
        return policy

    def node_config(self) -> dict[str, int | str]:
        """The policy as node config values (``--node-config`` of the site's SuperNode; the
        phases as comma-separated text)."""
        values: dict[str, int | str] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            values[item.name.replace("_", "-")] = ",".join(value) if item.name == "phases" else value
        return values

    def tightened_by(self, other: SitePolicy) -> SitePolicy:
        """Every limit the smaller of the two; the phases both accept."""
        limits: dict[str, Any] = {
            f.name: min(getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
            if f.name != "phases"
        }
        both = tuple(phase for phase in self.phases if phase in other.phases)
        if not both:
            raise ConfigError(
                "phases",
                f"{','.join(self.phases)} and {','.join(other.phases)}",
                "at least one phase in common",
            )
        return SitePolicy(**limits, phases=both)


def _phases(option: str, value: object) -> tuple[str, ...]:
    """Phases as a list (TOML) or comma-separated text (node config, CLI), checked."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) for item in items):
        raise ConfigError(option, value, "a list of phases, e.g. teacher,distill")
    chosen = {item.strip() for item in items if item.strip()}
    unknown = sorted(chosen - set(PHASES))
    if unknown or not chosen:
        raise ConfigError(option, value, "one or more of " + ", ".join(PHASES))
    return tuple(phase for phase in PHASES if phase in chosen)


def _positive_int(option: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(option, value, "a whole number >= 1")
    return value


@dataclass(frozen=True)
class PolicyFile:
    """A site's policy file: its limits, the retention of its decoded images, its DP budget."""

    limits: SitePolicy = field(default_factory=SitePolicy)
    cache_max_age_days: int | None = None
    dp_target_epsilon: float | None = None

    @staticmethod
    def keys() -> tuple[str, ...]:
        return (*SitePolicy.keys(), CACHE_MAX_AGE_KEY, DP_EPSILON_KEY)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str) -> PolicyFile:
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise ConfigError(
                f"{where}: '{unknown[0]}'", values[unknown[0]], "one of " + ", ".join(cls.keys())
            )
        limits = SitePolicy.from_mapping(values, lambda key: f"{where}: '{key}'")
        age = values.get(CACHE_MAX_AGE_KEY)
        epsilon = values.get(DP_EPSILON_KEY)
        if age is not None:
            age = _positive_int(f"{where}: '{CACHE_MAX_AGE_KEY}'", age)
        if epsilon is not None:
            epsilon = check_site_dp_option(DP_EPSILON_KEY, epsilon, f"{where}: '{DP_EPSILON_KEY}'")
        return cls(limits, age, None if epsilon is None else float(epsilon))

    def tightened_by(self, other: PolicyFile) -> PolicyFile:
        """The stricter of the two, key by key (a limit unset on one side is the other's)."""

        def smaller(a: Any, b: Any) -> Any:
            return b if a is None else a if b is None else min(a, b)

        return replace(
            self,
            limits=self.limits.tightened_by(other.limits),
            cache_max_age_days=smaller(self.cache_max_age_days, other.cache_max_age_days),
            dp_target_epsilon=smaller(self.dp_target_epsilon, other.dp_target_epsilon),
        )

    def to_toml(self, comment: str = "") -> str:
        lines = [f"# {line}" if line else "#" for line in comment.splitlines()]
        for key, value in self.limits.node_config().items():
            lines.append(f"{key} = {json.dumps(str(value).split(',')) if key == 'phases' else value}")
        if self.cache_max_age_days is not None:
            lines.append(f"{CACHE_MAX_AGE_KEY} = {self.cache_max_age_days}")
        if self.dp_target_epsilon is not None:
            lines.append(f"{DP_EPSILON_KEY} = {self.dp_target_epsilon!r}")
        return "\n".join(lines) + "\n"


def read_policy_file(path: Path, option: str = "--policy") -> PolicyFile:
    """The policy file at ``path``, checked (ConfigError naming the file and key otherwise)."""
    try:
        with Path(path).open("rb") as handle:
            values = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(
            option, str(path), "an existing site policy file (cxr-fl-client init writes one)"
        ) from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(option, str(path), f"a TOML site policy file ({exc})") from None
    return PolicyFile.from_mapping(values, f"{option} {path}")
