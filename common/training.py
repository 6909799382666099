"""Local training and evaluation loops shared by sites, the pooled baseline and simulation.

Batch convention: a loader yields ``(images, targets)`` or ``(images, targets, extra)``, where
``images`` is a float tensor ``[B, C, H, W]`` and ``targets`` a float tensor ``[B, num_classes]``
(one-hot for multi-class, 1 / 0 / NaN for multi-label; see :mod:`common.tasks`). A third
element (dataset indices, used by distillation) is ignored here.

Losses: cross-entropy on the class index for multi-class tasks; binary cross-entropy with logits
averaged over the *known* labels for multi-label tasks (NaN labels are masked; a batch with no
known label, or an empty batch, gives a zero loss that still back-propagates, so the optimizer
step (and, under DP-SGD, its noise) happens as usual and no NaN appears).

FedProx adds ``mu / 2 * ||w - w_global||^2`` to the loss (``global_params`` snapshotted with
:func:`snapshot_params` before local training). FedProx and DP-SGD are **not combined**: Opacus
builds each update from per-sample gradients of the model's forward pass, so the proximal
gradient (which does not pass through the model's layers) would be silently dropped;
:func:`train_one_epoch` raises :class:`~common.errors.ConfigError` for ``proximal-mu`` > 0 with
an Opacus optimizer. The loops only call ``model(x)``, ``loss.backward()``, ``optimizer.step()``
and ``optimizer.zero_grad()``, so Opacus-wrapped models and optimizers work unchanged.

The loops never print; pass ``progress=`` (see :mod:`common.progress`) to show bars.
Scores and targets returned by :func:`evaluate` are raw per-image outputs: they must never leave
a site; callers send only :meth:`common.metrics.Metrics.scalars`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.config import TrainConfig
from common.device import autocast
from common.errors import ConfigError, DataError, ModelError
from common.label_skew import LogitAdjustment
from common.metrics import Metrics, compute_metrics
from common.progress import ProgressArg, reporter_for
from common.tasks import Task

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelError("the model has no trainable parameters; unfreeze at least one layer to train.")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ConfigError("optimizer", cfg.optimizer, "one of sgd, adam, adamw")


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(images, targets or None, extra or None)`` from a batch in the loader convention."""
    if isinstance(batch, Tensor):
        return batch, None, None
    if isinstance(batch, Sequence) and 1 <= len(batch) <= 3:
        images = batch[0]
        targets = batch[1] if len(batch) > 1 else None
        extra = batch[2] if len(batch) > 2 else None
        return images, targets, extra
    raise DataError(
        f"a batch must be (images, targets) or (images, targets, extra); got {type(batch).__name__} "
        f"of length {len(batch) if isinstance(batch, Sequence) else '?'}."
    )


def check_targets(task: Task, logits: Tensor, targets: Tensor) -> None:
    if targets.ndim != 2 or targets.shape[1] != task.num_classes:
        raise DataError(
            f"targets of shape {tuple(targets.shape)} do not fit task '{task.name}' "
            f"({task.num_classes} classes); the loader must yield [B, {task.num_classes}] label vectors."
        )
    if logits.shape != targets.shape:
        raise ModelError(
            f"the model outputs shape {tuple(logits.shape)} but targets have shape {tuple(targets.shape)}; "
            f"build the model with num_outputs={task.num_classes} for task '{task.name}'."
        )


def masked_bce_with_logits(logits: Tensor, targets: Tensor) -> tuple[Tensor, int]:
    """Mean BCE-with-logits over the entries whose target is not NaN, and how many there were.

    With no known entry the loss is ``0 * logits.sum()`` (zero, finite, still in the graph).
    """
    mask = ~torch.isnan(targets)
    count = int(mask.sum())
    if count == 0:
        return logits.sum() * 0.0, 0
    filled = torch.nan_to_num(targets, nan=0.0)
    per_entry = F.binary_cross_entropy_with_logits(logits, filled, reduction="none")
    return (per_entry * mask).sum() / count, count


def task_loss(
    logits: Tensor, targets: Tensor, task: Task, adjustment: LogitAdjustment | None = None
) -> tuple[Tensor, int]:
    """The task's loss (mean) and its weight (examples, or known labels for multi-label).

    ``adjustment``: a label-skew correction of the logits before the cross-entropy (training of a
    single-label task only; common/label_skew.py)."""
    check_targets(task, logits, targets)
    if task.is_multilabel:
        if adjustment is not None:
            raise ConfigError("local-loss", adjustment.kind, f"\"ce\" for the multi-label task '{task.name}'")
        return masked_bce_with_logits(logits, targets)
    if targets.shape[0] == 0:
        return logits.sum() * 0.0, 0
    if torch.isnan(targets).any():
        raise DataError(f"multi-class targets of task '{task.name}' contain NaN; every image needs a label.")
    if adjustment is not None:
        logits = adjustment.apply(logits)
    return F.cross_entropy(logits, targets.argmax(dim=1)), int(targets.shape[0])


