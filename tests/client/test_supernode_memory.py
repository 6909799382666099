"""A site's SuperNode runs under a memory bound and is started again when it dies (issue 24, item 8).

Flower's SuperNode unzips each new run's ``pyproject.toml`` from the app bundle (FAB) before the
site's app allow-list sees the task; a zip bomb there must fail that bounded process only, and
the site must start a fresh SuperNode and keep serving.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import pytest

from client.deploy import SiteNode, SiteNodeSettings, SiteRefusedError
from common.errors import ConfigError
from common.processes import free_port
from flower_adapter.supernode_main import FLEET_LOOP_ENDED_EXIT
from tests.client.helpers import no_warm_runner

GiB = 1024**3


def _settings(tmp_path: Path, **changes: object) -> SiteNodeSettings:
    values: dict[str, object] = {
        "server": f"127.0.0.1:{free_port()}",  # nothing listens: the SuperNode keeps trying
        "site": "site-a",
        "data_format": "synthetic",
        "data_path": None,
        "out_dir": tmp_path / "out",
        "insecure": True,
        "connect_timeout": 600.0,
    }
    values.update(changes)
    return SiteNodeSettings(**values)  # type: ignore[arg-type]


def _max_data_size(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max data size"):
            return line
    raise AssertionError(f"no data limit line in /proc/{pid}/limits")


def test_the_supernode_is_started_under_the_sites_memory_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(SiteNode, "_start_runner", no_warm_runner)
    monkeypatch.setattr("client.deploy.MAX_RESTARTS", 0)  # the SuperNode the test stops stays stopped
    node = SiteNode(_settings(tmp_path, supernode_memory_gib=1.5))
    outcome: list[BaseException] = []
    worker = threading.Thread(target=lambda: _run_catching(node, outcome), daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while not _supernode_started(node) and time.monotonic() < deadline:
            time.sleep(0.1)
        process = node.process
        assert process is not None, outcome
        assert _supernode_started(node), (outcome, node.log_path.read_text())
        limits = _max_data_size(process.pid)
        assert re.split(r"\s{2,}", limits)[1:3] == [str(int(1.5 * GiB))] * 2, limits
        assert "flower_adapter.supernode_main" in Path(f"/proc/{process.pid}/cmdline").read_text()
    finally:
        node.stop()
        worker.join(timeout=60)
    assert not worker.is_alive()


def test_the_memory_bound_is_checked_and_can_be_lifted(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--supernode-memory"):
        _settings(tmp_path, supernode_memory_gib=0.1)
    with pytest.raises(ConfigError, match="--supernode-memory"):
        _settings(tmp_path, supernode_memory_gib=float("nan"))
    secret = tmp_path / "superexec.secret"
    unbounded = _settings(tmp_path, supernode_memory_gib=0).command(1234, secret)
    assert unbounded[unbounded.index("--memory-limit") + 1] == "0"
    default = _settings(tmp_path).command(1234, secret)
    assert default[default.index("--memory-limit") + 1] == str(4 * GiB)


DYING_SUPERNODE = """\
import os, signal, sys
starts = __import__("pathlib").Path(sys.argv[1])
count = int(starts.read_text()) + 1 if starts.is_file() else 1
starts.write_text(str(count))
print(f"INFO :      SuperNode ID: {count}", flush=True)
if count == 1:
    os.kill(os.getpid(), signal.SIGKILL)  # e.g. the kernel's OOM killer
if count == 2:
    print("ERROR :      ", flush=True)  # what Flower logs for a MemoryError in its Fleet loop
    sys.exit(LOOP_ENDED)
