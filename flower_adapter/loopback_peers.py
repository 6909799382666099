"""Which local user holds the other end of a loopback TCP connection (Linux ``/proc/net/tcp{,6}``).

Why: the coordinator's SuperLink must serve only the user who runs it
(flower_adapter/superlink_owner_only.py), but everything that talks to it (the ``flwr`` CLI,
Flower's SuperExec and ServerApp processes, the Fleet gateway) connects over TCP, and Linux answers
``SO_PEERCRED`` for Unix sockets only. On loopback both ends of a connection are sockets of this
machine and network namespace, and the kernel lists every TCP socket there, with the uid that
created it, in ``/proc/net/tcp`` (IPv4) and ``/proc/net/tcp6`` (IPv6). The peer's socket is the row
whose *local* address is the peer's address and whose *remote* address is ours.

Row format (``get_tcp4_sock``/``get_tcp6_sock`` in the kernel)::

    sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
    0:  0100007F:1F90 0200007F:A2C4 01 00000000:00000000 00:00000000 00000000     0        0 51234 ...

An address is printed as the kernel holds it: each 32-bit word of the address (one for IPv4, four
for IPv6), bytes in network order, printed with ``%08X`` as a *host-order* integer, so 127.0.0.1 is
``0100007F`` on a little-endian machine and ``7F000001`` on a big-endian one. The port is the port
number in ``%04X``.

A row with inode 0 is a socket that no process holds any more (closed by its owner, or a TIME_WAIT
entry, whose uid the kernel shows as 0): it says nothing about who sent what, so it never admits.
Anything that cannot be attributed (a peer that is not loopback, no row, two live sockets with the
same addresses, an unreadable table) is refused: the check fails closed.

Cost: the kernel walks its whole established-connection hash table for each read (about 10 ms on
this project's test machine, 262,144 buckets); the SuperLink's clients keep their connections
alive, so it is paid once per new connection, not per request.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PROC_NET = Path("/proc/net")
ByteOrder = Literal["little", "big"]
_UID_COLUMN = 7
_INODE_COLUMN = 9


@dataclass(frozen=True)
class SocketRow:
    """What ``/proc/net/tcp{,6}`` says about one socket."""

    state: int
    uid: int
    inode: int


@dataclass(frozen=True)
class PeerVerdict:
    """Whether a connection is admitted, the uid that holds the peer's socket, and why."""

    admitted: bool
    uid: int | None
    reason: str


def proc_endpoint(host: str, port: int, byteorder: ByteOrder = sys.byteorder) -> tuple[str, str]:
    """The table (``tcp`` or ``tcp6``) and ``ADDR:PORT`` text under which the kernel lists an endpoint."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    packed = address.packed
    words = (int.from_bytes(packed[i : i + 4], byteorder) for i in range(0, len(packed), 4))
    table = "tcp" if address.version == 4 else "tcp6"
    return table, "".join(f"{word:08X}" for word in words) + f":{port:04X}"


def matching_rows(lines: Iterable[str], local: str, remote: str) -> Iterator[SocketRow]:
    """Rows of a ``/proc/net/tcp{,6}`` text whose local and remote ``ADDR:PORT`` are the ones given."""
    for line in lines:
        if local not in line.upper():  # cheap first look: most rows are other sockets
            continue
        fields = line.split()
        if len(fields) <= _INODE_COLUMN or fields[1].upper() != local or fields[2].upper() != remote:
            continue
        try:
            yield SocketRow(int(fields[3], 16), int(fields[_UID_COLUMN]), int(fields[_INODE_COLUMN]))
        except ValueError:
            continue


def _loopback_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address if address.ipv4_mapped.is_loopback else None
    return address if address.is_loopback else None


def _candidates(peer: tuple[str, int], local: tuple[str, int]) -> list[tuple[str, str, str]]:
    """(table, the peer socket's local ADDR:PORT, its remote ADDR:PORT) wherever the kernel may list it.

    A peer that an IPv6 listener sees as ``::ffff:127.0.0.2`` holds either an IPv4 socket (listed
    in ``tcp`` without the prefix) or an IPv6 one (listed in ``tcp6`` with it).
    """
    forms = [(peer, local)]
    peer_v4 = getattr(ipaddress.ip_address(peer[0].split("%", 1)[0]), "ipv4_mapped", None)
    local_v4 = getattr(ipaddress.ip_address(local[0].split("%", 1)[0]), "ipv4_mapped", None)
    if peer_v4 is not None and local_v4 is not None:
        forms.append(((str(peer_v4), peer[1]), (str(local_v4), local[1])))
    candidates = []
    for (peer_host, peer_port), (local_host, local_port) in forms:
        table, peer_text = proc_endpoint(peer_host, peer_port)
        candidates.append((table, peer_text, proc_endpoint(local_host, local_port)[1]))
    return candidates


def peer_socket_rows(
    peer: tuple[str, int], local: tuple[str, int], proc_net: Path = PROC_NET
) -> list[SocketRow]:
    """Every row that lists the peer's end of the connection ``peer`` -> ``local``."""
    rows: list[SocketRow] = []
    for table, peer_text, local_text in _candidates(peer, local):
        with (proc_net / table).open(encoding="ascii", errors="replace") as lines:
            rows.extend(matching_rows(lines, peer_text, local_text))
    return rows


def check_peer(peer: object, local: object, owner_uid: int, proc_net: Path = PROC_NET) -> PeerVerdict:
    """Admit a connection only if the peer is on loopback and its socket belongs to ``owner_uid``.

    ``peer`` and ``local`` are what a socket's ``getpeername()``/``getsockname()`` return.
    """
    if not (isinstance(peer, tuple) and isinstance(local, tuple) and len(peer) >= 2 and len(local) >= 2):
        return PeerVerdict(False, None, "not a TCP connection")
    peer_end, local_end = (str(peer[0]), int(peer[1])), (str(local[0]), int(local[1]))
    if _loopback_address(peer_end[0]) is None or _loopback_address(local_end[0]) is None:
        return PeerVerdict(False, None, "the peer is not on a loopback address")
    try:
        rows = peer_socket_rows(peer_end, local_end, proc_net)
    except OSError as exc:
        return PeerVerdict(False, None, f"cannot read {proc_net}/tcp*: {exc.strerror or exc}")
    # by inode: a table read in pages may list a socket twice when its neighbours come and go
    live = list({row.inode: row for row in rows if row.inode != 0}.values())
    if not live:
        return PeerVerdict(False, None, "no process holds the peer's socket (closed, or not found)")
    if len(live) > 1:
        return PeerVerdict(False, None, f"{len(live)} sockets claim the peer's address")
    uid = live[0].uid
    if uid != owner_uid:
        return PeerVerdict(False, uid, f"the peer's socket belongs to uid {uid}, not {owner_uid}")
    return PeerVerdict(True, uid, "the peer's socket belongs to the owner")


def describe_endpoint(endpoint: object) -> str:
    """``HOST:PORT`` (``[HOST]:PORT`` for IPv6) of a socket address, for log lines."""
    if isinstance(endpoint, tuple) and len(endpoint) >= 2:
        host = str(endpoint[0])
        return f"[{host}]:{endpoint[1]}" if ":" in host else f"{host}:{endpoint[1]}"
    return repr(endpoint)
