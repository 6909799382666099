"""A site's local work without Flower: its data, one round of teacher training, evaluation,
and distillation of the student.

The ClientApp (client/app.py) calls these with typed settings; the simulation's baselines
(pooled teacher, local-only teachers) call the same functions, so federated and centralised
results come from one code path.

Randomness: every random choice of a round (data order, augmentation, dropout) draws from the
``seed`` its caller passes. A simulation derives it from ``(run seed, round, site name)``, so a
resumed run repeats the straight run; a deployed site draws it from its own entropy
(client/app.py). DP-SGD's noise and Poisson sampling draw from the OS's entropy unless a
simulation passes ``dp_seed`` (common/privacy.py :func:`dp_generator`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.config import DistillConfig, ModelConfig, Norm, PrivacyConfig, TrainConfig
from common.data.cache import CachedImages, build_cache
from common.data.catalog import Catalog
from common.data.dataset import AUGMENT_PRESETS, CxrDataset
from common.data.sources import load_catalog
from common.data.splits import Split, split_by_patient
from common.device import CPU, Compute
from common.distillation import (
    IndexedDataset,
    compute_teacher_logits,
    distill_one_epoch,
    recalibrate_batchnorm,
    warmup_cosine,
)
from common.errors import DataError
from common.freeze import freeze_blocks
from common.label_skew import (
    CE,
    LogitAdjustment,
    check_local_loss,
    dataset_label_counts,
    describe,
    logit_adjustment,
)
from common.models import build_model, to_standard_layout, to_training_layout
from common.privacy import (
    AccountantHistory,
    DPPlan,
    PrivateTraining,
    check_budget_for_round,
    check_plan_matches,
    check_round_matches_plan,
    make_private,
    plan_dp,
    unwrap_model,
)
from common.progress import ProgressArg
from common.run_settings import RunSettings
from common.tasks import Task
from common.training import (
    EvalResult,
    evaluate,
    make_optimizer,
    seed_everything,
    snapshot_params,
    train_one_epoch,
)

logger = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 128


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class DataRequest:
    """Where a site's images are and how to prepare them."""

    data_format: str
    data_path: Path | None
    task: Task
    image_size: int
    cache_dir: Path
    val_fraction: float
    test_fraction: float
    split_seed: int
    strict: bool = False
    options: tuple[tuple[str, object], ...] = ()
    equalize: bool = False
    """Histogram equalisation of every image (run setting ``preprocess-equalize``)."""
    augment: str = "default"
    """Training augmentation preset (run setting ``augment``)."""


@dataclass
class SiteData:
    """A site's cached images and its patient-grouped train / validation / test split."""

    cached: CachedImages
    split: Split
    equalize: bool = False
    augment: str = "default"

    @property
    def catalog(self) -> Catalog:
        return self.cached.catalog

    def dataset(self, part: str, *, augment: bool = False, seed: int = 0) -> CxrDataset:
        return CxrDataset(
            self.cached,
            getattr(self.split, part),
            augment=augment,
            seed=seed,
            config=AUGMENT_PRESETS[self.augment],
            equalize=self.equalize,
        )

    def counts(self) -> dict[str, int]:
        return {**self.split.sizes(), "skipped": len(self.cached.skipped)}


class TrainingData(Protocol):
    """What :func:`train_round` trains on: a site's data, or the union of several (pooled baseline)."""

    def dataset(self, part: str, *, augment: bool = False, seed: int = 0) -> Any: ...


def site_data_request(
    settings: RunSettings,
    task: Task,
    data_format: str,
    data_path: Path | None,
    cache_dir: Path,
    *,
    strict: bool = False,
    whole: bool = False,
) -> DataRequest:
    """The one recipe of a data set's request: a site's (split by the run's fractions and seed),
    or with ``whole`` every image as one evaluation set (a held-out test set). The ClientApp, the
    ServerApp's central evaluation, the baselines and the study all build their requests here, so a
    baseline and a site can never be scored on different splits."""
    return DataRequest(
        data_format=data_format,
        data_path=data_path,
        task=task,
        image_size=settings.image_size,
        cache_dir=cache_dir,
        val_fraction=0.0 if whole else settings.val_fraction,
        test_fraction=0.0 if whole else settings.test_fraction,
        split_seed=settings.split_seed,
        strict=strict,
        equalize=settings.preprocess_equalize,
        augment=settings.augment,
    )


