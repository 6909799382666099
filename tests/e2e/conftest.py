"""Fixtures of the end-to-end tests (real SuperLink, gateway and SuperNode processes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.e2e.test_federation import Federation


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    """A coordinator and its sites under ``tmp_path``; every process it started is stopped after."""
    from tests.e2e.test_federation import Federation

    fed = Federation(tmp_path)
    try:
        yield fed
    finally:
        fed.stop_all()
