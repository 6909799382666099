"""Consistent distillation: the teacher sees the student's view, mixing, schedule, best-epoch choice,
and the site's BatchNorm re-estimation of a federated teacher."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.config import DistillConfig, ModelConfig
from common.distillation import (
    IndexedDataset,
    distill_one_epoch,
    mix_batch,
    recalibrate_batchnorm,
    warmup_cosine,
)
from common.errors import ConfigError
from common.local import BestStudent, DataRequest, distill_student, fidelity, load_site_data
from common.metrics import compute_metrics
from common.tasks import Task, get_task
from common.training import EvalResult

TASK = Task("toy-kd", "multiclass", ("a", "b", "c"))


class Spy(nn.Module):
    """A tiny classifier that records every batch it is asked to score."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.net(x)


def _loader(n: int = 24) -> DataLoader:
    g = torch.Generator().manual_seed(5)
    images = torch.rand((n, 1, 8, 8), generator=g)
    targets = F.one_hot(torch.arange(n) % 3, 3).float()
    return DataLoader(TensorDataset(images, targets), batch_size=8, shuffle=True, generator=g)


class KD:
    temperature = 2.0
    alpha = 0.8


@pytest.mark.parametrize("mix", ["none", "mixup", "cutmix"])
def test_live_teacher_scores_exactly_the_view_the_student_trains_on(mix: str) -> None:
    torch.manual_seed(0)
    teacher, student = Spy(), Spy()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)

    distill_one_epoch(
        student,
        teacher,
        _loader(),
        TASK,
        optimizer,
        KD(),
        mix=mix,
        mix_alpha=1.0,
        generator=torch.Generator().manual_seed(1),
    )

    assert len(teacher.seen) == len(student.seen) == 3
    for seen_by_teacher, seen_by_student in zip(teacher.seen, student.seen, strict=True):
        assert torch.equal(seen_by_teacher, seen_by_student)
    originals = torch.cat([b[0] for b in _loader()])
    if mix != "none":  # the views really are mixed: most are none of the original images
        mixed = torch.cat(student.seen)
        new_views = sum(not any(torch.equal(m, o) for o in originals) for m in mixed)
        assert new_views > len(mixed) // 2


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixed_targets_carry_each_image_in_the_proportion_it_was_mixed(mode: str) -> None:
    n = 6  # image i is the constant i; its label is class i, so label weights must match pixels
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 16, 16).contiguous()
    targets = torch.eye(n)

    for seed in range(5):
        mixed, mixed_targets = mix_batch(images, targets, mode, 1.0, torch.Generator().manual_seed(seed))
        assert mixed_targets is not None
        torch.testing.assert_close(mixed_targets.sum(dim=1), torch.ones(n))
        expected = mixed_targets @ torch.arange(n, dtype=torch.float32)
        torch.testing.assert_close(mixed.mean(dim=(1, 2, 3)), expected, rtol=1e-5, atol=1e-5)


def test_mixing_refuses_cached_teacher_logits() -> None:
    loader = DataLoader(IndexedDataset(_loader().dataset), batch_size=8)
    optimizer = torch.optim.SGD(Spy().parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="kd-mix"):
        distill_one_epoch(Spy(), torch.zeros(24, 3), loader, TASK, optimizer, KD(), mix="mixup")
    with pytest.raises(ConfigError, match="kd-mix"):
        DistillConfig(mix="mixup", cache_teacher_logits=True)
    with pytest.raises(ConfigError, match="kd-mix"):
        DistillConfig(mix="shuffle")


def test_soft_label_cross_entropy_matches_the_usual_one_for_one_hot_targets() -> None:
    from common.distillation import kd_loss

    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]])
    labels = torch.tensor([1, 2])
    loss = kd_loss(logits, logits, F.one_hot(labels, 3).float(), temperature=2.0, alpha=0.0)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    schedule = warmup_cosine(optimizer, total_steps=10, warmup_steps=2)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()

    assert rates[0] < rates[1] < rates[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(rates[2:]))
    assert rates[-1] < 0.05


def test_a_schedule_run_in_parts_is_the_one_schedule() -> None:
    """A federated student's rounds each train one part: together they warm up once, decay once."""

    def rates(total: int, warmup: int, parts: int) -> list[float]:
        seen = []
        for part in range(parts):
            optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)  # a fresh one per round
            steps = total // parts
            schedule = warmup_cosine(optimizer, total, warmup, start_step=part * steps)
            for _ in range(steps):
                seen.append(optimizer.param_groups[0]["lr"])
                optimizer.step()
                schedule.step()
        return seen

    whole = rates(12, 3, 1)
    assert rates(12, 3, 4) == pytest.approx(whole)
    assert max(rates(12, 3, 4)[3:]) == pytest.approx(1.0)  # warmed up once: later rounds start high


