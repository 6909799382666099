"""A site's own privacy policy, one validated object: :class:`SitePrivacy`.

What a hospital decides about its privacy, never a run setting: its DP budget (``--epsilon``,
``--delta``, ``--max-grad-norm``, ``--accountant``; ``dp-target-epsilon`` in its policy file),
where its privacy ledger lives (``--privacy-ledger``), and what its replies may carry beyond the
defaults (``--share-per-class-metrics``, ``--share-exact-metrics``, ``--share-delivered-student``).
Its limits on the work a run may ask (``--max-*``, ``--phases``) are the other half of the site's
policy (common/site_limits.py, checked by client/site_policy.py).

One path, both ways: ``cxr-fl-client start`` builds it from its options and policy file
(:meth:`SitePrivacy.from_options`), passes it to the SuperNode as node config
(:meth:`SitePrivacy.node_config`), and the ClientApp reads the same object back
(:meth:`SitePrivacy.from_node_config`); every DP option is checked by one function
(common/config.py ``check_site_dp_option``) wherever it comes from. What the site leaves unset
takes a safe site default, never the server's value: delta at most 1e-5 and at most 1/N of its
N training images, the ``rdp`` accountant, clipping 1.0; a server's request can only tighten it
(:meth:`SitePrivacy.effective`). The phases consult it through client/privacy_gate.py.

A simulated site (Flower's simulation runtime) is the coordinator's own partition: it has no DP
budget of its own, its run settings are its privacy, and it shares every figure exactly unless
its node config says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.disclosure import Disclosure
from common.config import SITE_DP_OPTIONS, PrivacyConfig, check_site_dp_option
from common.errors import ConfigError
from common.run_settings import parse_bool

if TYPE_CHECKING:
    from common.site_limits import PolicyFile

SITE_MAX_DEFAULT_DELTA = 1e-5
"""A site's delta when it sets none: never above this, and never above 1/N (N training images)."""
EPSILON_KEY = "dp-target-epsilon"
LEDGER_KEY = "privacy-ledger"
PER_CLASS_KEY = "share-per-class-metrics"
EXACT_KEY = "share-exact-metrics"
SHARE_STUDENT_KEY = "share-delivered-student"
"""node_config opt-in: the site sends its delivered student for the cross-site matrix (not under DP)."""
SHARE_KEYS = (PER_CLASS_KEY, EXACT_KEY, SHARE_STUDENT_KEY)

CLI_OPTIONS = {
    "dp-target-epsilon": "--epsilon",
    "dp-target-delta": "--delta",
    "dp-max-grad-norm": "--max-grad-norm",
    "dp-accountant": "--accountant",
}
"""``cxr-fl-client start`` options of the DP node config keys (the others are ``--<key>``)."""


def cli_option(key: str) -> str:
    """The ``cxr-fl-client start`` option of a node config key."""
    return CLI_OPTIONS.get(key, f"--{key}")


def node_config_key(key: str) -> str:
    """A node config key as errors name it."""
    return f"node_config '{key}'"