def scores_from_logits(logits: Tensor, task: Task) -> Tensor:
    """Probabilities: softmax over classes (multi-class) or a sigmoid per finding (multi-label)."""
    return torch.sigmoid(logits) if task.is_multilabel else torch.softmax(logits, dim=1)


def snapshot_params(model: nn.Module) -> list[Tensor]:
    """Detached copies of the model's parameters: the FedProx anchor ``w_global``."""
    return [p.detach().clone() for p in model.parameters()]


def proximal_term(model: nn.Module, global_params: Sequence[Tensor], mu: float) -> Tensor:
    """``mu / 2 * sum ||w - w_global||^2`` over the model's parameters (differentiable in w)."""
    params = list(model.parameters())
    if len(params) != len(global_params):
        raise ModelError(
            f"global_params has {len(global_params)} tensors but the model has {len(params)} parameters; "
            "snapshot them with snapshot_params(model) from the same architecture."
        )
    total = params[0].new_zeros(())
    for p, g in zip(params, global_params, strict=True):
        total = total + (p - g.to(p.device)).pow(2).sum()
    return 0.5 * mu * total


def _is_dp_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    from opacus.optimizers import DPOptimizer  # local import: opacus is slow to import

    return isinstance(optimizer, DPOptimizer)


def loader_length(loader: Iterable[Any], max_steps: int | None) -> int | None:
    try:
        total: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_steps is not None:
        total = max_steps if total is None else min(total, max_steps)
    return total


def check_epoch_options(
    optimizer: torch.optim.Optimizer,
    proximal_mu: float,
    global_params: Sequence[Tensor] | None,
    max_steps: int | None,
    scaler: torch.amp.GradScaler | None,
    adjustment: LogitAdjustment | None,
) -> None:
    """Refuse the options of :func:`train_one_epoch` that cannot go together (before any step)."""
    if adjustment is not None and _is_dp_optimizer(optimizer):
        raise ConfigError(
            "local-loss",
            adjustment.kind,
            '"ce" when DP-SGD is enabled: the correction is made from the site\'s class counts, which '
            "would enter every per-sample gradient",
        )
    if not (proximal_mu >= 0 and math.isfinite(proximal_mu)):
        raise ConfigError("proximal-mu", proximal_mu, "a finite number >= 0")
    if proximal_mu > 0:
        if global_params is None:
            raise ConfigError(
                "proximal-mu",
                proximal_mu,
                "0, or > 0 together with global_params = snapshot_params(model) taken before training",
            )
        if _is_dp_optimizer(optimizer):
            raise ConfigError(
                "proximal-mu",
                proximal_mu,
                "0 when DP-SGD is enabled: Opacus rebuilds each update from per-sample gradients of the "
                "forward pass, so the proximal gradient would be dropped; use proximal-mu = 0 with DP",
            )
    if max_steps is not None and max_steps < 1:
        raise ConfigError("max-steps", max_steps, "an integer >= 1, or None for the whole loader")
    if scaler is not None and _is_dp_optimizer(optimizer):
        raise ConfigError("amp", True, "false with DP-SGD (Opacus clips unscaled per-sample gradients)")