def _result(auroc_scores: float) -> EvalResult:
    """A validation result whose macro-AUROC is ``auroc_scores`` (two classes, four images)."""
    task = Task("toy-bin", "multiclass", ("a", "b"))
    targets = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.float32).numpy()
    # positives ranked above negatives in a fraction ``auroc_scores`` of the 4 pairs
    right = round(auroc_scores * 4)
    p = [0.6, 0.6, 0.7, 0.7] if right == 4 else [0.6, 0.8, 0.7, 0.9] if right == 3 else [0.8, 0.9, 0.6, 0.7]
    scores = torch.tensor([[1 - v, v] for v in p]).numpy()
    return EvalResult(0.5, 4, compute_metrics(task, targets, scores), scores, targets)


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience() -> None:
    model = nn.Linear(1, 1, bias=False)
    best = BestStudent(patience=2)
    stops = []
    for epoch, auroc in enumerate([0.75, 1.0, 0.75, 0.0, 1.0]):
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        stops.append(best.update(epoch, model, _result(auroc)))
        if stops[-1]:
            break

    assert stops == [False, False, False, True]  # epochs 2 and 3 brought nothing
    best.restore(model)
    assert best.best_epoch == 1
    assert model.weight.item() == 1.0


def test_fidelity_is_highest_for_the_teacher_s_own_probabilities() -> None:
    teacher = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    close = np.array([[0.6, 0.3, 0.1], [0.2, 0.1, 0.7]])
    far = np.array([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1]])
    entropy = float(-(teacher * np.log(teacher)).sum(axis=1).mean())

    assert fidelity(teacher, teacher, multilabel=False) == pytest.approx(-entropy)
    assert fidelity(teacher, close, multilabel=False) > fidelity(teacher, far, multilabel=False)
    findings = np.array([[0.9, 0.1]])
    flipped = findings[:, ::-1]
    assert fidelity(findings, findings, multilabel=True) > fidelity(findings, flipped, multilabel=True)
    assert fidelity(teacher[:0], close[:0], multilabel=False) == -math.inf


def test_selection_by_fidelity_keeps_the_epoch_closest_to_the_teacher_not_the_best_auroc() -> None:
    model = nn.Linear(1, 1, bias=False)
    near_teacher = _result(0.75)
    by_auroc, by_fidelity = BestStudent(), BestStudent(teacher_scores=near_teacher.scores)
    for epoch, result in enumerate([near_teacher, _result(1.0)]):
        by_auroc.update(epoch, model, result)
        by_fidelity.update(epoch, model, result)

    assert by_auroc.best_epoch == 1
    assert by_fidelity.best_epoch == 0


def test_batchnorm_statistics_are_re_estimated_on_the_site_images() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 16, 3))
    model.eval()
    images = 3.0 + 2.0 * torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(images, torch.zeros(64, 3)), batch_size=16)
    with torch.no_grad():
        features = model[0](images)

    assert recalibrate_batchnorm(model, loader) == 1
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, features.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    assert not model.training
    assert recalibrate_batchnorm(nn.Sequential(nn.Linear(2, 2)), loader) == 0


def test_site_distillation_keeps_its_best_validation_student(tmp_path) -> None:
    task = get_task("normal-pneumonia-covid")
    request = DataRequest(
        "synthetic", None, task, 32, tmp_path / "cache", 0.25, 0.25, 0, options=(("n-images", 48),)
    )
    data = load_site_data(request)
    teacher = ModelConfig(name="tiny-cnn", norm="batch")
    torch.manual_seed(0)
    from common.local import build_loaded_model

    teacher_state = build_loaded_model(teacher, task, None).state_dict()
    config = DistillConfig(student="tiny-cnn", epochs=3, batch_size=8, lr=0.01, optimizer="adam")

    outcome = distill_student(data, task, teacher, teacher_state, config, norm="batch", seed=0)

    m = outcome.metrics
    assert 1 <= m["student_best_epoch"] <= 3
    assert m["student_epochs_run"] == 3
    assert "teacher_site_bn_auroc_macro" in m
    assert "teacher_auroc_macro" in m
    assert math.isfinite(m["student_auroc_macro"])


def test_the_global_student_is_delivered_unless_the_local_fine_tune_beats_it() -> None:
    from common.local import choose_delivered_student

    better = choose_delivered_student(_result(0.75), _result(1.0))
    tie = choose_delivered_student(_result(1.0), _result(1.0))
    worse = choose_delivered_student(_result(1.0), _result(0.75))
    none = choose_delivered_student(_result(1.0), None)

    assert better.choice == "personalised"
    assert "1.0000 > 0.7500" in better.reason
    assert (tie.choice, worse.choice, none.choice) == ("global", "global", "global")
    assert "did not beat" in worse.reason