_SITE_DATA: dict[DataRequest, SiteData] = {}


def cached_images(request: DataRequest) -> CachedImages:
    """The decode-once cache of a data set (unreadable images skipped with a warning)."""
    catalog = load_catalog(
        request.data_format,
        request.data_path,
        request.task,
        options=dict(request.options),
        strict=request.strict,
    )
    cached = build_cache(catalog, request.image_size, request.cache_dir, strict=request.strict)
    if cached.skipped:
        logger.warning(
            "%d unreadable image(s) skipped (first: %s)", len(cached.skipped), cached.skipped[0].key
        )
    return cached


def load_site_data(request: DataRequest) -> SiteData:
    """Catalog, decode-once cache and split of a site (memoised per process)."""
    if request in _SITE_DATA:
        return _SITE_DATA[request]
    cached = cached_images(request)
    split = split_by_patient(
        cached.catalog,
        val_fraction=request.val_fraction,
        test_fraction=request.test_fraction,
        seed=request.split_seed,
    )
    data = SiteData(cached, split, request.equalize, request.augment)
    _SITE_DATA[request] = data
    return data


def load_eval_dataset(request: DataRequest) -> CxrDataset:
    """Every readable image of a data set as one evaluation set (e.g. a server-held test set)."""
    cached = cached_images(request)
    return CxrDataset(cached, np.arange(len(cached)), equalize=request.equalize)


def lone_last_batch(images: int, batch_size: int) -> bool:
    """Would an epoch end on a batch of one image? BatchNorm cannot train on one image whose
    feature maps are 1x1 (small images, e.g. 32 px through a ResNet), so such a batch is dropped;
    the shuffle puts another image last in the next epoch."""
    return images > 1 and images % batch_size == 1


def shuffled_loader(dataset: Dataset, batch_size: int, seed: int, *, pin_memory: bool) -> DataLoader:
    """A training loader whose shuffle draws from its own generator seeded with ``seed`` (and that
    drops a lone last image, :func:`lone_last_batch`)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=pin_memory,
        drop_last=lone_last_batch(len(dataset), batch_size),  # type: ignore[arg-type]
    )


def build_loaded_model(
    config: ModelConfig, task: Task, state: Mapping[str, torch.Tensor] | None
) -> nn.Module:
    model = build_model(replace(config, weights=None) if state is not None else config, task.num_classes)
    if state is not None:
        model.load_state_dict(dict(state))
    return model


def initial_teacher_state(teacher: ModelConfig, task: Task, seed: int) -> dict[str, torch.Tensor]:
    """The teacher every party starts from: built with ``seed`` (the run's ``seed`` setting)."""
    seed_everything(seed)
    return build_model(teacher, task.num_classes).state_dict()


@dataclass
class RoundOutcome:
    """What one round of local training produced; only ``metrics`` and the weights leave."""

    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float]
    history: AccountantHistory
    plan: DPPlan | None


