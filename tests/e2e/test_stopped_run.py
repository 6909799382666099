"""A run the coordinator stops stops its work at the site (issue 24, item 8).

A real federation (TLS, site authentication; tests/e2e/test_federation.py's helper) with one
site that trains for a long time (many batches of one image). The site runs with a trace of its
training steps (tests/e2e/step_trace_site.py). Once it trains, the coordinator stops the run with
``flwr stop`` on its own machine, or with ``cxr-fl-server stop`` (which also stops the SuperLink,
after it has told the sites); the site must learn it (it asks the SuperLink about the run of
the task it works on), say so in its log, and start no training step after that: in the trace,
after ``stop``, at most the one batch that was already running when the stop arrived finishes.
The site process keeps serving.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from common.processes import console_script
from tests.e2e.harness import SERVER, TINY_RUN, Federation, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
LONG_TRAINING = (
    TINY_RUN.replace("batch-size = 16\n", "batch-size = 1\n")
    + "num-rounds = 1\nlocal-epochs = 50\nkd-enabled = false\n"
    "min-train-sites = 1\nmin-evaluate-sites = 1\nmin-available-sites = 1\n"
)


def _trace(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


@pytest.mark.parametrize("how", ["flwr stop", "cxr-fl-server stop"])
def test_a_run_stopped_by_the_coordinator_stops_training_at_the_site(
    federation: Federation, how: str
) -> None:
    federation.prepare("site-a")
    config = federation.root / "long.toml"
    config.write_text(LONG_TRAINING, encoding="utf-8")
    federation.start_server("--config", str(config), sites=("site-a",))
    federation.wait_listening()
    trace = federation.root / "site-a.trace"
    site = _start_traced_site(federation, trace)
    federation.wait_run_submitted()
    wait_for(lambda: _trace(trace).count("step train") >= 2, 300, "site-a to train")

    run_id = json.loads((federation.run_dir / "deploy.json").read_text())["flower_run_id"]
    if how == "flwr stop":  # Flower's own command, on the coordinator's machine
        command = [console_script("flwr"), "stop", str(run_id), "cxr-fl"]
        env = {**federation.env, "FLWR_HOME": str(federation.run_dir / "flwr-home")}
    else:  # the coordinator's command: it also stops the SuperLink, once the site was told
        command = [SERVER, "stop", "--run-dir", str(federation.run_dir)]
        env = federation.env
    stopped = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr

    log = federation.root / "site-a" / "supernode.log"
    wait_for(
        lambda: f"run {run_id} stopped by the coordinator" in _read(log), 120, "the stop to reach site-a"
    )
    wait_for(lambda: "the site stopped its work" in _read(log), 120, "site-a to end the stopped task")

    steps = _trace(trace)
    assert "stop" in steps, steps[-5:]
    after_stop = steps[steps.index("stop") + 1 :]
    # the batch running when the stop arrived may finish; no batch starts after it
    assert after_stop.count("step train") <= 1, after_stop
    assert ", 0 after)" in _read(log)
    assert site.poll() is None, federation.output("site-a")  # the site keeps serving


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def _start_traced_site(federation: Federation, trace: Path) -> subprocess.Popen[bytes]:
    """site-a as `cxr-fl-client start` runs it, with its training steps traced."""
    import sys

    log = (federation.root / "site-a.out").open("ab")
    args = [sys.executable, "-m", "tests.e2e.step_trace_site", str(trace), "start"]
    args += ["--server", f"127.0.0.1:{federation.port}", "--site", "site-a", "--format", "synthetic"]
    args += ["--out", str(federation.root / "site-a"), "--ca", str(federation.certs / "ca.crt")]
    args += ["--key", str(federation.keys / "site-a.key"), "--threads", "1", "--image-size", "32"]
    args += ["--max-local-epochs", "50"]  # the site's own policy admits this long a round
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=federation.env, cwd=REPO_ROOT)
    log.close()
    federation.processes.append(process)
    return process
