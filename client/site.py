"""A site's own facts, from Flower's node_config: who it is, where its data is, its DP policy.

In a deployment ``cxr-fl-client start`` passes these as SuperNode ``--node-config``::

    site-name="st-marys" data-path="/data/cxr" data-format="image-folder" out-dir="/srv/cxr-fl"
    max-image-size=256 max-local-epochs=10 max-kd-epochs=20 max-rounds=100
    dp-target-epsilon=3.0 dp-target-delta=1e-5 dp-max-grad-norm=1.0 dp-accountant="rdp"
    state-dir="/var/lib/cxr-fl/state" share-per-class-metrics=false share-exact-metrics=false
    operating-point="balanced-accuracy"

The privacy ledger is site-wide, not per run folder: ``<state-dir>/privacy/ledger.json`` (the
state dir defaults to ``$CXR_FL_STATE_DIR`` or ``~/.local/state/cxr-fl``) unless
``privacy-ledger`` names the file (client/privacy_ledger.py).

In Flower's simulation runtime node_config only carries ``partition-id`` and
``num-partitions``; the site then reads ``site_<id>.csv`` (manifest format) from the run's
``simulation-manifest-dir`` and writes under ``<run-dir>/sites/site_<id>``.

A deployed site opens only paths named by its own options: the run settings that name files
(:data:`SERVER_PATH_SETTINGS`) are the server's and are ignored at a deployed site, whether or
not such a path exists there (see :func:`site_run_config`).

A site's privacy (its DP budget, ledger and opt-ins to share more) is one object,
:class:`~client.site_privacy.SitePrivacy`, read from node_config in client/site_privacy.py: what
the site leaves unset takes a safe site-side default, never the server's value, and a server
request can only tighten it. Every phase consults it through client/privacy_gate.py.
The device is the site's own choice: node_config ``device`` (``auto`` when unset, see
common/device.py) and optionally ``amp``. A ``device`` run setting from the server is ignored
at a deployed site (a server cannot make a hospital's workstation use, or avoid, its GPU); the
server's ``amp`` applies unless the site sets its own. Simulated sites use the run settings.

The site's operating point is its own choice too: node_config ``operating-point`` (``argmax``,
``balanced-accuracy``, the default, or ``sensitivity:CLASS=X[,...]``; common/operating_point.py),
the criterion by which it fits its decision rule on its validation split; never a run setting.
A simulated site reads it from the simulation's node_config (default ``balanced-accuracy``).

A deployed site's policy (``max-image-size``, ``max-local-epochs``, ``max-kd-epochs``,
``max-rounds``, ``max-teacher-parameters``; client/site_policy.py) bounds the work a run may ask
of it; simulated sites have none.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from client.site_policy import SitePolicy
from client.site_privacy import SitePrivacy
from common.config import PrivacyConfig
from common.device import Compute, ComputeConfig, resolve_compute
from common.errors import ConfigError
from common.operating_point import Criterion, parse_criterion
from common.run_layout import RunLayout
from common.run_settings import FederatedRunConfig, check_dp_norm, coerce, from_mapping, parse_bool
from common.tasks import Task

logger = logging.getLogger(__name__)

SERVER_PATH_SETTINGS = (
    "run-dir",
    "cache-dir",
    "simulation-manifest-dir",
    "central-eval-manifest",
    "teacher-weights",
    "evaluate-model",
    "coordinator-dir",
)
"""Run settings that name files: meaningful at the coordinator, never opened at a deployed site."""


@dataclass(frozen=True)
class SiteConfig:
    """What one hospital site is and where its data and outputs live."""

    name: str
    data_path: Path | None
    data_format: str
    out_dir: Path
    cache_dir: Path
    # the site's own privacy policy: DP budget, ledger, opt-ins to share more (client/site_privacy.py)
    privacy: SitePrivacy = field(default_factory=SitePrivacy)
    num_threads: int = 2
    strict: bool = False
    # site-wide state (the privacy ledger and its counter), outside any run's out_dir
    state_location: Path | None = None
    # a partition of Flower's simulation: the coordinator's own data, its run settings are the policy
    simulated: bool = False
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    # the most a run may ask of this site (client/site_policy.py); None: a simulated site
    policy: SitePolicy | None = None
    # how this site fits its decision rules on its validation split (common/operating_point.py)
    operating_point: Criterion = field(default_factory=Criterion)

    @property
    def ledger_path(self) -> Path:
        """The site-wide ledger; a simulated site keeps its own in its run folder (no real budget)."""
        from client.privacy_ledger import default_ledger_path, legacy_ledger_path

        if self.privacy.ledger is not None:
            return self.privacy.ledger
        return legacy_ledger_path(self.out_dir) if self.simulated else default_ledger_path(self.state_dir)

    @property
    def state_dir(self) -> Path:
        """node_config ``state-dir``, else the account's default (a simulated site: its run folder)."""
        from client.privacy_ledger import default_state_dir

        if self.state_location is not None:
            return self.state_location
        return self.out_dir / "state" if self.simulated else default_state_dir()

    def effective_privacy(self, requested: PrivacyConfig, num_train: int) -> PrivacyConfig:
        """The privacy a round runs under: the site's policy, which a request can only tighten
        (:meth:`SitePrivacy.effective`)."""
        return self.privacy.effective(requested, num_train, simulated=self.simulated)

    def resolve_compute(self, *, dp: bool = False) -> Compute:
        """This site's device on this machine (DeviceUnavailableError when it lacks it)."""
        return resolve_compute(self.compute, dp=dp, option=f"site {self.name}: device")


