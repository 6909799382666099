"""Who a reply comes from: the site name registered for the sending node's key, not the name it claims.

A site's reply carries the name the site was started with (``cxr-fl-client start --site``); any
site could claim another's. What a site cannot forge is the key it authenticates with: Flower
ties every message to the node id of that key, and ``cxr-fl-server register-site`` /
``start --site-key`` record node id -> registered name in ``RUN_DIR/sites.json``
(server/deploy.py). :class:`SiteDirectory` reads that file; :func:`identity_refusal` says why a
reply must be refused: its node is not a registered site, or it claims a name other than the one
registered for its key. Without registered sites (``--insecure``, simulation) names stay
self-declared, as nothing better is known.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


class SiteDirectory(dict[int, str]):
    """Node id -> site name, seeded with the registered names of ``sites_file``.

    Behaves as the plain ``names`` dict of server/rounds.py (names learnt from replies are added
    to it); the registered names win and are re-read when an unknown node replies (a site
    registered while the run goes on).
    """

    def __init__(self, sites_file: Path) -> None:
        super().__init__()
        self.sites_file = Path(sites_file)
        self.registered: dict[int, str] = {}
        self.reload()

    def reload(self) -> None:
        try:
            rows = json.loads(self.sites_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            logger.error("Cannot read the registered sites in %s: %s", self.sites_file, exc)
            return
        self.registered = {int(row["node_id"]): str(row["name"]) for row in rows}
        self.update(self.registered)

    def registered_name(self, node_id: int) -> str | None:
        if self.registered and node_id not in self.registered:
            self.reload()
        return self.registered.get(node_id)

    def refusal(self, node_id: int, claimed: str | None) -> str | None:
        """Why a reply of ``node_id`` claiming to be site ``claimed`` must be refused; None if fine."""
        if not self.registered:
            return None
        registered = self.registered_name(node_id)
        if registered is None:
            return f"node {node_id} is not a registered site (see {self.sites_file})"
        if claimed is not None and claimed != registered:
            return (
                f"node {node_id} claims to be site '{claimed}', "
                f"but its key is registered as site '{registered}'"
            )
        return None


def identity_refusal(names: dict[int, str], node_id: int, claimed: str | None) -> str | None:
    """:meth:`SiteDirectory.refusal` where ``names`` is one; None (names self-declared) otherwise."""
    return names.refusal(node_id, claimed) if isinstance(names, SiteDirectory) else None


def registered_name(names: dict[int, str], node_id: int) -> str | None:
    return names.registered_name(node_id) if isinstance(names, SiteDirectory) else None
