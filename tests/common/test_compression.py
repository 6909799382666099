"""Compression comparison: pruning, int8 quantisation and the table's numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common.compression import (
    BYTES_PER_PARAMETER,
    ImageCalibrationReader,
    compare_compression,
    nonzero_parameters,
    prune_model,
    rows_to_markdown,
    write_compression_report,
)
from common.config import ModelConfig
from common.data.cache import build_cache
from common.data.dataset import CxrDataset
from common.data.sources import load_catalog
from common.errors import ModelError
from common.metrics import compute_metrics
from common.models import build_model
from common.tasks import get_task

SIZE = 32
TASK = get_task("normal-pneumonia-covid")
NAMES = [
    "teacher",
    "student-kd",
    "student-int8-dynamic",
    "student-int8-static",
    "teacher-pruned-50",
    "teacher-pruned-80",
]


def test_global_pruning_zeroes_the_requested_share_and_leaves_the_original() -> None:
    model = build_model(ModelConfig(name="tiny-cnn"), TASK.num_classes)
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    total = sum(w.numel() for w in weights)
    before = nonzero_parameters(model)
    pruned = prune_model(model, 0.5)
    zeros = sum(int((m.weight == 0).sum()) for m in pruned.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    assert zeros == round(0.5 * total)
    assert nonzero_parameters(pruned) == before - zeros
    assert nonzero_parameters(model) == before  # the teacher itself is untouched
    assert not any(k.endswith(("_orig", "_mask")) for k in pruned.state_dict())  # prune.remove done
    # magnitude pruning: every kept weight is at least as large as every removed one
    flat = torch.cat([w.detach().abs().flatten() for w in weights])
    kept = torch.cat(
        [m.weight.detach().flatten() for m in pruned.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    )
    assert flat[kept == 0].max() <= flat[kept != 0].min()
    with pytest.raises(ModelError):
        prune_model(model, 1.0)


def test_nonzero_parameters_counts_by_hand() -> None:
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]]))
        layer.bias.copy_(torch.tensor([0.0, 5.0]))
    assert nonzero_parameters(layer) == 4


def test_calibration_reader_yields_each_image_once_then_rewinds() -> None:
    images = np.arange(3 * 4, dtype=np.float32).reshape(3, 1, 2, 2)
    reader = ImageCalibrationReader(images, "image")
    batches = [reader.get_next() for _ in range(4)]
    assert batches[3] is None
    assert [b["image"].shape for b in batches[:3]] == [(1, 1, 2, 2)] * 3
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["image"][0], images[0])


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, object, np.ndarray, np.ndarray, nn.Module]:
    catalog = load_catalog("synthetic", None, TASK, options={"n-images": 16, "image-size": 40})
    cached = build_cache(catalog, SIZE, tmp_path_factory.mktemp("cache"))
    data = CxrDataset(cached, np.arange(len(cached)))
    images = torch.stack([data[i][0] for i in range(len(data))]).numpy()
    targets = cached.catalog.targets
    torch.manual_seed(0)
    teacher = build_model(ModelConfig(name="tiny-cnn"), TASK.num_classes).eval()
    student = build_model(ModelConfig(name="mobilenetv2", width_mult=0.35), TASK.num_classes).eval()
    rows, settings = compare_compression(
        teacher,
        student,
        TASK,
        images[:12],
        targets[:12],
        images[12:],
        tmp_path_factory.mktemp("work"),
        image_size=SIZE,
        repeats=3,
        warmup=1,
    )
    return rows, settings, images, targets, teacher


def test_every_row_is_present_with_numbers(table: tuple) -> None:
    rows, settings, *_ = table
    assert [r.name for r in rows] == NAMES
    for r in rows:
        assert min(r.size_mb, r.parameters, r.latency_ms) > 0, r
        assert 0.0 <= r.accuracy <= 1.0, r
        assert math.isnan(r.auroc_macro) or 0.0 <= r.auroc_macro <= 1.0, r
    by = {r.name: r for r in rows}
    assert by["student-int8-dynamic"].size_mb < by["student-kd"].size_mb / 2
    assert by["student-int8-static"].size_mb < by["student-kd"].size_mb / 2
    assert by["teacher-pruned-80"].parameters < by["teacher-pruned-50"].parameters < by["teacher"].parameters
    for name in ("teacher-pruned-50", "teacher-pruned-80"):
        assert by[name].size_mb == pytest.approx(by[name].parameters * BYTES_PER_PARAMETER / 1e6)
        assert by[name].size_basis.startswith("non-zero")
    assert settings.test_images == 12
    assert settings.calibration_images == 4


def test_teacher_metrics_match_pytorch(table: tuple) -> None:
    rows, _, images, targets, teacher = table
    with torch.no_grad():
        probs = torch.softmax(teacher(torch.from_numpy(images[:12])), dim=1).numpy()
    expected = compute_metrics(TASK, targets[:12], probs)
    row = rows[0]
    assert row.accuracy == pytest.approx(expected.accuracy)
    assert row.auroc_macro == pytest.approx(expected.auroc_macro, abs=1e-6)


def test_report_files(table: tuple, tmp_path: Path) -> None:
    rows, settings, *_ = table
    md, js = write_compression_report(rows, settings, tmp_path, title="site_a")
    text = md.read_text()
    for name in NAMES:
        assert f"| {name} |" in text
    assert "non-zero parameters x 4 bytes" in text
    assert "32 px" in text
    payload = json.loads(js.read_text())
    assert [r["name"] for r in payload["rows"]] == NAMES
    assert payload["settings"]["image_size"] == SIZE
    assert rows_to_markdown(rows, settings).count("\n| ") == len(NAMES) + 1