@dataclass(frozen=True)
class SitePrivacy:
    """A site's own privacy policy (see the module docstring); None: the site left it unset.

    Build it with :meth:`from_options` or :meth:`from_node_config`, which check every value.
    """

    epsilon: float | None = None
    delta: float | None = None
    max_grad_norm: float | None = None
    accountant: str | None = None
    ledger: Path | None = None
    share_per_class_metrics: bool = False
    share_exact_metrics: bool = False
    share_delivered_student: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], name: Callable[[str], str]) -> SitePrivacy:
        """The policy in ``values`` (node config keys; None: unset), checked; ``name(key)`` names
        a key in errors (``--epsilon`` at the command line)."""
        dp = {
            key: check_site_dp_option(key, values[key], name(key))
            for key in SITE_DP_OPTIONS
            if _set(values, key)
        }
        if dp and EPSILON_KEY not in dp:
            others = ", ".join(name(key) for key in SITE_DP_OPTIONS[1:])
            raise ConfigError(
                name(EPSILON_KEY), None, f"a privacy budget: a site that sets {others} must set it"
            )
        flags = {
            key: parse_bool(name(key), values[key], text=True) for key in SHARE_KEYS if _set(values, key)
        }
        return cls(
            epsilon=_number(dp.get(EPSILON_KEY)),
            delta=_number(dp.get("dp-target-delta")),
            max_grad_norm=_number(dp.get("dp-max-grad-norm")),
            accountant=None if dp.get("dp-accountant") is None else str(dp["dp-accountant"]),
            ledger=_absolute(values, LEDGER_KEY, name),
            share_per_class_metrics=flags.get(PER_CLASS_KEY, False),
            share_exact_metrics=flags.get(EXACT_KEY, False),
            share_delivered_student=flags.get(SHARE_STUDENT_KEY, False),
        )

    @classmethod
    def from_options(cls, options: Mapping[str, Any], policy_file: PolicyFile | None = None) -> SitePrivacy:
        """The policy of ``cxr-fl-client start``'s options (node config keys; the ledger path as
        given, made absolute here), checked, then tightened by the site's policy file (its
        ``dp-target-epsilon``)."""
        values = dict(options)
        if values.get(LEDGER_KEY) is not None:
            values[LEDGER_KEY] = str(Path(values[LEDGER_KEY]).resolve())
        file_epsilon = None if policy_file is None else policy_file.dp_target_epsilon
        if file_epsilon is not None and values.get(EPSILON_KEY) is None:
            values[EPSILON_KEY] = file_epsilon  # the file's budget alone: the site is under DP
        own = cls.from_mapping(values, cli_option)
        if file_epsilon is None or own.epsilon is None:
            return own
        return replace(own, epsilon=min(own.epsilon, file_epsilon))

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], *, simulated: bool = False) -> SitePrivacy:
        """The policy a site's node config carries. A simulated site has no DP budget or ledger
        of its own and shares everything unless its node config says otherwise."""
        if not simulated:
            return cls.from_mapping(node_config, node_config_key)

        def shares(key: str) -> bool:
            return parse_bool(node_config_key(key), node_config.get(key, True), text=True)

        return cls(
            share_per_class_metrics=shares(PER_CLASS_KEY),
            share_exact_metrics=shares(EXACT_KEY),
            share_delivered_student=shares(SHARE_STUDENT_KEY),
        )

    def node_config(self) -> dict[str, float | str | bool]:
        """The policy as node config values (``--node-config`` of the site's SuperNode): the DP
        options and the ledger only when set, the opt-ins always."""
        values: dict[str, float | str | bool] = {}
        for key, value in zip(SITE_DP_OPTIONS, self._dp_values(), strict=True):
            if value is not None:
                values[key] = value
        if self.ledger is not None:
            values[LEDGER_KEY] = str(self.ledger)
        values[PER_CLASS_KEY] = self.share_per_class_metrics
        values[EXACT_KEY] = self.share_exact_metrics
        values[SHARE_STUDENT_KEY] = self.share_delivered_student
        return values

    def _dp_values(self) -> tuple[float | str | None, ...]:
        return (self.epsilon, self.delta, self.max_grad_norm, self.accountant)

    def own_dp(self) -> PrivacyConfig | None:
        """The site's own DP budget (None: it set none); unset values take the site defaults."""
        if self.epsilon is None:
            return None
        own: dict[str, Any] = {"enabled": True, "target_epsilon": self.epsilon}
        for name, value in (
            ("target_delta", self.delta),
            ("max_grad_norm", self.max_grad_norm),
            ("accountant", self.accountant),
        ):
            if value is not None:
                own[name] = value
        return PrivacyConfig(**own)

    def effective(self, requested: PrivacyConfig, num_train: int, *, simulated: bool) -> PrivacyConfig:
        """The privacy a round runs under: the site's policy, which a request can only tighten.

        Delta is at most the site's (explicit, or 1e-5 capped at 1/``num_train``); the
        accountant is always the site's (a simulated site's: the run's).
        """
        default_delta = min(SITE_MAX_DEFAULT_DELTA, 1.0 / max(num_train, 1))
        own = self.own_dp()
        if own is None:
            if not requested.enabled:
                return requested
            accountant = requested.accountant if simulated else PrivacyConfig().accountant
            return replace(
                requested, target_delta=min(requested.target_delta, default_delta), accountant=accountant
            )
        if self.delta is None:
            own = replace(own, target_delta=min(own.target_delta, default_delta))
        return requested.tightened_by(own)

    @property
    def disclosure(self) -> Disclosure:
        """What this site's replies may carry (client/disclosure.py)."""
        return Disclosure(per_class=self.share_per_class_metrics, exact=self.share_exact_metrics)


def site_disclosure(node_config: Mapping[str, Any], *, simulated: bool) -> Disclosure:
    """The site's disclosure, from its own node_config only (never from the run settings), also
    when the rest of its node_config cannot be read (error replies).

    A simulated site shares everything unless its node_config says otherwise; a deployed site
    shares nothing more than the defaults unless it opted in. An option that cannot be read
    leaves the strictest disclosure (the reply then says what to fix).
    """
    opt_ins = {key: node_config[key] for key in (PER_CLASS_KEY, EXACT_KEY) if key in node_config}
    try:
        return SitePrivacy.from_node_config(opt_ins, simulated=simulated).disclosure
    except ConfigError:
        return Disclosure()


def _number(value: float | str | None) -> float | None:
    return None if value is None else float(value)


def _set(values: Mapping[str, Any], key: str) -> bool:
    return values.get(key) is not None


def _absolute(values: Mapping[str, Any], key: str, name: Callable[[str], str]) -> Path | None:
    value = values.get(key)
    if value is None or str(value) == "":
        return None
    path = Path(str(value))
    if not path.is_absolute():
        raise ConfigError(name(key), str(path), "an absolute path")
    return path
