"""The coordinator's public pretraining of a simulated run's teacher (``ExperimentConfig.pretrain``).

Before round 1 the coordinator trains the run's teacher on the first ``images`` of its public
images (``public/site_00.csv``, with their labels) for ``epochs``, with ``cxr-fl-server
pretrain``'s routine (:func:`common.pretrain.pretrain_teacher`: a patient-grouped validation
split held out, no DP, the exact-duplicate check against every site's manifest). The weights
(``public/teacher.pt`` with its sidecar) become the run's ``teacher-weights`` and its
``initial-teacher-sha256``, so the federated teacher and every baseline teacher (pooled,
local-only) start from them: the comparison with the pooled teacher stays one of equal budgets
from one start, and the report scores the start alone beside them (what the federation added).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.data.source_pairs import load_sources
from common.errors import ConfigError
from common.pretrain import PretrainResult, pretrain_teacher
from common.run_settings import check_run_config, run_settings_from_config
from simulation.baselines import available_cores

PUBLIC_TEACHER_FILE = "teacher.pt"


@dataclass(frozen=True)
class PublicPretraining:
    """How much of the public images the coordinator pretrains the teacher on, and for how long."""

    images: int
    epochs: int

    def __post_init__(self) -> None:
        if self.images < 1:
            raise ConfigError(
                "pretrain images", self.images, "an integer >= 1 (public images to pretrain on)"
            )
        if self.epochs < 1:
            raise ConfigError("pretrain epochs", self.epochs, "an integer >= 1")


def public_teacher_path(public_dir: Path) -> Path:
    """Where the experiment keeps the coordinator's pretrained teacher."""
    return public_dir / PUBLIC_TEACHER_FILE


def pretrain_public_teacher(
    public_dir: Path,
    run_config: Mapping[str, Any],
    spec: PublicPretraining,
    *,
    site_manifests: Sequence[Path],
    cache_dir: Path,
) -> PretrainResult:
    """Pretrain the run's teacher from random weights on the first ``spec.images`` public images.

    It runs alone, before the federation, so it uses every core this process may run on.

    Raises:
        DataError: a public image is an exact copy of a site's image (the public set must be
            disjoint from the sites' data), or no training images.
    """
    manifest = public_dir / "site_00.csv"
    catalog, paths, options = load_sources(["manifest"], [manifest], str(run_config["task"]))
    chosen = catalog.subset(range(min(spec.images, len(catalog))))
    start = check_run_config({**run_config, "teacher-weights": "", "initial-teacher-sha256": ""})
    settings = run_settings_from_config(start)
    threads = max(settings.train.num_threads, available_cores())
    settings = replace(settings, train=replace(settings.train, num_threads=threads))
    sources = {sid: {"format": "manifest", "path": paths[sid], "options": options[sid]} for sid in paths}
    return pretrain_teacher(
        chosen,
        sources,
        settings,
        public_teacher_path(public_dir),
        epochs=spec.epochs,
        cache_dir=cache_dir,
        exclude=list(site_manifests),
    )
