"""The students' start distilled at the coordinator on public images (common/public_distillation.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from common.local import initial_teacher_state
from common.public_distillation import distill_on_public_images, public_images, top_class_agreement
from common.run_settings import run_settings_from_config
from common.tasks import get_task
from tests.common.data.helpers import write_csv, write_image
from tests.helpers import flower_run_config

CLASSES = ("normal", "pneumonia", "covid-19")


def _public_manifest(folder: Path, labels: list[str]) -> Path:
    rows = []
    for i, label in enumerate(labels):
        write_image(folder / f"img{i}.png", seed=i, size=(40, 40))
        rows.append((f"img{i}.png", label, f"p{i}"))
    return write_csv(folder / "public.csv", ("path", "label", "patient_id"), rows)


def _settings(tmp_path: Path, manifest: Path) -> object:
    return run_settings_from_config(
        flower_run_config(
            teacher_name="tiny-cnn",
            image_size=32,
            kd_width_mult=0.35,
            kd_public_manifest=str(manifest),
            kd_public_epochs=1,
            cache_dir=str(tmp_path / "cache"),
        )
    )


def _distil(tmp_path: Path, labels: list[str]) -> tuple[dict[str, torch.Tensor], float, int]:
    settings = _settings(tmp_path, _public_manifest(tmp_path / "public", labels))
    teacher = initial_teacher_state(settings.teacher, settings.task, seed=3)
    images = public_images(settings, tmp_path / "cache")
    student = distill_on_public_images(settings, teacher, images, num_threads=1)
    return student.state, student.agreement, student.images


def test_the_public_images_labels_are_never_used(tmp_path: Path) -> None:
    labels = [CLASSES[i % 3] for i in range(20)]
    state, agreement, images = _distil(tmp_path / "a", labels)
    relabelled, same_agreement, _ = _distil(tmp_path / "b", ["covid-19"] * 20)

    assert 0 < images < 20  # about a tenth of the 20 patients held out for the agreement
    assert 0.0 <= agreement <= 1.0
    assert agreement == same_agreement
    assert all(torch.equal(state[name], relabelled[name]) for name in state)
    # trained channels-last, sent in the standard layout (is_contiguous() would accept both)
    assert all(tensor.stride() == torch.empty(tensor.shape).stride() for tensor in state.values())


def test_the_manifest_must_be_an_absolute_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kd-public-manifest"):
        run_settings_from_config(flower_run_config(kd_public_manifest="public.csv"))
    with pytest.raises(ConfigError, match="kd-public-epochs"):
        run_settings_from_config(flower_run_config(kd_public_manifest="", kd_public_epochs=0))
    with pytest.raises(ConfigError, match="kd-public-batch-size"):
        run_settings_from_config(flower_run_config(kd_public_batch_size=-1))
    with pytest.raises(ConfigError, match="kd-public-lr"):
        run_settings_from_config(flower_run_config(kd_public_lr=-0.001))
    with pytest.raises(ConfigError, match="kd-select-metric"):
        run_settings_from_config(flower_run_config(kd_select_metric="accuracy"))


@pytest.mark.parametrize(("own", "used"), [((0, 0.0), (8, 0.01)), ((24, 0.003), (24, 0.003))])
def test_the_coordinator_distils_at_its_own_batch_size_and_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, own: tuple[int, float], used: tuple[int, float]
) -> None:
    from common import public_distillation

    seen: list[tuple[int, float]] = []

    def capture(*args: object, **kwargs: object) -> None:
        seen.append((args[4].batch_size, args[4].lr))  # type: ignore[attr-defined]
        raise RuntimeError("captured")

    monkeypatch.setattr(public_distillation, "distill_student", capture)
    settings = run_settings_from_config(
        flower_run_config(kd_batch_size=8, kd_lr=0.01, kd_public_batch_size=own[0], kd_public_lr=own[1])
    )
    with pytest.raises(RuntimeError, match="captured"):
        distill_on_public_images(settings, {}, None, num_threads=1)  # type: ignore[arg-type]
    assert seen == [used]


def test_agreement_counts_images_whose_top_class_is_the_same() -> None:
    teacher = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    student = np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1]])
    assert top_class_agreement(teacher, student) == 0.5
    assert np.isnan(top_class_agreement(teacher[:0], student[:0]))


@pytest.mark.parametrize("metric", ["auroc", "fidelity"])
@pytest.mark.parametrize("competes", [True, False])
def test_a_start_that_fine_tuning_makes_worse_is_kept_when_it_competes(
    tmp_path: Path, competes: bool, metric: str
) -> None:
    from common.config import DistillConfig, ModelConfig
    from common.local import DataRequest, distill_student, load_site_data, student_config
    from common.models import build_model

    task = get_task("normal-pneumonia-covid")
    site = load_site_data(
        DataRequest("synthetic", None, task, 32, tmp_path / "cache", 0.3, 0.2, 0, options=(("n-images", 60),))
    )
    teacher = ModelConfig(name="tiny-cnn", norm="batch")
    ruinous = DistillConfig(
        epochs=1, width_mult=0.35, lr=1e6, optimizer="sgd", warmup_epochs=0, select_metric=metric
    )
    start = build_model(student_config(ruinous, teacher, "batch"), task.num_classes).state_dict()

    outcome = distill_student(
        site,
        task,
        teacher,
        None,
        ruinous,
        norm="batch",
        seed=0,
        num_threads=1,  # type: ignore[arg-type]
        student_state=start,
        start_competes=competes,
    )

    kept = all(torch.equal(outcome.student.state_dict()[k], v) for k, v in start.items())
    assert kept is competes
    if competes:
        assert outcome.metrics["student_best_epoch"] == 0
