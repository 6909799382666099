"""The SuperNode settings of a site together with its policy (client/site_policy.py).

``cxr-fl-client start`` joins with these: the site's policy travels in its SuperNode's
``--node-config`` beside its other facts, where the ClientApp reads it back (client/site.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from client.deploy import SiteNodeSettings
from client.site_policy import SitePolicy
from common.processes import toml_value


@dataclass(frozen=True)
class PolicedNodeSettings(SiteNodeSettings):
    """:class:`SiteNodeSettings` with the most a run may ask of the site."""

    policy: SitePolicy = field(default_factory=SitePolicy)

    def node_config(self) -> str:
        limits = " ".join(f"{key}={toml_value(value)}" for key, value in self.policy.node_config().items())
        return f"{super().node_config()} {limits}"
