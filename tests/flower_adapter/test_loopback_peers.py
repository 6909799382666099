"""Finding the uid behind a loopback peer in /proc/net/tcp{,6} (flower_adapter/loopback_peers.py)."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flower_adapter.loopback_peers import SocketRow, check_peer, matching_rows, proc_endpoint

# Rows as a little-endian kernel prints them (trailing columns shortened). 127.0.0.2:41000 ->
# 127.0.0.1:8080 held by uid 65534, its server end held by uid 0, a listener, a TIME_WAIT entry.
TCP_LITTLE_ENDIAN = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0
   1: 0200007F:A028 0100007F:1F90 01 00000000:00000000 00:00000000 00000000 65534        0 1002 1 0
   2: 0100007F:1F90 0200007F:A028 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0
   3: 0100007F:A029 0100007F:1F90 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0
"""
# ::1 port 43690 -> ::1 port 8080 held by uid 1000.
TCP6_LITTLE_ENDIAN = """\
  sl  local_address                         remote_address                        st ...
   0: 00000000000000000000000001000000:AAAA 00000000000000000000000001000000:1F90 01 """
TCP6_LITTLE_ENDIAN += "00000000:00000000 00:00000000 00000000  1000        0 2001 1 0\n"


def test_ipv4_endpoints_are_printed_as_host_order_words() -> None:
    assert proc_endpoint("127.0.0.1", 8080, "little") == ("tcp", "0100007F:1F90")
    assert proc_endpoint("127.0.0.1", 8080, "big") == ("tcp", "7F000001:1F90")
    assert proc_endpoint("10.1.2.3", 1, "little") == ("tcp", "0302010A:0001")


def test_ipv6_endpoints_are_four_host_order_words() -> None:
    assert proc_endpoint("::1", 43690, "little") == ("tcp6", "0" * 24 + "01000000:AAAA")
    assert proc_endpoint("::1", 43690, "big") == ("tcp6", "0" * 31 + "1:AAAA")
    mapped = proc_endpoint("::ffff:127.0.0.2", 80, "little")
    assert mapped == ("tcp6", "0000000000000000FFFF00000200007F:0050")


def test_the_peer_row_is_the_one_whose_local_end_is_the_peer() -> None:
    rows = list(matching_rows(TCP_LITTLE_ENDIAN.splitlines(), "0200007F:A028", "0100007F:1F90"))
    assert rows == [SocketRow(state=1, uid=65534, inode=1002)]
    server_end = list(matching_rows(TCP_LITTLE_ENDIAN.splitlines(), "0100007F:1F90", "0200007F:A028"))
    assert server_end == [SocketRow(state=1, uid=0, inode=1003)]


def test_ipv6_rows_and_lower_case_hex_are_read() -> None:
    local, remote = "0" * 24 + "01000000:AAAA", "0" * 24 + "01000000:1F90"
    assert list(matching_rows(TCP6_LITTLE_ENDIAN.splitlines(), local, remote)) == [SocketRow(1, 1000, 2001)]
    lower = TCP6_LITTLE_ENDIAN.lower()
    assert list(matching_rows(lower.splitlines(), local, remote)) == [SocketRow(1, 1000, 2001)]


def test_header_and_short_lines_match_nothing() -> None:
    lines = ["  sl  local_address rem_address st", "garbage", ""]
    assert list(matching_rows(lines, "0100007F:1F90", "00000000:0000")) == []


# -- check_peer over a table written in this machine's byte order -----------------------------


def _row(peer: tuple[str, int], local: tuple[str, int], uid: int, inode: int, state: str = "01") -> str:
    peer_text, local_text = proc_endpoint(*peer)[1], proc_endpoint(*local)[1]
    timers = "00000000:00000000 00:00000000 00000000"
    return f"   0: {peer_text} {local_text} {state} {timers} {uid} 0 {inode} 1 0\n"


@pytest.fixture
def proc_net(tmp_path: Path) -> Path:
    for table in ("tcp", "tcp6"):
        (tmp_path / table).write_text("  sl  local_address rem_address   st ...\n", encoding="ascii")
    return tmp_path


