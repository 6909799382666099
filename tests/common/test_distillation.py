"""Knowledge-distillation loss (hand-worked values, limits, masking) and the distillation epoch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.config import DistillConfig, ModelConfig
from common.distillation import IndexedDataset, compute_teacher_logits, distill_one_epoch, kd_loss
from common.errors import ConfigError, DataError
from common.models import build_model
from common.tasks import Task

TASK = Task("toy-kd", "multiclass", ("a", "b", "c"))
ML_TASK = Task("toy-kd-ml", "multilabel", ("x", "y", "z"))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]]
TEACHER = [[2.0, 1.0, 0.0], [0.5, 0.5, -1.0]]
LABELS = [1, 2]


def test_multiclass_kd_loss_matches_hand_computation() -> None:
    s, t = np.array(STUDENT), np.array(TEACHER)
    temperature, alpha = 2.0, 0.6
    p_t = _softmax(t / temperature)
    p_s = _softmax(s / temperature)
    kl_per_sample = (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=1)
    ce = -np.mean(np.log(_softmax(s)[np.arange(2), LABELS]))
    expected = alpha * temperature**2 * kl_per_sample.mean() + (1 - alpha) * ce

    loss = kd_loss(
        torch.tensor(STUDENT),
        torch.tensor(TEACHER),
        F.one_hot(torch.tensor(LABELS), 3).float(),
        temperature=temperature,
        alpha=alpha,
    )

    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_alpha_zero_is_cross_entropy_and_alpha_one_with_identical_logits_is_zero() -> None:
    student = torch.tensor(STUDENT)
    targets = F.one_hot(torch.tensor(LABELS), 3).float()
    ce = -np.mean(np.log(_softmax(np.array(STUDENT))[np.arange(2), LABELS]))

    hard_only = kd_loss(student, torch.tensor(TEACHER), targets, temperature=3.0, alpha=0.0)
    same = kd_loss(student, student.clone(), targets, temperature=3.0, alpha=1.0)
    same_ml = kd_loss(student, student.clone(), None, temperature=3.0, alpha=1.0, multilabel=True)

    assert hard_only.item() == pytest.approx(ce, rel=1e-6)
    assert same.item() == pytest.approx(0.0, abs=1e-7)
    assert same_ml.item() == pytest.approx(0.0, abs=1e-7)


def test_multilabel_kd_loss_matches_hand_computation_with_nan_masking() -> None:
    s, t = np.array(STUDENT), np.array(TEACHER)
    y = np.array([[1.0, np.nan, 0.0], [np.nan, np.nan, 1.0]])
    temperature, alpha = 2.0, 0.3
    q, p = _sigmoid(t / temperature), _sigmoid(s / temperature)
    bernoulli_kl = q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))
    known = ~np.isnan(y)
    ps = _sigmoid(s)
    bce = -(y * np.log(ps) + (1 - y) * np.log(1 - ps))
    expected = alpha * temperature**2 * bernoulli_kl.mean() + (1 - alpha) * bce[known].mean()

    loss = kd_loss(
        torch.tensor(STUDENT),
        torch.tensor(TEACHER),
        torch.tensor(y, dtype=torch.float32),
        temperature=temperature,
        alpha=alpha,
        multilabel=True,
    )

    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_multilabel_all_nan_labels_give_finite_soft_only_loss() -> None:
    student, teacher = torch.tensor(STUDENT), torch.tensor(TEACHER)
    all_nan = torch.full((2, 3), float("nan"))

    mixed = kd_loss(student, teacher, all_nan, temperature=2.0, alpha=0.5, multilabel=True)
    soft = kd_loss(student, teacher, None, temperature=2.0, alpha=1.0, multilabel=True)
    hard = kd_loss(student, teacher, all_nan, temperature=2.0, alpha=0.0, multilabel=True)

    assert math.isfinite(mixed.item())
    assert mixed.item() == pytest.approx(0.5 * soft.item(), rel=1e-6)
    assert hard.item() == 0.0


def test_gradient_flows_to_the_student_only() -> None:
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    targets = F.one_hot(torch.tensor(LABELS), 3).float()

    kd_loss(student, teacher, targets, temperature=4.0, alpha=0.7).backward()

    assert student.grad is not None
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan])
def test_bad_temperature_names_the_option(temperature: float) -> None:
    with pytest.raises(ConfigError, match="kd-temperature"):
        kd_loss(torch.zeros(1, 3), torch.zeros(1, 3), None, temperature=temperature, alpha=1.0)


@pytest.mark.parametrize("alpha", [-0.1, 1.1, math.nan])
def test_bad_alpha_names_the_option(alpha: float) -> None:
    with pytest.raises(ConfigError, match="kd-alpha"):
        kd_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.eye(3)[:1], temperature=2.0, alpha=alpha)


def test_labels_are_required_unless_alpha_is_one() -> None:
    with pytest.raises(ConfigError, match="kd-alpha"):
        kd_loss(torch.zeros(1, 3), torch.zeros(1, 3), None, temperature=2.0, alpha=0.5)


# --- distillation epochs ---------------------------------------------------------------------


class KD:
    """Stand-in for DistillConfig (only temperature and alpha are read)."""

    def __init__(self, temperature: float = 2.0, alpha: float = 0.8) -> None:
        self.temperature = temperature
        self.alpha = alpha


def _tiny(num_outputs: int = 3) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, num_outputs))


def _data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    images = torch.rand((n, 1, 8, 8), generator=g)
    return images, F.one_hot(torch.arange(n) % 3, 3).float()


def _loader(dataset: torch.utils.data.Dataset, shuffle: bool, batch_size: int = 8) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(3)
    )


def test_live_teacher_is_not_updated_and_student_moves_towards_it() -> None:
    images, targets = _data()
    torch.manual_seed(1)
    teacher = _tiny()
    teacher.train()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = _tiny()
    optimizer = torch.optim.Adam(student.parameters(), lr=0.01)
    loader = _loader(TensorDataset(images, targets), shuffle=True)

    def disagreement() -> float:
        with torch.no_grad():
            return F.kl_div(
                F.log_softmax(student(images), 1),
                F.log_softmax(teacher(images), 1),
                reduction="batchmean",
                log_target=True,
            ).item()

    start = disagreement()
    stats = [distill_one_epoch(student, teacher, loader, TASK, optimizer, KD(alpha=1.0)) for _ in range(5)]

    assert disagreement() < start / 2
    assert stats[-1]["loss"] < stats[0]["loss"]
    assert stats[0]["num_examples"] == 40
    assert teacher.training  # mode restored
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key])
    assert all(p.grad is None for p in teacher.parameters())


def test_cached_logits_give_the_same_student_as_a_live_teacher() -> None:
    images, targets = _data()
    torch.manual_seed(2)
    teacher = _tiny()
    init = _tiny()
    dataset = IndexedDataset(TensorDataset(images, targets))

    cache = compute_teacher_logits(teacher, _loader(dataset, shuffle=True), len(dataset))
    with torch.no_grad():
        np.testing.assert_allclose(cache.numpy(), teacher(images).numpy(), rtol=1e-5, atol=1e-6)

    students = []
    for source in (teacher, cache):
        student = _tiny()
        student.load_state_dict(init.state_dict())
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
        distill_one_epoch(student, source, _loader(dataset, shuffle=True), TASK, optimizer, KD())
        students.append(student)

    for a, b in zip(students[0].parameters(), students[1].parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_cached_logits_need_indexed_batches() -> None:
    images, targets = _data(8)
    student = _tiny()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    cache = torch.zeros(8, 3)

    with pytest.raises(DataError, match="IndexedDataset"):
        distill_one_epoch(
            student, cache, _loader(TensorDataset(images, targets), False), TASK, optimizer, KD()
        )


def test_teacher_logit_cache_must_cover_every_item() -> None:
    images, targets = _data(10)
    dataset = IndexedDataset(TensorDataset(images, targets))
    loader = DataLoader(dataset, batch_size=4, drop_last=True)

    with pytest.raises(DataError, match="8 of 10"):
        compute_teacher_logits(_tiny(), loader, len(dataset))


def test_multilabel_distillation_with_nan_labels_is_finite() -> None:
    images, _ = _data(16)
    labels = (torch.rand(16, 3) < 0.5).float()
    labels[:8] = float("nan")
    student, teacher = _tiny(), _tiny()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)

    stats = distill_one_epoch(
        student, teacher, _loader(TensorDataset(images, labels), False), ML_TASK, optimizer, KD(alpha=0.5)
    )

    assert math.isfinite(stats["loss"])
    assert stats["steps"] == 2


def test_accepts_a_real_distill_config_and_registry_models() -> None:
    config = ModelConfig(name="tiny-cnn", norm="group")
    teacher, student = build_model(config, 3), build_model(config, 3)
    g = torch.Generator().manual_seed(4)
    images = torch.rand((8, 1, 32, 32), generator=g)
    targets = F.one_hot(torch.arange(8) % 3, 3).float()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)

    stats = distill_one_epoch(
        student,
        teacher,
        _loader(TensorDataset(images, targets), False, batch_size=4),
        TASK,
        optimizer,
        DistillConfig(student="tiny-cnn", temperature=3.0, alpha=0.5),
    )

    assert math.isfinite(stats["loss"])
    assert stats["num_examples"] == 8
