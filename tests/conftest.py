"""Shared test fixtures: deterministic torch settings and the location of the real data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _site_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A site's state (privacy ledger, counters) goes to a fresh folder, never the real home.

    Child processes (e2e sites) inherit it through the environment."""
    state = tmp_path_factory.mktemp("site-state")
    monkeypatch.setenv("CXR_FL_STATE_DIR", str(state))
    return state


@pytest.fixture
def flower_task_identity() -> Iterator[None]:
    """Flower creates messages inside a task; outside one (unit tests), say which task this is."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture
def shared_data() -> Path:
    """The public CXR sets beside the project; tests using it are marked ``realdata``."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