def site_name_for_partition(partition_id: int) -> str:
    return f"site_{partition_id:02d}"


def _required(node_config: Mapping[str, Any], key: str) -> str:
    value = node_config.get(key)
    if value is None or str(value) == "":
        raise ConfigError(
            f"node_config '{key}'",
            value,
            "a value: start the site with cxr-fl-client start (or flower-supernode "
            f"--node-config '{key}=...')",
        )
    return str(value)


def is_simulated(node_config: Mapping[str, Any]) -> bool:
    """A site of Flower's simulation runtime (node_config has only partition-id)."""
    return "partition-id" in node_config and "data-path" not in node_config


def site_run_config(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run settings a site acts on: at a deployed site, none that names a file.

    Server-named paths are dropped with the same behaviour whether or not the path exists at
    the site, so a server cannot probe the site's disk through them.
    """
    config = dict(run_config)
    if is_simulated(node_config):
        return config
    named = [key for key in SERVER_PATH_SETTINGS if config.get(key)]
    if named:
        logger.info(
            "ignoring the server's path setting(s) %s: this site opens only the paths of its own options",
            ", ".join(named),
        )
    for key in SERVER_PATH_SETTINGS:
        config[key] = ""
    if "select-on" in config:  # how the coordinator picks its models; its hold-out is not the site's
        config["select-on"] = "sites"
    return config


def node_flag(node_config: Mapping[str, Any], key: str, default: bool) -> bool:
    """A boolean site option of ``node_config`` (``true``/``false`` as text too)."""
    return parse_bool(f"node_config '{key}'", node_config.get(key, default), text=True)


def _site_privacy(node_config: Mapping[str, Any], norm: str) -> SitePrivacy:
    """The site's own privacy policy; its DP budget needs a GroupNorm teacher."""
    privacy = SitePrivacy.from_node_config(node_config)
    if privacy.epsilon is not None:
        check_dp_norm(norm, True, "this site's own DP policy, cxr-fl-client start --epsilon")
    return privacy


def site_from_node_config(node_config: Mapping[str, Any], settings: FederatedRunConfig) -> SiteConfig:
    """Typed site facts from node_config (deployment) or partition-id (simulation)."""
    if is_simulated(node_config):
        manifest_dir = settings.run.simulation_manifest_dir
        if not manifest_dir:
            raise ConfigError(
                "simulation-manifest-dir",
                manifest_dir,
                "the folder of per-site manifests written by `python -m simulation partition`",
            )
        name = site_name_for_partition(int(node_config["partition-id"]))
        run_dir = Path(settings.run.run_dir or manifest_dir)
        cache = (
            Path(settings.run.cache_dir) if settings.run.cache_dir else RunLayout(run_dir).default_cache_dir
        )
        return SiteConfig(
            name=name,
            data_path=Path(manifest_dir) / f"{name}.csv",
            data_format="manifest",
            out_dir=RunLayout(run_dir).site_dir(name),
            cache_dir=cache,
            # simulated sites are the coordinator's own partitions: the report uses per-class metrics
            privacy=SitePrivacy.from_node_config(node_config, simulated=True),
            num_threads=settings.train.num_threads,  # the run setting `num-threads` (pyproject: 1)
            simulated=True,
            compute=settings.compute,
            operating_point=site_criterion(node_config, settings.task),
        )
    out_dir = Path(_required(node_config, "out-dir"))
    data_format = _required(node_config, "data-format")
    data_path = None if data_format == "synthetic" else Path(_required(node_config, "data-path"))
    cache = node_config.get("cache-dir") or out_dir / "cache"
    for option, path in (("out-dir", out_dir), ("data-path", data_path)):
        if path is not None and not path.is_absolute():
            raise ConfigError(f"node_config '{option}'", str(path), "an absolute path")
    return SiteConfig(
        name=_required(node_config, "site-name"),
        data_path=data_path,
        data_format=data_format,
        out_dir=out_dir,
        cache_dir=Path(cache),
        privacy=_site_privacy(node_config, settings.teacher.norm),
        num_threads=coerce("node_config 'num-threads'", node_config.get("num-threads", 2), int),
        strict=parse_bool("node_config 'strict'", node_config.get("strict", False), text=True),
        state_location=_absolute_option(node_config, "state-dir"),
        compute=_site_compute(node_config, settings),
        policy=SitePolicy.from_mapping(node_config, lambda key: f"node_config '{key}'"),
        operating_point=site_criterion(node_config, settings.task),
    )


OPERATING_POINT_KEY = "operating-point"
PER_RUN_OUTPUTS_KEY = "per-run-outputs"
"""node_config flag of a long-running site (``cxr-fl-client serve``): each run's outputs apart."""
RUN_OUTPUTS_DIR = "runs"


def for_run(site: SiteConfig, node_config: Mapping[str, Any], run_id: int) -> SiteConfig:
    """The site as one run sees it: a long-running site (node_config ``per-run-outputs``) keeps
    each run's outputs in ``OUT/runs/<run id>/``; its state (privacy ledger, audit trail) and
    its image cache stay one for all runs."""
    if site.simulated or not node_flag(node_config, PER_RUN_OUTPUTS_KEY, False):
        return site
    return replace(site, out_dir=site.out_dir / RUN_OUTPUTS_DIR / str(int(run_id)))


def site_criterion(node_config: Mapping[str, Any], task: Task) -> Criterion:
    """The site's own criterion for its operating points (node_config ``operating-point``)."""
    text = node_config.get(OPERATING_POINT_KEY, "balanced-accuracy")
    return parse_criterion(str(text), task, f"node_config '{OPERATING_POINT_KEY}'")


def _absolute_option(node_config: Mapping[str, Any], key: str) -> Path | None:
    value = node_config.get(key)
    if value is None or str(value) == "":
        return None
    path = Path(str(value))
    if not path.is_absolute():
        raise ConfigError(f"node_config '{key}'", str(path), "an absolute path")
    return path


def _site_compute(node_config: Mapping[str, Any], settings: FederatedRunConfig) -> ComputeConfig:
    """The deployed site's device (its node config, never the server's) and precision."""
    own = {key: node_config[key] for key in ("device", "amp") if key in node_config}
    config = from_mapping(ComputeConfig, {"amp": settings.compute.amp, **own})
    if settings.compute.device != config.device:
        logger.info(
            "the server's device setting %r is ignored: this site uses its own, %r",
            settings.compute.device,
            config.device,
        )
    return config
