"""The nodes a SuperLink knows: Flower's Control API ``ListNodes``, as ``flwr supernode list`` asks it.

Through Flower's own HTTP client (``flwr.supercore.control``, flwr 1.42), for the coordinator's
console (server/console/nodes.py), which asks its run's loopback SuperLink.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NodeStatus:
    """One node as the SuperLink knows it (times as ISO 8601 text, "" when unknown)."""

    node_id: int
    status: str  # online | offline | registered | unregistered
    last_activated: str = ""
    last_deactivated: str = ""


def list_nodes(address: str, ca_cert: Path | None, timeout: float) -> list[NodeStatus]:
    """Every node of the SuperLink whose Control API is at ``address`` (``https://`` checked
    against ``ca_cert``; ``http://`` for an insecure one). Raises whatever the call raises."""
    from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=E0611
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    client = ControlHttpClient(
        address,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
        verify=str(ca_cert) if ca_cert is not None else False,
        timeout=timeout,
    )
    try:
        reply = client.ListNodes(ListNodesRequest())
    finally:
        client.close()
    return [
        NodeStatus(int(node.node_id), str(node.status), node.last_activated_at, node.last_deactivated_at)
        for node in reply.nodes_info
    ]