def train_round(
    data: TrainingData,
    task: Task,
    model_config: ModelConfig,
    global_state: Mapping[str, torch.Tensor] | None,
    train: TrainConfig,
    *,
    seed: int,
    privacy: PrivacyConfig | None = None,
    dp_plan: DPPlan | None = None,
    dp_history: AccountantHistory | None = None,
    dp_seed: int | None = None,
    num_rounds: int = 1,
    progress: ProgressArg = None,
    compute: Compute = CPU,
) -> RoundOutcome:
    """Train the teacher from ``global_state`` for ``train.local_epochs`` on the site's train split.

    With ``privacy.enabled`` the round uses DP-SGD: the plan (noise multiplier for the whole
    run of ``num_rounds``) is made on first use, and the round is refused with
    BudgetExhaustedError if it would take the site past its target epsilon. Its noise and batch
    sampling come from the OS's entropy; only simulations pass ``dp_seed`` to repeat them.
    ``compute`` is the device (and precision) to train on; the returned weights are on the CPU.
    ``train.local_loss`` other than ``ce`` corrects the training logits for the class mix of
    ``data``'s own train split (:func:`site_logit_adjustment`).
    """
    seed_everything(seed)
    torch.set_num_threads(train.num_threads)
    model = build_loaded_model(model_config, task, global_state).to(compute.device)
    # before the optimiser and Opacus see the parameters
    freeze_blocks(model, train.freeze_blocks, model_config.name)
    dataset = data.dataset("train", augment=True, seed=seed)
    if len(dataset) == 0:
        raise DataError("the site has no training images after the split")
    loader = shuffled_loader(dataset, train.batch_size, seed, pin_memory=compute.pin_memory)
    dp_on = privacy is not None and privacy.enabled
    adjustment = site_logit_adjustment(train.local_loss, task, dataset, dp_enabled=dp_on)
    optimizer = make_optimizer(model, train)
    history, plan = list(dp_history or []), dp_plan
    trained_model: nn.Module = model
    private = None
    if privacy is not None and privacy.enabled:
        private = _private_training(
            model, optimizer, loader, train, privacy, plan, history, len(dataset), dp_seed, num_rounds
        )
        plan, trained_model, optimizer = private.plan, private.model, private.optimizer
    global_params = snapshot_params(model) if train.proximal_mu > 0 else None
    scaler = compute.grad_scaler() if private is None else None
    started = time.perf_counter()
    stats: dict[str, float] = {}
    with ExitStack() as stack:
        if private is not None:
            loader = stack.enter_context(private.physical_batches())
        for epoch in range(train.local_epochs):
            dataset.set_epoch(epoch)
            stats = train_one_epoch(
                trained_model,
                loader,
                task,
                optimizer,
                proximal_mu=train.proximal_mu,
                global_params=global_params,
                progress=progress,
                device=compute.device,
                scaler=scaler,
                adjustment=adjustment,
            )
    metrics = {
        "train_seconds": time.perf_counter() - started,
        "loss": stats.get("loss", float("nan")),
        "images_per_s": stats.get("images_per_s", float("nan")),
    }
    if private is not None:
        history = private.history()
        metrics["dp_epsilon"] = private.epsilon()
        metrics["dp_noise_multiplier"] = private.plan.noise_multiplier
    state = {k: v.detach().cpu().clone() for k, v in unwrap_model(trained_model).state_dict().items()}
    return RoundOutcome(state, metrics, history, plan)


def _private_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    train: TrainConfig,
    privacy: PrivacyConfig,
    plan: DPPlan | None,
    history: AccountantHistory,
    num_examples: int,
    dp_seed: int | None,
    num_rounds: int,
) -> PrivateTraining:
    """DP-SGD for this round: the run's plan (made on first use) checked against the site's policy,
    the round and the budget left, then the model, optimiser and loader made private."""
    if plan is None:
        plan = plan_dp(
            privacy,
            num_examples=num_examples,
            batch_size=train.batch_size,
            local_epochs=train.local_epochs,
            num_rounds=num_rounds,
        )
    check_plan_matches(plan, privacy)
    check_round_matches_plan(
        plan, num_examples=num_examples, batch_size=train.batch_size, local_epochs=train.local_epochs
    )
    check_budget_for_round(history, plan)
    return make_private(
        model,
        optimizer,
        loader,
        plan,
        history,
        dp_seed=dp_seed,
        max_physical_batch_size=privacy.max_physical_batch_size,
    )


def site_logit_adjustment(
    kind: str, task: Task, train_set: object, *, dp_enabled: bool
) -> LogitAdjustment | None:
    """The label-skew correction of the run setting ``local-loss`` for this site's train split.

    The counts are the site's own and stay here (only their effect on the weights leaves, as with
    any training). A site under DP-SGD trains with ``ce`` and logs why: a run that asked for DP
    and a correction was refused when its settings were checked, so DP here is the site's own
    policy, which wins over the run's loss (common/label_skew.py).
    """
    if kind == CE:
        return None
    check_local_loss(kind, task, dp_enabled=False)
    if dp_enabled:
        logger.warning(
            "local-loss %r is not used under DP-SGD (the site's class counts would enter every "
            "per-sample gradient): this site trains with plain cross-entropy",
            kind,
        )
        return None
    adjustment = logit_adjustment(kind, dataset_label_counts(train_set, task.num_classes))
    logger.info("local loss: %s", describe(adjustment))
    return adjustment


