"""The door, as the console shows it: calls and connections the Fleet gateway refused.

The gateway (server/fleet_gateway.py, server/gateway_connections.py) writes one warning line to
RUN_DIR/gateway.log for every call it refused or that failed, every connection it refused over a
limit, cut off or that never finished its TLS handshake. Those lines are the only record, so
they are read back here, by the wording of those two modules (the tests of this module hold
lines of that wording). Reasons are grouped coarsely (numbers dropped), so that a caller cannot
make the console or the ``/metrics`` labels grow by varying what it sends.

The file is read incrementally: only what was appended since the last read, from the start again
when the file was replaced or cut.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

CALL = re.compile(
    r"server\.fleet_gateway: (?P<verb>Refused|Failed) (?P<method>\S+) (?P<path>\S+) from "
    r"(?P<peer>\S+): (?P<status>\S+) \((?P<why>.*)\)\s*$"
)
CONNECTION = re.compile(r"server\.fleet_gateway: Refused a connection from (?P<peer>\S+): (?P<why>.*)$")
MORE_CONNECTIONS = re.compile(r"server\.fleet_gateway: Refused (?P<count>\d+) more connections over a limit")
CUT_OFF = re.compile(r"server\.fleet_gateway: Cut off (?P<peer>\S+?)(?: during [^:]*)?: (?P<why>.*)$")
NO_TLS = re.compile(r"server\.fleet_gateway: Closed a connection from (?P<peer>\S+): no TLS session")
BAD_REQUEST = re.compile(r"server\.fleet_gateway: Refused a request from (?P<peer>\S+): 400")
NUMBER = re.compile(r"\d+(?:\.\d+)?")
RECENT_LINES = 8
SEVERAL_PEERS = "(several)"


def peer_host(peer: str) -> str:
    """The address of ``host:port`` or ``[v6]:port`` (the port of a caller changes every call)."""
    if peer.startswith("["):
        return peer[1 : peer.find("]")] if "]" in peer else peer
    return peer.rsplit(":", 1)[0] if peer.count(":") == 1 else peer


def classify(line: str) -> tuple[str, str, int] | None:
    """(reason, peer address, count) of a refusal line, None for any other line."""
    if match := CALL.search(line):
        if match["verb"] == "Failed":
            return None  # the gateway or SuperLink failed: not a refusal of the caller
        return f"{match['status']} {NUMBER.sub('N', match['why'])}", peer_host(match["peer"]), 1
    if match := MORE_CONNECTIONS.search(line):
        return "connection over a limit", SEVERAL_PEERS, int(match["count"])
    if match := CONNECTION.search(line):
        return "connection over a limit", peer_host(match["peer"]), 1
    if match := CUT_OFF.search(line):
        return f"cut off: {NUMBER.sub('N', match['why'])}", peer_host(match["peer"]), 1
    if match := NO_TLS.search(line):
        return "no TLS session", peer_host(match["peer"]), 1
    if match := BAD_REQUEST.search(line):
        return "400 malformed request", peer_host(match["peer"]), 1
    return None


@dataclass
class Refusals:
    """Refusals counted so far: by reason, by peer address, and the last few lines."""

    by_reason: Counter[str] = field(default_factory=Counter)
    by_peer: Counter[str] = field(default_factory=Counter)
    recent: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def add(self, line: str) -> None:
        found = classify(line)
        if found is None:
            return
        reason, peer, count = found
        self.by_reason[reason] += count
        self.by_peer[peer] += count
        self.recent = [*self.recent, line.strip()][-RECENT_LINES:]


class GatewayLog:
    """Follows one gateway.log: :meth:`read` returns the refusals in it so far."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._inode = -1
        self._partial = b""
        self._refusals = Refusals()

    def read(self) -> Refusals:
        try:
            stat = self.path.stat()
        except OSError:
            return self._refusals
        if stat.st_ino != self._inode or stat.st_size < self._offset:  # replaced or cut: start over
            self._inode, self._offset, self._partial, self._refusals = stat.st_ino, 0, b"", Refusals()
        if stat.st_size > self._offset:
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                data = self._partial + handle.read(stat.st_size - self._offset)
            self._offset = stat.st_size
            *lines, self._partial = data.split(b"\n")
            for raw in lines:
                self._refusals.add(raw.decode("utf-8", "replace"))
        return self._refusals
