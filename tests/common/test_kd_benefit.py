"""Knowledge distillation helps where a site's own labels mislead: a task built for it.

The site's training labels are systematically wrong for one class (60 % of its images are
labelled as another class, as when one hospital codes a finding differently), while the
teacher learnt the task from clean labels elsewhere (as the federated teacher does from other
sites). A student trained on the site's labels alone learns the site's mistake; the student
distilled mostly from the teacher's soft targets (alpha 0.9) does not.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.config import DistillConfig
from common.distillation import distill_one_epoch
from common.metrics import compute_metrics
from common.tasks import get_task
from common.training import predict_scores, train_one_epoch

TASK = get_task("normal-pneumonia-covid")
POSITIONS = ((1, 1), (1, 5), (5, 3))  # bright 2x2 patch per class on an 8x8 image


def _images(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    labels = rng.integers(0, 3, size=n)
    images = rng.normal(0.0, 0.6, size=(n, 1, 8, 8)).astype(np.float32)
    for i, label in enumerate(labels):
        row, col = POSITIONS[label]
        images[i, 0, row : row + 2, col : col + 2] += 2.0
    return torch.from_numpy(images), labels


def _one_hot(labels: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(labels), 3).float()


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))


def _test_scores(model: nn.Module, images: torch.Tensor, labels: np.ndarray) -> tuple[float, float]:
    scores = predict_scores(model, DataLoader(images, batch_size=256), TASK)
    metrics = compute_metrics(TASK, _one_hot(labels).numpy(), scores)
    return metrics.accuracy, metrics.auroc_macro


def test_kd_student_beats_the_student_trained_on_misleading_site_labels() -> None:
    rng = np.random.default_rng(42)
    clean_images, clean_labels = _images(600, rng)
    site_images, site_labels = _images(240, rng)
    test_images, test_labels = _images(600, rng)
    misled = site_labels.copy()
    flip = (site_labels == 0) & (rng.random(len(site_labels)) < 0.6)
    misled[flip] = 1

    teacher = _model(0)
    teacher_opt = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9)
    clean_loader = DataLoader(
        TensorDataset(clean_images, _one_hot(clean_labels)),
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(2),
    )
    for _ in range(15):
        train_one_epoch(teacher, clean_loader, TASK, teacher_opt)
    teacher_accuracy, _ = _test_scores(teacher, test_images, test_labels)

    results = {}
    for name, alpha in (("kd", 0.9), ("no-kd", 0.0)):
        torch.manual_seed(1)
        student = _model(1)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
        loader = DataLoader(
            TensorDataset(site_images, _one_hot(misled)),
            batch_size=32,
            shuffle=True,
            generator=torch.Generator().manual_seed(3),
        )
        settings = DistillConfig(temperature=4.0, alpha=alpha)
        for _ in range(30):
            distill_one_epoch(student, teacher, loader, TASK, optimizer, settings)
        results[name] = _test_scores(student, test_images, test_labels)

    kd_accuracy, kd_auroc = results["kd"]
    plain_accuracy, plain_auroc = results["no-kd"]
    assert teacher_accuracy > 0.9
    assert kd_accuracy >= plain_accuracy + 0.1, results
    assert kd_auroc > plain_auroc, results
