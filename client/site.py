"""A site's own facts, from Flower's node_config: who it is, where its data is, its DP policy.

In a deployment ``cxr-fl-client start`` passes these as SuperNode ``--node-config``::

    site-name="st-marys" data-path="/data/cxr" data-format="image-folder" out-dir="/srv/cxr-fl"
    dp-target-epsilon=3.0 dp-target-delta=1e-5 dp-max-grad-norm=1.0

In Flower's simulation runtime node_config only carries ``partition-id`` and
``num-partitions``; the site then reads ``site_<id>.csv`` (manifest format) from the run's
``simulation-manifest-dir`` and writes under ``<run-dir>/sites/site_<id>``.

A site's DP policy can only tighten what the server requests (see PrivacyConfig.tightened_by).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import PrivacyConfig
from common.errors import ConfigError
from common.run_settings import (
    FederatedRunConfig,
    check_dp_norm,
    coerce,
    from_mapping,
    parse_bool,
    to_mapping,
)

SITE_DP_KEYS = ("dp-target-epsilon", "dp-target-delta", "dp-max-grad-norm", "dp-accountant")


@dataclass(frozen=True)
class SiteConfig:
    """What one hospital site is and where its data and outputs live."""

    name: str
    data_path: Path | None
    data_format: str
    out_dir: Path
    cache_dir: Path
    privacy: PrivacyConfig | None
    num_threads: int = 2
    strict: bool = False

    def effective_privacy(self, requested: PrivacyConfig) -> PrivacyConfig:
        """The server's request tightened by this site's own policy."""
        return requested.tightened_by(self.privacy)


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


def _site_privacy(
    node_config: Mapping[str, Any], requested: PrivacyConfig, norm: str
) -> PrivacyConfig | None:
    """The site's own DP policy; what it leaves unset is the server's request (never looser)."""
    if not any(key in node_config for key in SITE_DP_KEYS):
        return None
    own = {k: v for k, v in node_config.items() if k.startswith("dp-")}
    check_dp_norm(norm, True, "this site's own DP policy, cxr-fl-client start --epsilon")
    return from_mapping(PrivacyConfig, {**to_mapping(requested, "dp-"), **own, "dp-enabled": True}, "dp-")


def site_from_node_config(node_config: Mapping[str, Any], settings: FederatedRunConfig) -> SiteConfig:
    """Typed site facts from node_config (deployment) or partition-id (simulation)."""
    if "partition-id" in node_config and "data-path" not in node_config:
        manifest_dir = settings.run.simulation_manifest_dir
        if not manifest_dir:
            raise ConfigError(
                "simulation-manifest-dir",
                manifest_dir,
                "the folder of per-site manifests written by `python -m simulation partition`",
            )
        name = site_name_for_partition(int(node_config["partition-id"]))
        run_dir = Path(settings.run.run_dir or manifest_dir)
        cache = Path(settings.run.cache_dir) if settings.run.cache_dir else run_dir / "cache"
        return SiteConfig(
            name=name,
            data_path=Path(manifest_dir) / f"{name}.csv",
            data_format="manifest",
            out_dir=run_dir / "sites" / name,
            cache_dir=cache,
            privacy=None,
            num_threads=1,
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
        privacy=_site_privacy(node_config, settings.privacy, settings.teacher.norm),
        num_threads=coerce("node_config 'num-threads'", node_config.get("num-threads", 2), int),
        strict=parse_bool("node_config 'strict'", node_config.get("strict", False), text=True),
    )
