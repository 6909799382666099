"""The student's start, distilled at the coordinator from the federation's teacher on public images.

A MobileNetV2 from random weights learns little from one site's few hundred images in the few
epochs a site can spend (issue 25: every demo student was unfit, macro-AUROC 0.50-0.68 against
its teacher's 0.79-0.98). The coordinator already holds the federation's teacher after the last
round; it distils it into the student on images it may use itself, a public data set named by the
run setting ``kd-public-manifest`` (a manifest CSV of the coordinator's), and sends that student
with the distillation message. Each site then fine-tunes it by KD on its own images
(``kd-epochs``) and fits its own operating point, as before; a site never sends anything more.
Server-side distillation on unlabelled images follows FedDF (Lin et al., NeurIPS 2020), here from
the one aggregated teacher.

The public images' labels are never used: the loss is the KD term alone (``alpha = 1``) and the
held-out tenth of their patients is drawn without them, so any chest X-rays serve, labelled for
this task or not (a manifest still needs one of the task's labels per row). The held-out images
measure how often the student's top class is the teacher's (``agreement``), which needs no label. Nothing
here reads a site's data, and the teacher is the one every site receives anyway, so a DP teacher
stays covered (post-processing).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.data.catalog import Catalog
from common.data.splits import Split, patient_groups
from common.errors import DataError
from common.local import EVAL_BATCH_SIZE, DataRequest, SiteData, cached_images, distill_student
from common.progress import ProgressArg
from common.run_settings import FederatedRunConfig
from common.training import evaluate

logger = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.1
"""Share of the public images kept out of distillation to measure teacher-student agreement."""


@dataclass(frozen=True)
class PublicStudent:
    """The coordinator's distilled student and what it cost."""

    state: dict[str, torch.Tensor]
    images: int
    epochs: int
    agreement: float
    seconds: float

    def record(self) -> dict[str, object]:
        """What ``summary.json`` keeps about it."""
        return {
            "images": self.images,
            "epochs": self.epochs,
            "agreement_with_teacher": round(self.agreement, 4),
            "seconds": round(self.seconds, 1),
        }


def public_images(settings: FederatedRunConfig, cache_dir: Path) -> SiteData:
    """The coordinator's public images, decoded like a site's (same size and preprocessing), with
    a tenth of their patients held out, drawn without looking at the labels."""
    request = DataRequest(
        "manifest",
        Path(settings.distill.public_manifest),
        settings.task,
        settings.run.image_size,
        cache_dir,
        val_fraction=0.0,
        test_fraction=0.0,
        split_seed=settings.distill.seed,
        equalize=settings.run.preprocess_equalize,
        augment=settings.run.augment,
    )
    cached = cached_images(request)
    split = label_blind_split(cached.catalog, HELD_OUT_FRACTION, settings.distill.seed)
    return SiteData(cached, split, request.equalize, request.augment)


def label_blind_split(catalog: Catalog, held_out: float, seed: int) -> Split:
    """Train and held-out parts by patient, drawn at random without the labels (none in val)."""
    groups = patient_groups(catalog)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    if n_groups < 2:
        raise DataError(
            f"kd-public-manifest: {len(catalog)} image(s) from {n_groups} patient(s); the students' "
            "start needs public images of at least 2 patients (a few hundred serve well)"
        )
    order = np.random.default_rng(seed).permutation(n_groups)
    held = np.isin(groups, order[: max(1, round(held_out * n_groups))])
    rows = np.arange(len(groups))
    return Split(rows[~held], rows[:0], rows[held], seed, 0.0, held_out)


def distill_on_public_images(
    settings: FederatedRunConfig,
    teacher_state: dict[str, torch.Tensor],
    data: SiteData,
    *,
    num_threads: int,
    progress: ProgressArg = None,
) -> PublicStudent:
    """Distil the student from the teacher on ``data``'s training part, by the KD term alone."""
    distill = replace(
        settings.distill,
        alpha=1.0,
        epochs=settings.distill.public_epochs,
        batch_size=settings.distill.public_batch_size or settings.distill.batch_size,
        lr=settings.distill.public_lr or settings.distill.lr,
        cache_teacher_logits=settings.distill.mix == "none",
        select_best=False,
        patience=0,
    )
    started = time.perf_counter()
    outcome = distill_student(
        data,
        settings.task,
        settings.teacher,
        teacher_state,
        distill,
        norm=settings.teacher.norm,
        seed=settings.distill.seed,
        num_threads=num_threads,
        evaluate_teacher=False,
        recalibrate_bn=False,  # the teacher's statistics are the federation's, not these images'
        progress=progress,
    )
    held_out = DataLoader(data.dataset("test"), batch_size=EVAL_BATCH_SIZE)
    agreement = top_class_agreement(
        evaluate(outcome.teacher, held_out, settings.task).scores,
        evaluate(outcome.student, held_out, settings.task).scores,
    )
    return PublicStudent(
        state=outcome.student.state_dict(),
        images=len(data.split.train),
        epochs=distill.epochs,
        agreement=agreement,
        seconds=time.perf_counter() - started,
    )


def top_class_agreement(teacher_scores: np.ndarray, student_scores: np.ndarray) -> float:
    """Share of images on which both models rank the same class first (nan without images)."""
    if len(teacher_scores) == 0:
        return float("nan")
    return float(np.mean(teacher_scores.argmax(axis=1) == student_scores.argmax(axis=1)))
