"""Fixtures of the end-to-end tests (real SuperLink, gateway and SuperNode processes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Federation


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    """A coordinator and its sites under ``tmp_path``; every process it started is stopped after."""
    fed = Federation(tmp_path)
    try:
        yield fed
    finally:
        fed.stop_all()
