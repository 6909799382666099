"""Knowledge distillation of a student from a teacher (Hinton et al.), for both task kinds.

Loss (:func:`kd_loss`), with student logits ``s``, teacher logits ``t``, temperature ``T`` and
weight ``alpha``:

* multi-class: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``,
  the KL summed over classes and averaged over the batch ("batchmean").
* multi-label: each finding is a Bernoulli distribution, so the soft term is
  ``alpha * T^2 * mean_{i,k} KL(Bern(sigmoid(t_ik/T)) || Bern(sigmoid(s_ik/T)))``, averaged over
  all ``B x C`` entries (teacher soft targets exist for every finding, known label or not).
  This equals the mean BCE of ``sigmoid(s/T)`` against the soft targets ``sigmoid(t/T)`` minus
  the (student-independent) entropy of those soft targets: same gradients as that BCE, but zero
  when student and teacher agree. The hard term is ``(1 - alpha)`` times the BCE averaged over
  known (non-NaN) labels, as in :func:`common.training.masked_bce_with_logits`.

The teacher never receives gradients: its logits are detached, and a live teacher runs in eval
mode under ``torch.no_grad``.

Teacher sources for :func:`distill_one_epoch`:

* a live ``nn.Module``: the loader yields ``(images, targets)`` and the teacher sees the same
  (possibly augmented) images as the student;
* cached logits (a ``[N_dataset, C]`` tensor from :func:`compute_teacher_logits`): the loader
  yields ``(images, targets, indices)`` (wrap the dataset in :class:`IndexedDataset`) and the
  teacher's logits are looked up by dataset index. Compute the cache once, on an un-augmented
  (evaluation-transform) view of the *same* dataset, also wrapped in :class:`IndexedDataset`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import update_bn
from torch.utils.data import Dataset

from common.config import MIX_MODES
from common.device import autocast
from common.errors import ConfigError, DataError, ModelError
from common.progress import ProgressArg, reporter_for
from common.tasks import Task
from common.training import (
    backward_and_step,
    check_targets,
    loader_length,
    masked_bce_with_logits,
    split_batch,
)

logger = logging.getLogger(__name__)


class KDSettings(Protocol):
    """What distillation reads from its config (``common.config.DistillConfig`` fits)."""

    @property
    def temperature(self) -> float: ...

    @property
    def alpha(self) -> float: ...


def check_kd_settings(temperature: float, alpha: float) -> None:
    """Raise ConfigError naming ``kd-temperature`` / ``kd-alpha`` when a value is not allowed."""
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError("kd-temperature", temperature, "a finite number > 0 (typically 1 to 10)")
    if not (isinstance(alpha, int | float) and 0 <= alpha <= 1):
        raise ConfigError("kd-alpha", alpha, "a number in [0, 1] (weight of the teacher's soft targets)")


def _bernoulli_kl_with_logits(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Element-wise KL(Bern(sigmoid(t)) || Bern(sigmoid(s))), numerically stable via log-sigmoid."""
    q = torch.sigmoid(teacher_logits)
    log_q, log_1mq = F.logsigmoid(teacher_logits), F.logsigmoid(-teacher_logits)
    log_p, log_1mp = F.logsigmoid(student_logits), F.logsigmoid(-student_logits)
    return q * (log_q - log_p) + (1 - q) * (log_1mq - log_1mp)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None,
    *,
    temperature: float,
    alpha: float,
    multilabel: bool = False,
) -> Tensor:
    """The distillation loss of one batch (see the module docstring for the exact formulas).

    ``targets`` follow the label convention of :mod:`common.tasks`; they may be None only when
    ``alpha == 1`` (pure distillation, e.g. on unlabelled images).
    """
    check_kd_settings(temperature, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ModelError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ in shape; build both models with the same number of outputs."
        )
    teacher_logits = teacher_logits.detach().to(student_logits.dtype)
    batch = student_logits.shape[0]
    zero = student_logits.sum() * 0.0
    if batch == 0:
        return zero
    t = float(temperature)
    soft = zero
    if alpha > 0:
        if multilabel:
            soft = _bernoulli_kl_with_logits(student_logits / t, teacher_logits / t).mean()
        else:
            soft = F.kl_div(
                F.log_softmax(student_logits / t, dim=1),
                F.log_softmax(teacher_logits / t, dim=1),
                reduction="batchmean",
                log_target=True,
            )
        soft = soft * (t * t)
    hard = zero
    if alpha < 1:
        if targets is None:
            raise ConfigError("kd-alpha", alpha, "1 when no labels are given (targets=None)")
        targets = targets.to(student_logits.device, dtype=student_logits.dtype)
        if targets.shape != student_logits.shape:
            raise DataError(
                f"targets of shape {tuple(targets.shape)} do not match logits {tuple(student_logits.shape)}."
            )
        if multilabel:
            hard, _ = masked_bce_with_logits(student_logits, targets)
        else:
            if torch.isnan(targets).any():
                raise DataError("multi-class targets contain NaN; every image needs a label.")
            # cross-entropy against the target distribution: the usual CE for one-hot labels,
            # and the exact mixup/cutmix loss for mixed labels
            hard = -(targets * F.log_softmax(student_logits, dim=1)).sum(dim=1).mean()
    return alpha * soft + (1 - alpha) * hard