def evaluate_state(
    data: SiteData,
    part: str,
    task: Task,
    model_config: ModelConfig,
    state: Mapping[str, torch.Tensor],
    *,
    compute: Compute = CPU,
) -> EvalResult:
    model = build_loaded_model(model_config, task, state).to(compute.device)
    loader = DataLoader(data.dataset(part), batch_size=EVAL_BATCH_SIZE, pin_memory=compute.pin_memory)
    return evaluate(model, loader, task, device=compute.device)


def scalar_metrics(result: EvalResult, prefix: str) -> dict[str, float]:
    """Loss and scalar metrics, prefixed; the per-image scores stay here."""
    out = {f"{prefix}loss": float(result.loss)}
    out.update({f"{prefix}{k}": float(v) for k, v in result.metrics.scalars().items()})
    return out


def student_config(distill: DistillConfig, teacher_config: ModelConfig, norm: Norm) -> ModelConfig:
    """The student's architecture: same input channels and normalisation as the teacher."""
    return ModelConfig(
        name=distill.student,
        norm=norm,
        in_channels=teacher_config.in_channels,
        width_mult=distill.width_mult,
    )


@dataclass
class DistillOutcome:
    student: nn.Module
    teacher: nn.Module
    metrics: dict[str, float]
    # the teacher's logits of the un-augmented train split (KD with cached logits only): pass
    # them as ``teacher_logits`` to a later distillation from the same teacher on the same data
    teacher_logits: torch.Tensor | None = None
    # True when the teacher's BatchNorm statistics were re-estimated on this site's train split
    teacher_adapted: bool = False


def distill_student(
    data: SiteData,
    task: Task,
    teacher_config: ModelConfig,
    teacher_state: Mapping[str, torch.Tensor],
    distill: DistillConfig,
    *,
    norm: Norm,
    seed: int,
    num_threads: int = 2,
    use_kd: bool = True,
    student_state: Mapping[str, torch.Tensor] | None = None,
    epochs: int | None = None,
    evaluate_teacher: bool = True,
    teacher_logits: torch.Tensor | None = None,
    schedule_part: tuple[int, int] = (1, 1),
    recalibrate_bn: bool | None = None,
    progress: ProgressArg = None,
    compute: Compute = CPU,
    start_competes: bool = False,
) -> DistillOutcome:
    """Distil a student from the teacher on the train split (or train it without KD).

    ``use_kd=False`` trains the same student with the same budget on the labels alone (plain
    cross-entropy; the teacher does no work). ``student_state`` starts from given student
    weights (a federated student's global weights) instead of a fresh initialisation;
    ``epochs`` overrides ``distill.epochs``; ``evaluate_teacher=False`` skips scoring the
    teacher. Returns both models and the test-split metrics (``teacher_*`` / ``student_*``).
    With ``cache_teacher_logits`` the teacher sees each un-augmented training image once and
    its logits are reused every epoch; otherwise it runs on every (augmented) batch.
    ``teacher_logits`` (an earlier outcome's, same teacher and data) skips even that pass.
    ``schedule_part = (r, R)``: these epochs are part ``r`` of ``R`` equal parts of one
    warm-up + cosine schedule (a federated student's round ``r`` of ``R``).
    ``recalibrate_bn`` overrides ``distill.recalibrate_bn`` (False: a teacher already adapted
    to this site); the outcome's ``teacher_adapted`` says whether its statistics were re-estimated.
    ``start_competes`` (with ``student_state`` and ``select_best``): the given student is scored
    on the validation split before training and kept if no epoch beats it (``student_best_epoch``
    0), e.g. the coordinator's start, which a few epochs on one site's images can make worse.
    Training and scoring run on ``compute``; both returned models are on the CPU (for export).
    """
    seed_everything(seed)
    torch.set_num_threads(num_threads)
    device, pin = compute.device, compute.pin_memory
    teacher = build_loaded_model(teacher_config, task, teacher_state).to(device)
    teacher.eval()
    test_loader = DataLoader(data.dataset("test"), batch_size=EVAL_BATCH_SIZE, pin_memory=pin)
    recalibrate = use_kd and (distill.recalibrate_bn if recalibrate_bn is None else recalibrate_bn)
    metrics, adapted = _prepare_teacher(
        teacher, data, task, test_loader, recalibrate, evaluate_teacher, compute
    )
    student_arch = student_config(distill, teacher_config, norm)
    student = to_training_layout(build_loaded_model(student_arch, task, student_state).to(device), device)
    fit = _plan_epochs(
        student,
        teacher if use_kd else None,
        data,
        distill,
        seed=seed,
        epochs=distill.epochs if epochs is None else epochs,
        schedule_part=schedule_part,
        earlier_logits=teacher_logits,
        num_threads=num_threads,
        compute=compute,
        progress=progress,
    )
    competes = start_competes and student_state is not None
    selection, val_loader = _best_epoch_selection(
        student, teacher if use_kd else None, data, task, distill, competes, compute
    )
    started = time.perf_counter()
    epochs_run = _fit_epochs(student, fit, task, distill, selection, val_loader, device, progress)
    if selection is not None:
        selection.restore(student)
        metrics["student_best_epoch"] = float(selection.best_epoch + 1)
    metrics["student_epochs_run"] = float(epochs_run)
    metrics["distill_seconds"] = time.perf_counter() - started
    metrics.update(scalar_metrics(evaluate(student, test_loader, task, device=device), "student_"))
    logits = fit.teacher_source if isinstance(fit.teacher_source, torch.Tensor) else None
    student = to_standard_layout(student.cpu())
    return DistillOutcome(student, teacher.cpu(), metrics, logits, teacher_adapted=adapted)


