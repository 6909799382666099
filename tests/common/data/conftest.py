"""Tiny synthetic layouts of public data sets, made under tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.common.data.helpers import write_image


@pytest.fixture
def kermany_dir(tmp_path: Path) -> Path:
    """chest_xray/{train,test}/{NORMAL,PNEUMONIA} with Kermany-style names."""
    root = tmp_path / "chest_xray"
    names = {
        "train/NORMAL": ["IM-0115-0001.jpeg", "IM-0115-0002.jpeg", "NORMAL2-IM-1018-0001.jpeg"],
        "train/PNEUMONIA": ["person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg", "person2_virus_3.jpeg"],
        "test/NORMAL": ["IM-0001-0001.jpeg"],
        "test/PNEUMONIA": ["person3_virus_4.jpeg"],
    }
    seed = 0
    for folder, files in names.items():
        for name in files:
            write_image(root / folder / name, seed=seed)
            seed += 1
    return root