def mix_batch(
    images: Tensor, targets: Tensor | None, mode: str, alpha: float, generator: torch.Generator
) -> tuple[Tensor, Tensor | None]:
    """Mix a batch with a shuffled copy of itself (mixup or cutmix); targets mix in the same ratio.

    ``lam ~ Beta(alpha, alpha)``. mixup blends whole images, ``lam * x + (1 - lam) * x[perm]``;
    cutmix pastes a box of ``x[perm]`` covering ``1 - lam`` of the image (``lam`` is then the
    exact uncovered fraction). Targets become ``lam * y + (1 - lam) * y[perm]``; an unknown
    multi-label entry (NaN) stays unknown. With a live teacher, the teacher then scores exactly
    the mixed images the student sees (Beyer et al. 2022, "function matching").
    """
    if mode == "none" or images.shape[0] < 2:
        return images, targets
    if mode not in MIX_MODES:
        raise ConfigError("kd-mix", mode, "one of " + ", ".join(MIX_MODES))
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError("kd-mix-alpha", alpha, "a number > 0 (Beta distribution parameter)")
    lam = _beta(alpha, generator)
    perm = torch.randperm(images.shape[0], generator=generator).to(images.device)
    if mode == "mixup":
        mixed = lam * images + (1 - lam) * images[perm]
    else:
        height, width = images.shape[-2:]
        cut = math.sqrt(1 - lam)
        box_h, box_w = round(height * cut), round(width * cut)
        cy = int(torch.randint(height, (1,), generator=generator))
        cx = int(torch.randint(width, (1,), generator=generator))
        y0, y1 = max(cy - box_h // 2, 0), min(cy + (box_h + 1) // 2, height)
        x0, x1 = max(cx - box_w // 2, 0), min(cx + (box_w + 1) // 2, width)
        mixed = images.clone()
        mixed[..., y0:y1, x0:x1] = images[perm][..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)
    if targets is None:
        return mixed, None
    return mixed, lam * targets + (1 - lam) * targets[perm]


def _beta(alpha: float, generator: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha) from ``generator`` (Johnk's method, exact for any alpha).

    torch's Beta distribution takes no generator, and every random choice here must be seeded.
    """
    while True:
        u, v = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        x, y = u ** (1 / alpha), v ** (1 / alpha)
        if 0 < x + y <= 1:
            return x / (x + y)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, *, start_step: int = 0
) -> LambdaLR:
    """Per-step learning rate: linear warm-up to the base rate, then cosine decay towards zero.

    ``start_step`` resumes the schedule part-way: a federated student's round ``r`` of ``R``
    trains steps ``[(r - 1) * n, r * n)`` of one schedule of ``R * n`` steps, so the rounds
    together warm up once and decay once (instead of warming up again in every round).
    """
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps - 1)
    start_step = min(max(0, start_step), total_steps - 1)

    def factor(local_step: int) -> float:
        step = start_step + local_step
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


def recalibrate_batchnorm(
    model: nn.Module, loader: Iterable[Any], *, device: str | torch.device = "cpu"
) -> int:
    """Re-estimate every BatchNorm layer's running statistics on ``loader``'s images.

    A FedAvg teacher's running means and variances are averages of the sites' statistics; at a
    label-skewed site they describe neither the site's images nor any site's, which shifts the
    teacher's logits there (its ranking survives, its argmax does not). One pass over the
    site's own (un-augmented) training images, with cumulative averaging, replaces them; the
    learned weights are untouched. Returns the number of BatchNorm layers (0: nothing to do,
    e.g. a GroupNorm teacher). The model's train/eval mode is restored.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if layers:
        update_bn(loader, model, device=torch.device(device))
    return len(layers)


class IndexedDataset(Dataset[tuple[Any, Any, int]]):
    """Wrap a dataset of ``(image, target)`` so items become ``(image, target, index)``."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        image, target = self.dataset[index][:2]
        return image, target, index


def _indices_of(extra: Tensor | None, what: str) -> Tensor:
    if extra is None:
        raise DataError(
            f"{what} needs batches of (images, targets, indices); wrap the dataset in "
            "common.distillation.IndexedDataset."
        )
    indices = torch.as_tensor(extra)
    if indices.dtype.is_floating_point or indices.ndim != 1:
        raise DataError(f"{what}: the third batch element must be a 1-D integer tensor of dataset indices.")
    return indices.long()


@torch.no_grad()
def compute_teacher_logits(
    teacher: nn.Module,
    loader: Iterable[Any],
    num_items: int,
    *,
    device: str | torch.device = "cpu",
    progress: ProgressArg = None,
) -> Tensor:
    """Teacher logits ``[num_items, C]`` (float32, CPU), indexed by dataset position.

    ``loader`` yields ``(images, targets, indices)`` over an un-augmented view of the dataset
    (any order). Every index in ``range(num_items)`` must be seen exactly once.
    """
    was_training = teacher.training
    teacher.eval()
    reporter = reporter_for(progress, "teacher logits", loader_length(loader, None))
    cache: Tensor | None = None
    seen = torch.zeros(num_items, dtype=torch.bool)
    examples = 0
    try:
        for step, batch in enumerate(loader, start=1):
            images, _, extra = split_batch(batch)
            indices = _indices_of(extra, "compute_teacher_logits")
            logits = teacher(images.to(device)).float().cpu()
            if cache is None:
                cache = torch.zeros((num_items, logits.shape[1]), dtype=torch.float32)
            if indices.numel() and (indices.min() < 0 or indices.max() >= num_items):
                raise DataError(f"dataset index out of range [0, {num_items}) in the teacher-logit loader.")
            if seen[indices].any():
                raise DataError(
                    "the teacher-logit loader yielded an index twice; use no sampler or shuffling."
                )
            cache[indices] = logits
            seen[indices] = True
            examples += int(images.shape[0])
            reporter.step(step, examples)
    finally:
        reporter.close()
        teacher.train(was_training)
    if cache is None or not bool(seen.all()):
        missing = int((~seen).sum())
        raise DataError(
            f"the teacher-logit loader covered {num_items - missing} of {num_items} items; "
            "iterate the whole dataset once (no drop_last, no sampling)."
        )
    return cache


def _check_epoch_options(
    cfg: KDSettings,
    teacher_or_logits: nn.Module | Tensor | np.ndarray | None,
    max_steps: int | None,
    mix: str,
) -> None:
    """Refuse what :func:`distill_one_epoch` cannot do, before any step."""
    check_kd_settings(cfg.temperature, cfg.alpha)
    if max_steps is not None and max_steps < 1:
        raise ConfigError("max-steps", max_steps, "an integer >= 1, or None for the whole loader")
    if mix != "none" and teacher_or_logits is not None and not isinstance(teacher_or_logits, nn.Module):
        raise ConfigError(
            "kd-mix", mix, "none with kd-cache-teacher-logits = true (cached logits are of un-mixed images)"
        )


def _teacher_or_cache(
    teacher_or_logits: nn.Module | Tensor | np.ndarray | None, task: Task
) -> tuple[nn.Module | None, Tensor | None]:
    """The live teacher, or the cached logits table (checked against the task), or neither."""
    if teacher_or_logits is None:
        return None, None
    if isinstance(teacher_or_logits, nn.Module):
        return teacher_or_logits, None
    cache = torch.as_tensor(teacher_or_logits).detach().float().cpu()
    if cache.ndim != 2 or cache.shape[1] != task.num_classes:
        raise DataError(
            f"cached teacher logits have shape {tuple(cache.shape)}; task '{task.name}' needs "
            f"[num_items, {task.num_classes}]."
        )
    return None, cache


def _batch_teacher_logits(
    teacher: nn.Module | None,
    cache: Tensor | None,
    images: Tensor,
    extra: Tensor | None,
    device: str | torch.device,
    amp: bool,
) -> Tensor | None:
    """The teacher's logits of a batch: run live, looked up in the cache, or None (no KD)."""
    if teacher is not None:
        with torch.no_grad(), autocast(device, amp):
            return teacher(images).float()
    if cache is not None:
        indices = _indices_of(extra, "distillation from cached teacher logits")
        return cache[indices].to(device)
    return None


def _distill_step(
    student: nn.Module,
    teacher_logits: Tensor | None,
    images: Tensor,
    targets: Tensor | None,
    task: Task,
    optimizer: torch.optim.Optimizer,
    cfg: KDSettings,
    device: str | torch.device,
    scaler: torch.amp.GradScaler | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
) -> Tensor:
    """One optimiser step of the student on a batch; returns the (unscaled) loss."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, scaler is not None):
        student_logits = student(images)
    student_logits = student_logits.float()
    if targets is not None:
        check_targets(task, student_logits, targets)
    loss = kd_loss(
        student_logits,
        student_logits.detach() if teacher_logits is None else teacher_logits,
        targets,
        temperature=cfg.temperature,
        alpha=cfg.alpha if teacher_logits is not None else 0.0,
        multilabel=task.is_multilabel,
    )
    backward_and_step(loss, optimizer, scaler)
    if scheduler is not None:
        scheduler.step()
    return loss


def distill_one_epoch(
    student: nn.Module,
    teacher_or_logits: nn.Module | Tensor | np.ndarray | None,
    loader: Iterable[Any],
    task: Task,
    optimizer: torch.optim.Optimizer,
    cfg: KDSettings,
    *,
    device: str | torch.device = "cpu",
    progress: ProgressArg = None,
    max_steps: int | None = None,
    scaler: torch.amp.GradScaler | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    mix: str = "none",
    mix_alpha: float = 0.2,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One epoch of distillation of ``student`` (updated in place).

    With a ``scaler`` (CUDA only) both forward passes run under float16 autocast and the loss
    is scaled before backward (mixed precision); the KD loss itself is computed in float32.

    ``teacher_or_logits`` is a live teacher module, a cached logits table (see the module
    docstring for the loader each needs), or None: the same recipe on the labels alone (the
    no-KD student). ``mix`` (``mixup`` / ``cutmix``, :func:`mix_batch`) mixes each batch before
    both models see it, so a live teacher scores exactly the student's view; cached logits
    belong to un-mixed images and refuse mixing. ``scheduler`` steps after every optimiser
    step. Returns ``loss`` (mean loss per example), ``num_examples``, ``steps`` and
    ``images_per_s``.
    """
    _check_epoch_options(cfg, teacher_or_logits, max_steps, mix)
    mixing = mix != "none"
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    teacher, cache = _teacher_or_cache(teacher_or_logits, task)
    teacher_was_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.eval()
    student.train()
    reporter = reporter_for(progress, "distill", loader_length(loader, max_steps))
    loss_sum = 0.0
    examples = 0
    steps = 0
    start = time.perf_counter()
    try:
        for batch in loader:
            if max_steps is not None and steps >= max_steps:
                break
            images, targets, extra = split_batch(batch)
            images = images.to(device, non_blocking=True)
            if targets is not None:
                targets = targets.to(device, dtype=torch.float32)
            if mixing:
                images, targets = mix_batch(images, targets, mix, mix_alpha, generator)
            teacher_logits = _batch_teacher_logits(teacher, cache, images, extra, device, scaler is not None)
            loss = _distill_step(
                student, teacher_logits, images, targets, task, optimizer, cfg, device, scaler, scheduler
            )
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ModelError(f"distillation loss became {value} at step {steps + 1}; lower 'kd-lr'.")
            n = int(images.shape[0])
            loss_sum += value * n
            examples += n
            steps += 1
            reporter.step(steps, examples, loss_sum / examples if examples else math.nan)
    finally:
        reporter.close()
        if teacher is not None:
            teacher.train(teacher_was_training)
    elapsed = time.perf_counter() - start
    return {
        "loss": loss_sum / examples if examples else math.nan,
        "num_examples": float(examples),
        "steps": float(steps),
        "images_per_s": examples / elapsed if elapsed > 0 else math.nan,
    }
