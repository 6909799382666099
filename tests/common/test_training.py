"""Training and evaluation loops on tiny synthetic tasks, FedProx, Opacus compatibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.checkpoint import unwrap_state_dict
from common.config import TrainConfig
from common.errors import ConfigError, DataError, ModelError
from common.metrics import compute_metrics
from common.progress import ProgressEvent
from common.tasks import Task
from common.training import (
    evaluate,
    make_optimizer,
    masked_bce_with_logits,
    predict_scores,
    proximal_term,
    seed_everything,
    snapshot_params,
    task_loss,
    train_one_epoch,
)

TASK = Task("toy-squares", "multiclass", ("top-left", "top-right", "bottom-left"))
ML_TASK = Task("toy-ml", "multilabel", ("a", "b", "c"))


class SmallCNN(nn.Module):
    """Conv, conv, flatten, linear: keeps position information (no global pooling), no norm layer."""

    def __init__(self, num_outputs: int, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8 * 4 * 4, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def square_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """16x16 noise images with a bright 5x5 square whose quadrant is the class (3 classes)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = 0.3 * torch.rand((n, 1, 16, 16), generator=g)
    corners = {0: (1, 1), 1: (1, 10), 2: (10, 1)}
    for i, label in enumerate(labels.tolist()):
        r, c = corners[label]
        dr, dc = torch.randint(0, 3, (2,), generator=g).tolist()
        images[i, 0, r + dr : r + dr + 5, c + dc : c + dc + 5] += 1.0
    return images, F.one_hot(labels, 3).float()


def loader_of(
    images: torch.Tensor, targets: torch.Tensor, batch_size: int = 16, shuffle: bool = True
) -> DataLoader:
    return DataLoader(
        TensorDataset(images, targets),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(0),
    )


def test_short_training_lowers_loss_and_beats_chance() -> None:
    images, targets = square_images(64)
    model = SmallCNN(3)
    train = loader_of(images, targets)
    test = loader_of(*square_images(48, seed=1), shuffle=False)
    before = evaluate(model, test, TASK)
    optimizer = make_optimizer(model, TrainConfig(optimizer="adam", lr=0.01, weight_decay=0.0))

    stats = [train_one_epoch(model, train, TASK, optimizer) for _ in range(6)]
    after = evaluate(model, test, TASK)

    assert stats[-1]["loss"] < stats[0]["loss"]
    assert after.loss < before.loss
    assert after.metrics.accuracy > 0.8  # chance is 1/3
    assert stats[0]["num_examples"] == 64
    assert stats[0]["steps"] == 4
    assert stats[0]["images_per_s"] > 0


def test_evaluate_metrics_equal_compute_metrics_on_the_same_predictions() -> None:
    images, targets = square_images(30, seed=2)
    model = SmallCNN(3)
    loader = loader_of(images, targets, batch_size=7, shuffle=False)

    result = evaluate(model, loader, TASK)
    scores = predict_scores(model, loader, TASK)

    np.testing.assert_allclose(result.scores, scores, rtol=1e-6)
    np.testing.assert_array_equal(result.targets, targets.numpy())
    np.testing.assert_equal(
        result.metrics.scalars(), compute_metrics(TASK, targets.numpy(), scores).scalars()
    )
    with torch.no_grad():
        expected_loss = F.cross_entropy(model(images), targets.argmax(1)).item()
    assert result.loss == pytest.approx(expected_loss, rel=1e-5)
    assert result.n == 30
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)


def test_evaluate_restores_training_mode_and_uses_eval_mode() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.9), nn.Linear(256, 3))
    loader = loader_of(*square_images(12), batch_size=12, shuffle=False)
    model.train()

    first = evaluate(model, loader, TASK).scores
    second = evaluate(model, loader, TASK).scores

    np.testing.assert_array_equal(first, second)  # dropout off during evaluation
    assert model.training


def test_multilabel_training_with_nan_labels_stays_finite() -> None:
    g = torch.Generator().manual_seed(3)
    images = torch.rand((32, 1, 16, 16), generator=g)
    labels = (torch.rand((32, 3), generator=g) < 0.4).float()
    labels[torch.rand((32, 3), generator=g) < 0.3] = float("nan")
    labels[:8] = float("nan")  # the first batch has no known label at all
    model = SmallCNN(3)
    optimizer = make_optimizer(model, TrainConfig(lr=0.05))
    loader = loader_of(images, labels, batch_size=8, shuffle=False)

    stats = train_one_epoch(model, loader, ML_TASK, optimizer)
    result = evaluate(model, loader, ML_TASK)

    assert math.isfinite(stats["loss"])
    assert math.isfinite(result.loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.metrics.kind == "multilabel"


def test_masked_bce_ignores_nan_labels_and_all_nan_is_zero_with_zero_grad() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]], requires_grad=True)
    targets = torch.tensor([[1.0, float("nan")], [0.0, float("nan")]])

    loss, count = masked_bce_with_logits(logits, targets)

    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(0.5))) / 2
    assert count == 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    all_nan = torch.full((2, 2), float("nan"))
    zero, count = masked_bce_with_logits(logits, all_nan)
    zero.backward()
    assert count == 0
    assert zero.item() == 0.0
    assert logits.grad is not None
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_task_loss_checks_shapes_and_labels() -> None:
    with pytest.raises(DataError, match="3 classes"):
        task_loss(torch.zeros(2, 3), torch.zeros(2, 2), TASK)
    with pytest.raises(ModelError, match="num_outputs=3"):
        task_loss(torch.zeros(2, 4), torch.zeros(2, 3), TASK)
    with pytest.raises(DataError, match="NaN"):
        task_loss(torch.zeros(1, 3), torch.tensor([[float("nan"), 1.0, 0.0]]), TASK)


