"""What a line of Flower's SuperNode output says: the site's only view of its SuperNode's state.

``cxr-fl-client start`` (client/deploy.py) reads its SuperNode's output line by line. Flower 1.42
(flower_adapter.FLWR_VERSION) says in words, not in codes, that the site was refused (and why),
that it joined, that its link failed or came back, that the server forgot its session, and which
message it received or sent; these functions read those words, and client/deploy.py decides what
the site does and tells its user. A Flower upgrade that rewords a line changes this module only.
"""

from __future__ import annotations

import re
from typing import Literal

ANSI = re.compile(r"\x1b\[[0-9;]*m")
"""Colour codes of Flower's log lines."""
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_RECEIVING = "Receiving:"

Refusal = Literal["tls", "unregistered", "bad-key", "auth-needs-tls"]
"""Why a SuperNode cannot join: the server's certificate failed verification, the SuperLink does
not know the site's key (or still counts an earlier session as online), the site's private key
does not parse, or site authentication was asked for without TLS."""


def plain(line: str) -> str:
    """The line without its trailing newline and colour codes."""
    return ANSI.sub("", line.rstrip("\n"))


def refusal(line: str) -> Refusal | None:
    """Which refusal this line reports, if any."""
    if "CERTIFICATE_VERIFY_FAILED" in line or "SSL/TLS handshake error" in line:
        return "tls"
    if "Failed to activate SuperNode" in line:
        return "unregistered"
    if "Unable to parse the private key" in line:
        return "bad-key"
    if "started without TLS but node auth" in line.lower() or "Exit Code: 303" in line:
        return "auth-needs-tls"
    return None


def joined_node_id(line: str) -> int | None:
    """The node id of a SuperNode that this line says joined, if it says so."""
    match = _NODE_ID.search(line)
    return int(match[1]) if match else None


def forgotten_session(line: str) -> bool:
    """Does this line of a joined SuperNode say the server no longer knows its session?

    A coordinator restarted with its SuperLink state in memory (the default) no longer knows the
    site's session, and until it has registered the sites' keys again it refuses them (HTTP 401):
    Flower's SuperNode then sends itself SIGINT and stops (exit code 0), and the site starts a new
    one, which joins again. The 401 traceback is printed by another thread and is often lost as the
    process exits, so the SuperNode's own "terminated gracefully" counts too: nothing else signals
    it (it runs in its own session; the site stops it only after it has stopped reading it).
    """
    return ("401 Unauthorized" in line and "/v1/fleet/" in line) or "SuperNode terminated gracefully" in line


def connection_news(line: str) -> bool | None:
    """What a SuperNode log line says about its link to the SuperLink: False for a failed
    attempt, True for a (re)established link, None for anything else."""
    if "Connection attempt failed" in line:
        return False
    # "Connection successful after 4.41 seconds and 4 tries.", "Sent successfully", "SuperNode ID: ..."
    if "Connection successful" in line or "successfully" in line or "SuperNode ID" in line:
        return True
    return None


def received_message_type(line: str) -> str | None:
    """The type of the message this line says the SuperNode received (e.g. "train"), if any."""
    if _RECEIVING not in line:
        return None
    return line.split(_RECEIVING, 1)[1].strip().split(" (")[0]


def reply_sent(line: str) -> bool:
    """Does this line say the SuperNode sent a reply?"""
    return "Sent successfully" in line
