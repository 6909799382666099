"""How a site starts its SuperNode and explains why it was refused."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from client.deploy import SiteNodeSettings, refusal_reason, unreachable_reason
from client.site import site_from_node_config
from client.site_privacy import SitePrivacy
from common.errors import ConfigError
from common.run_settings import run_settings_from_config
from tests.client.helpers import no_warm_runner


def _settings(tmp_path: Path, **changes: object) -> SiteNodeSettings:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    values: dict[str, object] = {
        "server": "127.0.0.1:9092",
        "site": "site-a",
        "data_format": "image-folder",
        "data_path": tmp_path / "data",
        "out_dir": tmp_path / "out",
        "ca_cert": ca,
        "privacy": SitePrivacy(epsilon=3.0),
    }
    values.update(changes)
    return SiteNodeSettings(**values)  # type: ignore[arg-type]


def test_node_config_is_what_the_client_app_reads(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    node_config = parse_config_args([settings.node_config()])  # as flower-supernode parses it

    group_norm_run = run_settings_from_config({"teacher-norm": "group"})  # DP at a site needs GroupNorm
    site = site_from_node_config(node_config, group_norm_run)

    assert site.name == "site-a"
    assert site.data_path == (tmp_path / "data").resolve()
    assert site.out_dir == (tmp_path / "out").resolve()
    assert site.privacy.epsilon == 3.0


def test_command_has_tls_and_authentication(tmp_path: Path) -> None:
    key = tmp_path / "site-a.key"
    key.write_text("k")
    command = _settings(tmp_path, private_key=key).command(1234, tmp_path / "superexec.secret")
    assert command[command.index("--root-certificates") + 1] == str((tmp_path / "ca.crt").resolve())
    assert command[command.index("--auth-supernode-private-key") + 1] == str(key.resolve())
    assert "--insecure" not in command
    assert command[command.index("--port") + 1] == "1234"


def test_bad_server_address(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        _settings(tmp_path, server="localhost")


def test_refusal_reasons_say_which(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    tls = refusal_reason("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed", settings)
    assert tls is not None
    assert tls.startswith("TLS failure")
    key = refusal_reason("[code: 2004] Failed to activate SuperNode.", settings)
    assert key is not None
    assert "not registered" in key
    assert refusal_reason("INFO :      SuperNode ID: 42", settings) is None


def test_unreachable_reason_names_a_refused_port(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    reason = unreachable_reason(_settings(tmp_path, server=f"127.0.0.1:{port}"))
    assert reason.startswith(f"connection refused at 127.0.0.1:{port}")


def test_a_reconnected_supernode_is_not_taken_for_a_stuck_one() -> None:
    from flower_adapter.supernode_log import connection_news

    assert connection_news("WARNING :   Connection attempt failed, retrying in 0.80 seconds") is False
    assert connection_news("INFO :      Connection successful after 4.41 seconds and 4 tries.") is True
    assert connection_news("INFO :      Sent successfully") is True
    assert connection_news("INFO :      SuperNode ID: 1739659480893492950") is True
    assert connection_news("INFO :      Start `flwr-clientapp` process") is None


def test_a_session_the_restarted_server_forgot_is_told_from_a_refusal() -> None:
    from flower_adapter.supernode_log import forgotten_session

    assert forgotten_session(
        "httpx.HTTPStatusError: Client error '401 Unauthorized' for url "
        "'https://127.0.0.1:35471/v1/fleet/send-node-heartbeat'"
    )
    assert not forgotten_session("[code: 2004] Failed to activate SuperNode.")
    assert not forgotten_session("INFO :      SuperNode ID: 42")


# A stand-in for flower-supernode: the first start joins, loses its session to a restarted
# server without the 401 traceback reaching its output (as happens when Flower's other thread
# is cut off by the exit) and stops itself with code 0; the second start joins and fails.
FAKE_SUPERNODE = """\
import sys
from pathlib import Path

starts = Path(sys.argv[1])
count = int(starts.read_text()) + 1 if starts.is_file() else 1
starts.write_text(str(count))
print(f"INFO :      SuperNode ID: {count}", flush=True)
if count == 1:
    print("WARNING :   Connection attempt failed, retrying in 0.34 seconds", flush=True)
    print("INFO :      SuperNode terminated gracefully.", flush=True)
    sys.exit(0)
sys.exit(7)
"""


def test_a_supernode_that_stops_itself_after_joining_is_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from client.deploy import SiteNode, SiteRefusedError

    script = tmp_path / "fake_supernode.py"
    script.write_text(FAKE_SUPERNODE)
    starts = tmp_path / "starts"
    fake_command = [sys.executable, str(script), str(starts)]
    monkeypatch.setattr(SiteNodeSettings, "command", lambda _self, _port, _secret: fake_command)
    monkeypatch.setattr(SiteNode, "_start_runner", no_warm_runner)
    events: list[str] = []
    node = SiteNode(_settings(tmp_path))

    with pytest.raises(SiteRefusedError, match="exited with code 7"):
        node.run(events.append)

    assert starts.read_text() == "2"
    assert any("restarting the SuperNode" in event for event in events)