def _add(proc_net: Path, table: str, *rows: str) -> None:
    with (proc_net / table).open("a", encoding="ascii") as out:
        out.writelines(rows)


SERVER = ("127.0.0.1", 8080)
PEER = ("127.0.0.2", 41000)


def test_the_owners_socket_is_admitted_and_others_are_not(proc_net: Path) -> None:
    _add(proc_net, "tcp", _row(PEER, SERVER, uid=1000, inode=7), _row(SERVER, PEER, uid=0, inode=8))
    assert check_peer(PEER, SERVER, 1000, proc_net).admitted
    refused = check_peer(PEER, SERVER, 0, proc_net)
    assert (refused.admitted, refused.uid) == (False, 1000)
    assert "uid 1000" in refused.reason


def test_a_socket_no_process_holds_proves_nothing(proc_net: Path) -> None:
    # closed by its owner or TIME_WAIT: the kernel shows inode 0 (and uid 0)
    _add(proc_net, "tcp", _row(PEER, SERVER, uid=0, inode=0, state="06"))
    verdict = check_peer(PEER, SERVER, 0, proc_net)
    assert not verdict.admitted
    assert "no process holds" in verdict.reason


def test_no_row_two_rows_or_a_remote_peer_are_refused(proc_net: Path) -> None:
    assert not check_peer(PEER, SERVER, 0, proc_net).admitted  # no row at all
    _add(proc_net, "tcp", _row(PEER, SERVER, uid=0, inode=7), _row(PEER, SERVER, uid=0, inode=7))
    assert check_peer(PEER, SERVER, 0, proc_net).admitted  # one socket listed twice
    _add(proc_net, "tcp", _row(PEER, SERVER, uid=0, inode=9))
    assert not check_peer(PEER, SERVER, 0, proc_net).admitted  # two sockets: ambiguous
    remote = check_peer(("192.0.2.7", 41000), SERVER, 0, proc_net)
    assert not remote.admitted
    assert "loopback" in remote.reason
    assert not check_peer("/run/some.sock", "", 0, proc_net).admitted  # not TCP


def test_ipv6_and_mapped_ipv4_peers_are_found(proc_net: Path) -> None:
    v6_server, v6_peer = ("::1", 8080, 0, 0), ("::1", 43690, 0, 0)
    _add(proc_net, "tcp6", _row(v6_peer[:2], v6_server[:2], uid=1000, inode=5))  # type: ignore[arg-type]
    assert check_peer(v6_peer, v6_server, 1000, proc_net).admitted
    # a dual-stack listener sees an IPv4 client as ::ffff:127.0.0.2; its socket is in tcp
    _add(proc_net, "tcp", _row(PEER, SERVER, uid=1000, inode=6))
    mapped_peer, mapped_server = ("::ffff:127.0.0.2", 41000, 0, 0), ("::ffff:127.0.0.1", 8080, 0, 0)
    assert check_peer(mapped_peer, mapped_server, 1000, proc_net).admitted


def test_an_unreadable_table_refuses(tmp_path: Path) -> None:
    verdict = check_peer(PEER, SERVER, 0, tmp_path / "missing")
    assert not verdict.admitted
    assert "cannot read" in verdict.reason


# -- the real /proc/net of this machine -------------------------------------------------------


def _connected_pair(family: socket.AddressFamily, host: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((host, 0))
        listener.listen(1)
        with socket.socket(family, socket.SOCK_STREAM) as client:
            if family == socket.AF_INET:
                client.bind(("127.0.0.2", 0))
            client.connect(listener.getsockname())
            accepted, _ = listener.accept()
            with accepted:
                yield client, accepted


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/net/tcp is Linux's")
@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_this_process_is_the_owner_of_its_own_loopback_connection(
    family: socket.AddressFamily, host: str
) -> None:
    try:
        pair = _connected_pair(family, host)
        _client, accepted = next(pair)
    except OSError as exc:
        pytest.skip(f"no {host} on this machine: {exc}")
    verdict = check_peer(accepted.getpeername(), accepted.getsockname(), os.geteuid())
    assert verdict.admitted, verdict
    assert not check_peer(accepted.getpeername(), accepted.getsockname(), os.geteuid() + 1).admitted
    pair.close()