def _best_epoch_selection(
    student: nn.Module,
    teacher: nn.Module | None,
    data: SiteData,
    task: Task,
    distill: DistillConfig,
    start_competes: bool,
    compute: Compute,
) -> tuple[BestStudent | None, DataLoader | None]:
    """The validation loader (None without validation images) and, with ``select_best``, the
    keeper of the best epoch (by ``distill.select_metric``; ``"fidelity"`` needs the ``teacher``,
    else macro-AUROC); with ``start_competes`` the starting student is scored first and kept
    (best epoch 0) unless an epoch beats it."""
    val_set = data.dataset("val")
    val_loader = (
        DataLoader(val_set, batch_size=EVAL_BATCH_SIZE, pin_memory=compute.pin_memory)
        if len(val_set)
        else None
    )
    if not distill.select_best or val_loader is None:
        return None, val_loader
    teacher_scores = None
    if distill.select_metric == "fidelity" and teacher is not None:
        teacher_scores = evaluate(teacher, val_loader, task, device=compute.device).scores
    selection = BestStudent(distill.patience, teacher_scores, task.is_multilabel)
    if start_competes:
        selection.update(-1, student, evaluate(student, val_loader, task, device=compute.device))
    return selection, val_loader


def _prepare_teacher(
    teacher: nn.Module,
    data: SiteData,
    task: Task,
    test_loader: DataLoader,
    recalibrate: bool,
    evaluate_teacher: bool,
    compute: Compute,
) -> tuple[dict[str, float], bool]:
    """Score the teacher as received (``teacher_*``), then, with ``recalibrate``, re-estimate its
    BatchNorm statistics on the site's train split and score it again (``teacher_site_bn_*``).
    Returns those metrics and whether the teacher was adapted."""
    device = compute.device
    metrics: dict[str, float] = {}
    if evaluate_teacher:  # the federation's teacher as received, before any site adaptation
        metrics.update(scalar_metrics(evaluate(teacher, test_loader, task, device=device), "teacher_"))
    if not recalibrate:
        return metrics, False
    plain_loader = DataLoader(
        data.dataset("train"), batch_size=EVAL_BATCH_SIZE, pin_memory=compute.pin_memory
    )
    if not recalibrate_batchnorm(teacher, plain_loader, device=device):
        return metrics, False
    teacher.eval()
    if evaluate_teacher:
        at_site = evaluate(teacher, test_loader, task, device=device)
        metrics.update(scalar_metrics(at_site, "teacher_site_bn_"))
    return metrics, True


