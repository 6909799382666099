"""The coordinator's part of the students' start (run setting ``kd-public-manifest``).

The public images are loaded before the first round, so that a missing or unreadable manifest
stops the run before any site trains; after the last round the delivered teacher is distilled
into the student on them (common/public_distillation.py), the student is kept in the run folder
(``checkpoints/public_student.pt``, ``public_student.json``) and sent to every site with the
distillation message, where each site checks it against its own student architecture and
fine-tunes it on its own images.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import ArrayRecord

from common.checkpoint import save_model
from common.jsonio import write_json
from common.local import SiteData
from common.public_distillation import PublicStudent, distill_on_public_images, public_images
from common.run_settings import FederatedRunConfig
from server.progress_events import Progress, announce
from server.run_folder import RunFolder

logger = logging.getLogger(__name__)

PUBLIC_STUDENT = "public_student"
"""The students' start's checkpoint (RunFolder.checkpoint)."""


def load_public_images(settings: FederatedRunConfig, run_dir: Path) -> SiteData | None:
    """The coordinator's public images for the students' start, or None when the run has none."""
    if not settings.distill.public_manifest:
        return None
    cache_dir = (
        Path(settings.run.cache_dir) if settings.run.cache_dir else RunFolder(run_dir).default_cache_dir
    )
    data = public_images(settings, cache_dir)
    logger.info(
        "Students' start: the teacher will be distilled on %d public images of %s",
        len(data.split.train),
        settings.distill.public_manifest,
    )
    return data


def distil_public_student(
    folder: RunFolder, settings: FederatedRunConfig, teacher: ArrayRecord, images: SiteData
) -> tuple[ArrayRecord, dict[str, object]]:
    """Distil the teacher into the student on the public images; keep it in the run folder.
    Returns the student and its record (``public_student.json``, the summary's ``students_start``)."""
    start = Progress(
        -1, -1, replied=len(images.split.train), phase="start", epochs=settings.distill.public_epochs
    )
    announce(folder, start, logger)
    student = distill_on_public_images(
        settings, teacher.to_torch_state_dict(), images, num_threads=coordinator_threads(settings)
    )
    save_model(
        student.state,
        folder.checkpoint(PUBLIC_STUDENT),
        metadata={"role": "students' start, distilled at the coordinator on public images"},
    )
    record = public_student_record(settings, student)
    write_json(folder.public_student_path, record)
    logger.info(
        "Students' start ready in %.0f s: its top class is the teacher's on %.1f%% of held-out public images",
        student.seconds,
        100 * student.agreement,
    )
    return ArrayRecord(student.state), record


def coordinator_threads(settings: FederatedRunConfig) -> int:
    """Every core of the coordinator's machine: the sites wait for this student (a simulation's
    sites too: they are idle in this phase), and no site's CPU is involved."""
    return max(settings.train.num_threads, os.cpu_count() or 1)


def public_student_record(settings: FederatedRunConfig, student: PublicStudent) -> dict[str, object]:
    """``public_student.json``: where the student's start came from."""
    return {
        "manifest": settings.distill.public_manifest,
        "student": settings.distill.student,
        **student.record(),
    }
