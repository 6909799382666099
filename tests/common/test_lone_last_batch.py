"""An epoch that would end on a batch of one image drops it: BatchNorm cannot train on one image
whose feature maps are 1x1 (a ResNet18 at 32 px)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from common.config import DistillConfig, ModelConfig, TrainConfig
from common.local import DataRequest, distill_student, load_site_data, lone_last_batch, train_round
from common.tasks import get_task

TASK = get_task("normal-pneumonia-covid")
RESNET = ModelConfig(name="resnet18", norm="batch")


@pytest.fixture
def site(tmp_path: Path):  # type: ignore[no-untyped-def]
    request = DataRequest(
        "synthetic", None, TASK, 32, tmp_path / "cache", 0.0, 0.0, 0, options=(("n-images", 9),)
    )
    return load_site_data(request)


def test_only_a_last_batch_of_one_image_is_dropped() -> None:
    assert lone_last_batch(9, 8)
    assert lone_last_batch(17, 4)
    assert not lone_last_batch(8, 8)
    assert not lone_last_batch(10, 8)
    assert not lone_last_batch(1, 8)  # a single image is all there is: kept (and BatchNorm says why)


def test_a_batchnorm_resnet_trains_at_32_px_when_the_epoch_leaves_one_image_over(site) -> None:  # type: ignore[no-untyped-def]
    assert len(site.split.train) == 9
    outcome = train_round(site, TASK, RESNET, None, TrainConfig(batch_size=8, num_threads=1), seed=0)
    assert math.isfinite(outcome.metrics["loss"])


def test_a_student_distils_at_32_px_when_the_epoch_leaves_one_image_over(site) -> None:  # type: ignore[no-untyped-def]
    distill = DistillConfig(epochs=1, batch_size=8, width_mult=0.35, select_best=False)
    outcome = distill_student(site, TASK, RESNET, None, distill, norm="batch", seed=0, num_threads=1)  # type: ignore[arg-type]
    assert outcome.student is not None