def test_proximal_term_zero_at_global_and_positive_elsewhere() -> None:
    model = nn.Linear(3, 2)
    anchor = snapshot_params(model)

    assert proximal_term(model, anchor, mu=0.5).item() == 0.0

    with torch.no_grad():
        model.weight.add_(0.1)  # 6 weights moved by 0.1
        model.bias.sub_(0.2)  # 2 biases moved by 0.2
    expected = 0.5 * 0.5 * (6 * 0.1**2 + 2 * 0.2**2)
    assert proximal_term(model, anchor, mu=0.5).item() == pytest.approx(expected, rel=1e-5)


def test_fedprox_keeps_weights_closer_to_the_global_model() -> None:
    images, targets = square_images(48)

    def drift(mu: float) -> tuple[float, float]:
        torch.manual_seed(5)
        model = SmallCNN(3)
        anchor = snapshot_params(model)
        optimizer = make_optimizer(model, TrainConfig(lr=0.05, momentum=0.0, weight_decay=0.0))
        stats = train_one_epoch(
            model, loader_of(images, targets), TASK, optimizer, proximal_mu=mu, global_params=anchor
        )
        distance = sum((p - a).pow(2).sum().item() for p, a in zip(model.parameters(), anchor, strict=True))
        return distance, stats["proximal_term"]

    plain, plain_prox = drift(0.0)
    prox, prox_term = drift(5.0)

    assert prox < plain
    assert plain_prox == 0.0
    assert prox_term > 0.0


def test_fedprox_needs_global_params() -> None:
    model = SmallCNN(3)
    loader = loader_of(*square_images(8))
    with pytest.raises(ConfigError, match="proximal-mu"):
        train_one_epoch(model, loader, TASK, make_optimizer(model, TrainConfig()), proximal_mu=0.1)


def test_fedprox_with_dp_optimizer_is_refused() -> None:
    from opacus.optimizers import DPOptimizer

    model = SmallCNN(3)
    optimizer = DPOptimizer(
        make_optimizer(model, TrainConfig()), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8
    )
    with pytest.raises(ConfigError, match="DP-SGD"):
        train_one_epoch(
            model,
            loader_of(*square_images(8)),
            TASK,
            optimizer,
            proximal_mu=0.1,
            global_params=snapshot_params(model),
        )


@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")
def test_trains_an_opacus_wrapped_model() -> None:
    from opacus import PrivacyEngine

    images, targets = square_images(32)
    model = SmallCNN(3)
    optimizer = make_optimizer(model, TrainConfig(lr=0.05))
    engine = PrivacyEngine(accountant="rdp")
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader_of(images, targets, batch_size=8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    before = [p.detach().clone() for p in model.parameters()]

    stats = train_one_epoch(dp_model, dp_loader, TASK, dp_optimizer)
    result = evaluate(dp_model, loader_of(images, targets, shuffle=False), TASK)

    assert math.isfinite(stats["loss"])
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert engine.get_epsilon(delta=1e-5) > 0
    assert result.n == 32
    plain = SmallCNN(3)
    plain.load_state_dict(unwrap_state_dict(dp_model.state_dict()))


def test_max_steps_and_progress_callback() -> None:
    model = SmallCNN(3)
    events: list[ProgressEvent] = []

    stats = train_one_epoch(
        model,
        loader_of(*square_images(64), batch_size=8),
        TASK,
        make_optimizer(model, TrainConfig()),
        max_steps=3,
        progress=events.append,
    )

    assert stats["steps"] == 3
    assert stats["num_examples"] == 24
    assert [e.step for e in events] == [1, 2, 3]
    assert all(e.total == 3 and e.phase == "train" for e in events)
    assert events[-1].examples == 24


def test_rich_progress_gets_a_task_that_is_removed_at_the_end() -> None:
    from rich.progress import Progress

    model = SmallCNN(3)
    loader = loader_of(*square_images(16), batch_size=8, shuffle=False)
    with Progress(disable=True) as progress:
        result = evaluate(model, loader, TASK, progress=progress)
        assert progress.task_ids == []
    assert result.n == 16


def test_make_optimizer_follows_the_config() -> None:
    model = SmallCNN(3)

    sgd = make_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1, momentum=0.8, weight_decay=0.001))
    adamw = make_optimizer(model, TrainConfig(optimizer="adamw", lr=0.002))

    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.8
    assert sgd.param_groups[0]["weight_decay"] == 0.001
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["lr"] == 0.002


def test_seed_everything_makes_draws_repeatable() -> None:
    seed_everything(7)
    first = (torch.rand(3), np.random.rand(3))
    seed_everything(7)
    second = (torch.rand(3), np.random.rand(3))

    assert torch.equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_empty_batch_contributes_nothing() -> None:
    # Opacus' Poisson sampling can yield empty batches; they must not produce a NaN loss.
    model = SmallCNN(3)
    images, targets = square_images(8)
    batches = [(images[:0], targets[:0]), (images, targets)]

    stats = train_one_epoch(model, batches, TASK, make_optimizer(model, TrainConfig()))

    assert stats["steps"] == 2
    assert stats["num_examples"] == 8
    assert math.isfinite(stats["loss"])
