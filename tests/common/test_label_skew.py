"""Local losses against label skew (run setting ``local-loss``, common/label_skew.py)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset
from typer.testing import CliRunner

import simulation.cli as cli
from common.config import ModelConfig, PrivacyConfig, TrainConfig
from common.errors import ConfigError
from common.label_skew import (
    ABSENT_CLASS_COUNT,
    FEDLC_TAU,
    FEDRS_ALPHA,
    check_local_loss,
    dataset_label_counts,
    logit_adjustment,
)
from common.local import DataRequest, load_site_data, site_logit_adjustment, train_round
from common.metrics import compute_metrics
from common.run_settings import check_run_config
from common.tasks import Task, get_task
from common.training import make_optimizer, task_loss, train_one_epoch

TASK = Task("toy-three", "multiclass", ("a", "b", "c"))
ML_TASK = Task("toy-ml", "multilabel", ("a", "b", "c"))
CORRECTIONS = ("balanced-softmax", "fedlc", "fedrs")


def _batch(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn((n, 3), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)  # classes 0 and 1 only: 2 is absent at the site
    return logits, F.one_hot(labels, 3).float()


def test_balanced_softmax_is_cross_entropy_on_logits_plus_log_prior() -> None:
    logits, targets = _batch()
    counts = np.array([60.0, 30.0, 10.0])
    adjustment = logit_adjustment("balanced-softmax", counts)

    loss, weight = task_loss(logits, targets, TASK, adjustment)

    prior = torch.tensor(counts / counts.sum(), dtype=torch.float32)
    expected = F.cross_entropy(logits + prior.log(), targets.argmax(dim=1))
    assert weight == 12
    assert torch.allclose(loss, expected, atol=1e-6)
    assert not torch.allclose(loss, task_loss(logits, targets, TASK)[0])  # it is a correction


def test_fedlc_and_fedrs_follow_their_papers() -> None:
    logits, targets = _batch()
    counts = np.array([81.0, 16.0, 0.0])
    labels = targets.argmax(dim=1)

    fedlc, _ = task_loss(logits, targets, TASK, logit_adjustment("fedlc", counts))
    calibrated = logits - FEDLC_TAU * torch.tensor([81**-0.25, 16**-0.25, ABSENT_CLASS_COUNT**-0.25])
    assert torch.allclose(fedlc, F.cross_entropy(calibrated, labels), atol=1e-6)

    fedrs, _ = task_loss(logits, targets, TASK, logit_adjustment("fedrs", counts))
    restricted = logits * torch.tensor([1.0, 1.0, FEDRS_ALPHA])  # only the missing class is scaled
    assert torch.allclose(fedrs, F.cross_entropy(restricted, labels), atol=1e-6)


@pytest.mark.parametrize("kind", CORRECTIONS)
def test_a_class_absent_at_the_site_gives_a_finite_loss_and_gradient(kind: str) -> None:
    logits, targets = _batch()
    logits.requires_grad_(True)
    adjustment = logit_adjustment(kind, [40, 8, 0])
    assert adjustment is not None
    assert torch.isfinite(adjustment.offset).all()
    assert torch.isfinite(adjustment.scale).all()

    loss, _ = task_loss(logits, targets, TASK, adjustment)
    loss.backward()

    assert math.isfinite(float(loss.detach()))
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()


def test_ce_is_no_correction_and_bad_counts_are_refused() -> None:
    assert logit_adjustment("ce", [5, 0, 1]) is None
    with pytest.raises(ConfigError, match="local-loss"):
        logit_adjustment("focal", [5, 0, 1])


def _skewed_blobs(counts: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping 2-D Gaussian blobs, one per class (centres 1.2 apart), ``counts[c]`` points each."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [1.2, 0.0], [0.0, 1.2]])
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    points = centres[labels] + torch.randn((len(labels), 2), generator=g)
    return points, F.one_hot(labels, 3).float()


def _train_linear(kind: str, points: torch.Tensor, targets: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Linear(2, 3)
    adjustment = logit_adjustment(kind, targets.sum(dim=0).numpy())
    loader = DataLoader(
        TensorDataset(points, targets),
        batch_size=220,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    optimizer = make_optimizer(model, TrainConfig(optimizer="adam", lr=0.05, weight_decay=0.0))
    for _ in range(15):
        train_one_epoch(model, loader, TASK, optimizer, adjustment=adjustment)
    return model


def test_on_a_skewed_site_balanced_softmax_keeps_every_class_where_ce_collapses() -> None:
    points, targets = _skewed_blobs((600, 30, 30), seed=0)
    test_points, test_targets = _skewed_blobs((300, 300, 300), seed=1)

    results = {}
    for kind in ("ce", "balanced-softmax"):
        model = _train_linear(kind, points, targets)
        with torch.no_grad():
            scores = torch.softmax(model(test_points), dim=1)
        predicted = scores.argmax(dim=1)
        results[kind] = (
            np.bincount(predicted.numpy(), minlength=3),
            compute_metrics(TASK, test_targets.numpy(), scores.numpy()).balanced_accuracy,
        )

    ce_counts, ce_balanced = results["ce"]
    bs_counts, bs_balanced = results["balanced-softmax"]
    assert ce_counts[0] > 0.9 * len(test_points)  # CE's argmax is (almost) always the majority class
    assert (bs_counts > 0.15 * len(test_points)).all()  # balanced softmax predicts every class
    assert bs_balanced > ce_balanced + 0.15


class _Labelled(Dataset[int]):
    def __init__(self, labels: list[int]) -> None:
        self.targets = F.one_hot(torch.tensor(labels), 3).float()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> int:
        return index


def test_counts_come_from_the_sites_train_split_and_pooled_unions() -> None:
    one, two = _Labelled([0, 0, 1]), _Labelled([0, 2])
    assert dataset_label_counts(one, 3).tolist() == [2, 1, 0]
    assert dataset_label_counts(ConcatDataset([one, two]), 3).tolist() == [3, 1, 1]


def test_a_site_under_its_own_dp_trains_with_ce_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    data = _Labelled([0, 0, 1])
    with caplog.at_level(logging.WARNING, logger="common.local"):
        assert site_logit_adjustment("fedlc", TASK, data, dp_enabled=True) is None
    assert "not used under DP-SGD" in caplog.text
    assert site_logit_adjustment("fedlc", TASK, data, dp_enabled=False) is not None


def test_the_dp_optimizer_refuses_a_correction() -> None:
    from opacus.optimizers import DPOptimizer

    model = nn.Linear(2, 3)
    optimizer = DPOptimizer(
        make_optimizer(model, TrainConfig()), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8
    )
    points, targets = _skewed_blobs((8, 4, 4), seed=0)
    with pytest.raises(ConfigError, match="local-loss"):
        train_one_epoch(
            model,
            DataLoader(TensorDataset(points, targets), batch_size=8),
            TASK,
            optimizer,
            adjustment=logit_adjustment("balanced-softmax", [8, 4, 4]),
        )


def test_multilabel_tasks_keep_bce() -> None:
    with pytest.raises(ConfigError, match="multi-label"):
        check_local_loss("balanced-softmax", ML_TASK, dp_enabled=False)
    logits, targets = _batch()
    with pytest.raises(ConfigError, match="local-loss"):
        task_loss(logits, targets, ML_TASK, logit_adjustment("fedrs", [3, 3, 0]))


@pytest.mark.parametrize("kind", ["ce", *CORRECTIONS])
def test_the_setting_takes_every_named_loss(kind: str) -> None:
    assert check_run_config({"local-loss": kind})["local-loss"] == kind


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"local-loss": "focal"}, "one of ce, balanced-softmax, fedlc, fedrs"),
        ({"local-loss": "fedlc", "dp-enabled": True, "teacher-norm": "group"}, "DP-SGD"),
        ({"local-loss": "balanced-softmax", "task": "nih14"}, "multi-label"),
    ],
)
def test_the_setting_is_checked_before_work(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match="local-loss") as info:
        check_run_config(overrides)
    assert message in str(info.value)
    assert check_run_config({**overrides, "local-loss": "ce"})  # "ce" is always allowed


def test_simulation_refuses_an_unknown_local_loss_in_one_line_with_exit_2() -> None:
    result = CliRunner().invoke(cli.app, ["run", "--set", "local-loss=focal"])
    assert result.exit_code == 2, result.output
    assert "local-loss" in result.output
    assert "Traceback" not in result.output


@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")
@pytest.mark.parametrize("dp", [False, True])
def test_train_round_corrects_without_dp_and_falls_back_to_ce_under_dp(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, dp: bool
) -> None:
    task = get_task("normal-pneumonia-covid")
    site = load_site_data(
        DataRequest("synthetic", None, task, 32, tmp_path / "cache", 0.0, 0.0, 0, options=(("n-images", 24),))
    )
    tiny = ModelConfig(name="tiny-cnn", norm="group")
    privacy = PrivacyConfig(enabled=True, target_epsilon=50.0, max_physical_batch_size=8) if dp else None
    train = TrainConfig(batch_size=8, lr=0.1, num_threads=1, local_loss="balanced-softmax")

    with caplog.at_level(logging.INFO, logger="common.local"):
        outcome = train_round(site, task, tiny, None, train, seed=1, privacy=privacy, num_rounds=1)

    assert math.isfinite(outcome.metrics["loss"])
    if dp:
        assert "not used under DP-SGD" in caplog.text
        assert outcome.metrics["dp_epsilon"] > 0
    else:
        assert "local loss: balanced-softmax" in caplog.text
