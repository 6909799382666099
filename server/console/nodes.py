"""Which sites are online: asked of the run's own loopback SuperLink (what ``flwr supernode list`` shows).

Only the coordinator's user reaches that SuperLink (flower_adapter/superlink_owner_only.py), over
TLS with the run folder's loopback CA (``loopback-tls/ca.crt``) or in plain HTTP for ``--insecure``
runs; its port is in deploy.json. The call is Flower's Control API ``ListNodes``
(flower_adapter/control.py); anything going wrong (no SuperLink, another flwr) means "unknown",
never an error page.
Answers are kept for :data:`CACHE_SECONDS`, and the last answer is kept after the SuperLink
stopped, so a finished run still shows when each site was last seen.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from flower_adapter.control import NodeStatus, list_nodes
from server.run_folder import CoordinatorFolder

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
CACHE_SECONDS = 2.0
ASK_TIMEOUT = 2.0


def ask_superlink(state: dict[str, Any], run_dir: Path) -> dict[int, NodeStatus] | None:
    """Node id -> status from the SuperLink recorded in ``state`` (deploy.json); None if not reachable."""
    port = state.get("superlink_port")
    if not port:
        return None
    tls = bool(state.get("tls"))
    try:
        nodes = list_nodes(
            f"{'https' if tls else 'http'}://{LOOPBACK}:{int(port)}",
            CoordinatorFolder(run_dir).loopback_tls / "ca.crt" if tls else None,
            timeout=ASK_TIMEOUT,
        )
    except Exception as exc:  # a stopped SuperLink, a half-written deploy.json: just unknown
        logger.debug("no node list from the SuperLink: %s", exc)
        return None
    return {node.node_id: node for node in nodes}


class NodeWatch:
    """The last node list of one run folder's SuperLink, asked at most every :data:`CACHE_SECONDS`."""

    def __init__(self, run_dir: Path, ask: Any = ask_superlink) -> None:
        self.run_dir = run_dir
        self._ask = ask
        self._lock = threading.Lock()
        self._asked = -CACHE_SECONDS
        self._nodes: dict[int, NodeStatus] = {}
        self.live = False
        """Did the last ask get an answer (else the statuses are the last ones known)?"""

    def nodes(self, state: dict[str, Any]) -> dict[int, NodeStatus]:
        with self._lock:
            if time.monotonic() - self._asked >= CACHE_SECONDS:
                self._asked = time.monotonic()
                answer = self._ask(state, self.run_dir) if state else None
                self.live = answer is not None
                if answer is not None:
                    self._nodes = answer
            return dict(self._nodes)