sys.exit(7)
"""


class _RecordingRunner:
    """Stands in for the warm runner: records what the site tells it."""

    def __init__(self) -> None:
        self.targets: list[str | None] = []
        self.stopped_tasks: list[str] = []

    def set_target(self, address: str | None) -> None:
        self.targets.append(address)

    def stop_current_task(self, reason: str) -> None:
        self.stopped_tasks.append(reason)

    def stop(self) -> None:
        pass


def test_a_supernode_that_dies_is_started_again_and_its_task_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "dying_supernode.py"
    script.write_text(DYING_SUPERNODE.replace("LOOP_ENDED", str(FLEET_LOOP_ENDED_EXIT)))
    starts = tmp_path / "starts"
    fake_command = [sys.executable, str(script), str(starts)]
    monkeypatch.setattr(SiteNodeSettings, "command", lambda _self, _port, _secret: fake_command)
    monkeypatch.setattr(SiteNode, "_start_runner", no_warm_runner)  # the test's runner stands in
    node = SiteNode(_settings(tmp_path))
    runner = _RecordingRunner()
    node.runner = runner  # type: ignore[assignment]
    events: list[str] = []

    with pytest.raises(SiteRefusedError, match="exited with code 7"):  # only an ordinary exit ends it
        node.run(events.append)

    assert starts.read_text() == "3"  # killed, started again; loop ended, started again
    assert any("killed (signal 9); restarting the SuperNode" in event for event in events)
    assert any("Fleet loop ended" in event and "restarting" in event for event in events)
    assert len(runner.stopped_tasks) == 3  # each SuperNode's task, if any, stops with it
    assert [t for t in runner.targets if t is not None]
    assert runner.targets[-1] is None


LAUNCH_WITH_A_FAKE_FLOWER = textwrap.dedent(
    """\
    import sys, threading
    import flwr.supernode.cli

    def fake_flower_supernode():
        print("flower-supernode", sys.argv[1:], flush=True)
        threading.Thread(target=threading.Event().wait).start()  # as Flower's Runtime API thread
        if "--exit" in sys.argv:
            raise SystemExit(int(sys.argv[-1]))
        # else: the Fleet loop ended on an error that Flower logged, and returns

    flwr.supernode.cli.flower_supernode = fake_flower_supernode
    from flower_adapter.supernode_main import main
    main(["--memory-limit", "0", "--", *sys.argv[1:]])
    """
)


@pytest.mark.parametrize(("args", "code"), [((), FLEET_LOOP_ENDED_EXIT), (("--exit", "3"), 3)])
def test_a_supernode_whose_fleet_loop_ended_does_not_linger(args: tuple[str, ...], code: int) -> None:
    launched = subprocess.run(
        [sys.executable, "-c", LAUNCH_WITH_A_FAKE_FLOWER, "--superlink", "x:1", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert launched.returncode == code, launched.stderr
    assert "flower-supernode ['--superlink', 'x:1'" in launched.stdout  # Flower got its arguments


def _zip_bomb(path: Path, inflated: int) -> None:
    """A FAB whose pyproject.toml inflates to ``inflated`` zero bytes (about 1/1000 on disk):
    identical fully flushed deflate blocks, repeated; a zip64 entry as zipfile writes one."""
    block_size = 8 * 1024 * 1024
    assert inflated % block_size == 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(block_size)) + compressor.flush(zlib.Z_FULL_FLUSH)
    count = inflated // block_size
    stream = block * count + compressor.flush(zlib.Z_FINISH)
    crc = 0
    zeros = bytes(block_size)
    for _ in range(count):
        crc = zlib.crc32(zeros, crc)
    name = b"pyproject.toml"
    zip64 = struct.pack("<HHQ", 0x0001, 8, inflated)  # the inflated size does not fit 32 bits
    fields = struct.pack("<HHHHHIII", 45, 0, 8, 0, 0x21, crc, len(stream), 0xFFFFFFFF)
    local = struct.pack("<I", 0x04034B50) + fields + struct.pack("<HH", len(name), len(zip64)) + name + zip64
    central = (
        struct.pack("<IH", 0x02014B50, 45)
        + fields
        + struct.pack("<HHHHHII", len(name), len(zip64), 0, 0, 0, 0, 0)
        + name
        + zip64
    )
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local) + len(stream), 0)
    path.write_bytes(local + stream + central + end)


READ_FAB_UNDER_A_BOUND = textwrap.dedent(
    """\
    import sys
    from pathlib import Path
    from flwr.common.config import get_fab_config  # what the SuperNode calls on a new run's FAB
    from flower_adapter.supernode_main import limit_memory
    used = int(next(l for l in open("/proc/self/status") if l.startswith("VmData")).split()[1]) * 1024
    limit_memory(used + 256 * 1024 * 1024)
    get_fab_config(Path(sys.argv[1]).read_bytes())
    print("read it all")
    """
)


def test_a_zip_bomb_fab_fails_only_the_bounded_process(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.fab"
    _zip_bomb(bomb, 2 * GiB)
    assert bomb.stat().st_size < 4 * 1024 * 1024

    read = subprocess.run(
        [sys.executable, "-c", READ_FAB_UNDER_A_BOUND, str(bomb)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert read.returncode != 0
    assert "MemoryError" in read.stderr
    assert "read it all" not in read.stdout


def _supernode_started(node: SiteNode) -> bool:
    """Flower's first line: the bound is set before Flower is imported."""
    return node.log_path.is_file() and "Starting Flower SuperNode" in node.log_path.read_text(
        errors="replace"
    )


def _run_catching(node: SiteNode, outcome: list[BaseException]) -> None:
    try:
        node.run()
    except BaseException as exc:  # the test stops the SuperNode: the site says it exited
        outcome.append(exc)
