"""OpenMP's spinning is limited before torch loads, in every process cxr-fl starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import importlib, json, os, sys
importlib.import_module(sys.argv[1])
names = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
env = {k: os.environ[k] for k in names if k in os.environ}
print(json.dumps({"env": env, "torch": "torch" in sys.modules}))
"""


def _probe(module: str, **policy: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(policy)
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-c", PROBE, module]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package", ["common", "client", "server", "simulation"])
def test_each_package_limits_openmp_spinning_before_importing_torch(package: str) -> None:
    assert _probe(package) == {"env": {"GOMP_SPINCOUNT": "1000"}, "torch": False}


def test_the_entry_points_load_torch_with_the_spinning_limited() -> None:
    # the ClientApp (Ray workers, the site's warm runner) and the ServerApp import torch
    for module in ("client.app", "server.app"):
        assert _probe(module) == {"env": {"GOMP_SPINCOUNT": "1000"}, "torch": True}


def test_a_wait_policy_already_in_the_environment_is_left_as_it_is() -> None:
    assert _probe("client", OMP_WAIT_POLICY="ACTIVE")["env"] == {"OMP_WAIT_POLICY": "ACTIVE"}
    assert _probe("client", GOMP_SPINCOUNT="0")["env"] == {"GOMP_SPINCOUNT": "0"}


def test_the_function_says_whether_it_reaches_this_process() -> None:
    from common.openmp import limit_openmp_spinning

    assert "torch" in sys.modules  # the test process loaded torch already (conftest)
    assert limit_openmp_spinning() is False