def backward_and_step(
    loss: Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> None:
    """Backward of ``loss`` and one optimiser step; with a ``scaler`` (mixed precision) the loss
    is scaled first and the step unscales (and skips a step with infinite gradients)."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def _optimizer_step(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    task: Task,
    optimizer: torch.optim.Optimizer,
    device: str | torch.device,
    scaler: torch.amp.GradScaler | None,
    adjustment: LogitAdjustment | None,
    proximal_mu: float,
    global_params: Sequence[Tensor] | None,
) -> tuple[Tensor, int, float]:
    """One forward/backward/update on a batch: the task loss, its weight and the proximal term."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, scaler is not None):
        logits = model(images)
        loss, weight = task_loss(logits.float(), targets, task, adjustment)
    total = loss
    prox_value = 0.0
    if proximal_mu > 0 and global_params is not None:
        prox = proximal_term(model, global_params, proximal_mu)
        total = total + prox
        prox_value = float(prox.detach())
    backward_and_step(total, optimizer, scaler)
    return loss, weight, prox_value


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Any],
    task: Task,
    optimizer: torch.optim.Optimizer,
    *,
    device: str | torch.device = "cpu",
    proximal_mu: float = 0.0,
    global_params: Sequence[Tensor] | None = None,
    progress: ProgressArg = None,
    max_steps: int | None = None,
    scaler: torch.amp.GradScaler | None = None,
    adjustment: LogitAdjustment | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` (or its first ``max_steps`` batches), updating ``model``.

    The model must already be on ``device``; batches are moved there. With a ``scaler``
    (CUDA only; see :mod:`common.device`) the forward pass runs under float16 autocast and the
    loss is scaled before backward (mixed precision); keep one scaler for all epochs. Returns
    ``loss`` (task loss, mean per example or per known label), ``proximal_term`` (mean over
    steps, 0 without FedProx), ``num_examples``, ``steps`` and ``images_per_s`` (wall clock,
    data loading included). ``adjustment``: the site's label-skew correction of the training
    logits (common/label_skew.py); refused with an Opacus optimizer (it would put the site's class
    counts into every per-sample gradient).
    """
    check_epoch_options(optimizer, proximal_mu, global_params, max_steps, scaler, adjustment)
    model.train()
    reporter = reporter_for(progress, "train", loader_length(loader, max_steps))
    loss_sum = 0.0
    loss_weight = 0
    prox_sum = 0.0
    examples = 0
    steps = 0
    start = time.perf_counter()
    try:
        for batch in loader:
            if max_steps is not None and steps >= max_steps:
                break
            images, targets, _ = split_batch(batch)
            if targets is None:
                raise DataError("training batches need targets: the loader must yield (images, targets).")
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, dtype=torch.float32, non_blocking=True)
            loss, weight, prox = _optimizer_step(
                model,
                images,
                targets,
                task,
                optimizer,
                device,
                scaler,
                adjustment,
                proximal_mu,
                global_params,
            )
            prox_sum += prox
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise ModelError(
                    f"training loss became {loss_value} at step {steps + 1}; lower the learning rate "
                    "(option 'lr') or check the inputs for NaN."
                )
            loss_sum += loss_value * weight
            loss_weight += weight
            examples += int(images.shape[0])
            steps += 1
            reporter.step(steps, examples, loss_sum / loss_weight if loss_weight else math.nan)
    finally:
        reporter.close()
    elapsed = time.perf_counter() - start
    return {
        "loss": loss_sum / loss_weight if loss_weight else math.nan,
        "proximal_term": prox_sum / steps if steps else 0.0,
        "num_examples": float(examples),
        "steps": float(steps),
        "images_per_s": examples / elapsed if elapsed > 0 else math.nan,
    }


@dataclass(frozen=True)
class EvalResult:
    """Outcome of :func:`evaluate`.

    ``scores`` and ``targets`` are per-image arrays ``[n, C]``: they stay at the site that
    computed them; only ``loss``, ``n`` and ``metrics.scalars()`` may be shared.
    """

    loss: float
    n: int
    metrics: Metrics
    scores: np.ndarray
    targets: np.ndarray


@torch.no_grad()
def _collect(
    model: nn.Module,
    loader: Iterable[Any],
    task: Task,
    device: str | torch.device,
    progress: ProgressArg,
    phase: str,
    need_targets: bool,
) -> tuple[np.ndarray, np.ndarray | None, float]:
    was_training = model.training
    model.eval()
    reporter = reporter_for(progress, phase, loader_length(loader, None))
    scores: list[np.ndarray] = []
    targets_out: list[np.ndarray] = []
    loss_sum = 0.0
    loss_weight = 0
    examples = 0
    try:
        for step, batch in enumerate(loader, start=1):
            images, targets, _ = split_batch(batch)
            logits = model(images.to(device)).float()
            if need_targets:
                if targets is None:
                    raise DataError("evaluation needs targets: the loader must yield (images, targets).")
                targets = targets.to(device, dtype=torch.float32)
                loss, weight = task_loss(logits, targets, task)
                loss_sum += float(loss) * weight
                loss_weight += weight
                targets_out.append(targets.cpu().numpy())
            scores.append(scores_from_logits(logits, task).cpu().numpy())
            examples += int(images.shape[0])
            reporter.step(step, examples, loss_sum / loss_weight if loss_weight else math.nan)
    finally:
        reporter.close()
        model.train(was_training)
    c = task.num_classes
    all_scores = np.concatenate(scores) if scores else np.zeros((0, c), dtype=np.float32)
    all_targets = None
    if need_targets:
        all_targets = np.concatenate(targets_out) if targets_out else np.zeros((0, c), dtype=np.float32)
    return all_scores, all_targets, (loss_sum / loss_weight if loss_weight else math.nan)


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    task: Task,
    *,
    device: str | torch.device = "cpu",
    progress: ProgressArg = None,
) -> EvalResult:
    """Loss and metrics of ``model`` on ``loader`` (eval mode, no gradients; mode restored after)."""
    scores, targets, loss = _collect(model, loader, task, device, progress, "evaluate", need_targets=True)
    if targets is None:  # pragma: no cover - need_targets=True always returns targets
        raise DataError("evaluation produced no targets")
    metrics = compute_metrics(task, targets, scores)
    return EvalResult(loss=loss, n=int(scores.shape[0]), metrics=metrics, scores=scores, targets=targets)


def predict_scores(
    model: nn.Module,
    loader: Iterable[Any],
    task: Task,
    *,
    device: str | torch.device = "cpu",
    progress: ProgressArg = None,
) -> np.ndarray:
    """Probabilities ``[N, C]`` (softmax or sigmoid) for every image of ``loader``, in order.

    Batches may be bare image tensors or tuples whose first element is the images.
    """
    scores, _, _ = _collect(model, loader, task, device, progress, "predict", need_targets=False)
    return scores