def _teacher_logits_of_train_split(
    teacher: nn.Module, data: SiteData, compute: Compute, progress: ProgressArg
) -> torch.Tensor:
    """One pass of the teacher over the un-augmented train split (KD with cached logits)."""
    plain = IndexedDataset(data.dataset("train"))
    return compute_teacher_logits(
        teacher,
        DataLoader(plain, batch_size=EVAL_BATCH_SIZE, pin_memory=compute.pin_memory),
        len(plain),
        device=compute.device,
        progress=progress,
    )


def _part_of_schedule(
    optimizer: torch.optim.Optimizer,
    distill: DistillConfig,
    epochs: int,
    steps_per_epoch: int,
    schedule_part: tuple[int, int],
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Part ``r`` of ``R`` equal parts of one warm-up + cosine schedule (None: constant rate)."""
    part, parts = schedule_part
    if not 1 <= part <= parts:
        raise ValueError(f"schedule part {part} of {parts}: the part must be between 1 and {parts}")
    if distill.schedule != "cosine":
        return None
    part_steps = epochs * steps_per_epoch
    return warmup_cosine(
        optimizer,
        parts * part_steps,
        distill.warmup_epochs * steps_per_epoch,
        start_step=(part - 1) * part_steps,
    )


@dataclass
class _EpochPlan:
    """What the epochs of a distillation run on: their number, the teacher (live, its cached
    logits, or None without KD), data, optimiser, schedule and generators."""

    epochs: int
    teacher_source: nn.Module | torch.Tensor | None
    loader: DataLoader
    train_set: CxrDataset
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    mix_generator: torch.Generator
    scaler: torch.amp.GradScaler | None


def _plan_epochs(
    student: nn.Module,
    teacher: nn.Module | None,
    data: SiteData,
    distill: DistillConfig,
    *,
    seed: int,
    epochs: int,
    schedule_part: tuple[int, int],
    earlier_logits: torch.Tensor | None,
    num_threads: int,
    compute: Compute,
    progress: ProgressArg,
) -> _EpochPlan:
    """The augmented train split, its shuffled loader (indexed for cached logits), the student's
    optimiser and schedule, and the teacher's part (``teacher`` None: no KD)."""
    train_set = data.dataset("train", augment=True, seed=seed)
    optimizer = make_optimizer(
        student, TrainConfig(lr=distill.lr, optimizer=distill.optimizer, num_threads=num_threads)
    )
    mix_generator = torch.Generator().manual_seed(derive_seed(seed, "mix"))
    pin = compute.pin_memory
    teacher_source: nn.Module | torch.Tensor | None = teacher
    if teacher is not None and distill.cache_teacher_logits:
        teacher_source = earlier_logits
        if earlier_logits is None or earlier_logits.shape[0] != len(train_set):
            teacher_source = _teacher_logits_of_train_split(teacher, data, compute, progress)
        loader = shuffled_loader(IndexedDataset(train_set), distill.batch_size, seed, pin_memory=pin)
    else:
        loader = shuffled_loader(train_set, distill.batch_size, seed, pin_memory=pin)
    scheduler = _part_of_schedule(optimizer, distill, epochs, len(loader), schedule_part)
    return _EpochPlan(
        epochs, teacher_source, loader, train_set, optimizer, scheduler, mix_generator, compute.grad_scaler()
    )


def _fit_epochs(
    student: nn.Module,
    fit: _EpochPlan,
    task: Task,
    distill: DistillConfig,
    selection: BestStudent | None,
    val_loader: DataLoader | None,
    device: torch.device | str,
    progress: ProgressArg,
) -> int:
    """Distil epoch by epoch, scoring each on validation when a best epoch is selected; stops
    early when ``selection`` says ``patience`` epochs brought nothing. Returns the epochs run."""
    epochs_run = 0
    for epoch in range(fit.epochs):
        fit.train_set.set_epoch(epoch)
        distill_one_epoch(
            student,
            fit.teacher_source,
            fit.loader,
            task,
            fit.optimizer,
            distill,
            device=device,
            progress=progress,
            scaler=fit.scaler,
            scheduler=fit.scheduler,
            mix=distill.mix,
            mix_alpha=distill.mix_alpha,
            generator=fit.mix_generator,
        )
        epochs_run = epoch + 1
        if (
            selection is not None
            and val_loader is not None
            and selection.update(epoch, student, evaluate(student, val_loader, task, device=device))
        ):
            break
    return epochs_run


@dataclass(frozen=True)
class DeliveredStudent:
    """Which student a site deploys, and why (written to the model card)."""

    choice: str  # "global" or "personalised"
    reason: str


def choose_delivered_student(global_val: EvalResult, personalised_val: EvalResult | None) -> DeliveredStudent:
    """The federated (global) student, unless a local fine-tune scores strictly better on validation.

    Scores as :class:`BestStudent` (macro-AUROC, else minus the loss). A tie keeps the global
    student: it matches the federation's teacher on every site's data, not only this one's.
    """
    g = BestStudent.score(global_val)
    if personalised_val is None:
        return DeliveredStudent("global", "the federated student (no local fine-tune was asked for)")
    p = BestStudent.score(personalised_val)
    what = "macro-AUROC" if math.isfinite(float(global_val.metrics.auroc_macro)) else "minus loss"
    if p > g:
        return DeliveredStudent(
            "personalised",
            f"the local fine-tune beat the federated student on validation ({what} {p:.4f} > {g:.4f})",
        )
    return DeliveredStudent(
        "global",
        f"the local fine-tune did not beat the federated student on validation ({what} {p:.4f} <= {g:.4f})",
    )


class BestStudent:
    """Keeps the student of the best validation epoch; says when ``patience`` epochs brought nothing.

    The score is the validation macro-AUROC, or minus the validation loss where AUROC is
    undefined (a class missing from the split); with ``teacher_scores`` (the teacher's
    probabilities on the same validation images) it is the student's :func:`fidelity` to them
    instead. Ties keep the earlier epoch.
    """

    def __init__(
        self, patience: int = 0, teacher_scores: np.ndarray | None = None, multilabel: bool = False
    ) -> None:
        self.patience = patience
        self.teacher_scores = teacher_scores
        self.multilabel = multilabel
        self.best_epoch = -1
        self.best_score = -math.inf
        self.best_state: dict[str, torch.Tensor] | None = None

    @staticmethod
    def score(result: EvalResult) -> float:
        auroc = float(result.metrics.auroc_macro)
        return auroc if math.isfinite(auroc) else -float(result.loss)

    def update(self, epoch: int, student: nn.Module, result: EvalResult) -> bool:
        """Record one epoch's validation result; True when training should stop."""
        if self.teacher_scores is None:
            score = self.score(result)
        else:
            score = fidelity(self.teacher_scores, result.scores, multilabel=self.multilabel)
        if score > self.best_score:
            self.best_score, self.best_epoch = score, epoch
            self.best_state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
        return self.patience > 0 and epoch - self.best_epoch >= self.patience

    def restore(self, student: nn.Module) -> None:
        if self.best_state is not None:
            student.load_state_dict(self.best_state)


def fidelity(teacher_scores: np.ndarray, student_scores: np.ndarray, *, multilabel: bool) -> float:
    """How close the student's probabilities are to the teacher's on the same images: minus the
    mean cross-entropy of the student's against the teacher's (softmax: over the classes; sigmoid:
    summed over the findings). Higher is closer; minus the teacher's own entropy is the most."""
    student = np.clip(student_scores.astype(np.float64), 1e-7, 1 - 1e-7)
    teacher = teacher_scores.astype(np.float64)
    cross = teacher * np.log(student)
    if multilabel:
        cross += (1 - teacher) * np.log(1 - student)
    return float(cross.sum(axis=1).mean()) if len(cross) else -math.inf


def class_balance(data: SiteData) -> np.ndarray:
    """Positive counts per class in the train split (for logs and checks)."""
    return np.nansum(data.catalog.targets[data.split.train], axis=0)
