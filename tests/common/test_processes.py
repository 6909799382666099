"""Stopping processes by PID (common/processes.py)."""

from __future__ import annotations

from pathlib import Path


def test_processes_left_without_a_parent_are_found_by_their_environment_and_stopped(tmp_path: Path) -> None:
    import subprocess
    import sys

    from common.processes import pid_alive, pids_with_env, stop_pids

    marker = str(tmp_path / "flwr-home")
    env = {"PATH": "/usr/bin:/bin", "FLWR_HOME": marker}
    # a worker that ignores SIGTERM, like one busy in native code: SIGKILL follows
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(120)"
    )
    worker = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    other = subprocess.Popen(["sleep", "120"], env={**env, "FLWR_HOME": marker + "-other"})
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "ready"
        assert pids_with_env("FLWR_HOME", marker) == [worker.pid]  # exact value: not the other run's

        stop_pids([worker.pid], timeout=0.5)
        worker.wait(timeout=5)

        assert not pid_alive(worker.pid)
        assert pid_alive(other.pid)
    finally:
        for process in (worker, other):
            process.kill()
            process.wait()
