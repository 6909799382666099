"""Per-image scores of the models each simulated site holds, for the report's paired intervals.

A deployed site sends only figures. A simulation runs every site on this machine, so after the
run the experiment scores, at each site, the global teacher it received, the student it
delivers (``delivered.json``), its KD student and its no-KD student: one forward pass per model
on the site's validation and test splits. Each model's test images are decided at the operating
point fitted for it on the site's validation split (simulation/site_decisions.py), as the site
does. ``site_scores.npz`` keeps, per site, the test labels and each model's test probabilities
and decisions (keys ``SITE__labels``, ``SITE__MODEL_probabilities``, ``SITE__MODEL_decisions``).

The report (simulation/claims.py) bootstraps the test images from it where its figures are the
sites' own; the files it reads are the site's, so a model a site did not keep is left out.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from client.app import GLOBAL_TEACHER_FILE, NO_KD_STUDENT_FILE
from client.export import DELIVERED_FILE, STUDENT_DIR
from common.checkpoint import load_model_state
from common.device import resolve_compute
from common.local import build_loaded_model, student_config
from common.run_settings import FederatedRunConfig
from simulation.baselines import evaluate_split, load_sites
from simulation.experiment_folder import experiment_run
from simulation.site_decisions import decide_at_site_point

logger = logging.getLogger(__name__)

SITE_SCORES_FILE = "site_scores.npz"
SITE_MODELS = ("teacher", "delivered", "kd", "nokd")
SEPARATOR = "__"


def site_model_files(site_dir: Path) -> dict[str, Path]:
    """The model files a site kept (see :data:`SITE_MODELS`); the delivered student is the folder
    its ``delivered.json`` names."""
    files = {
        "teacher": site_dir / GLOBAL_TEACHER_FILE,
        "kd": site_dir / STUDENT_DIR / "student.pt",
        "nokd": site_dir / NO_KD_STUDENT_FILE,
    }
    record = site_dir / DELIVERED_FILE
    if record.is_file():
        folder = str(json.loads(record.read_text(encoding="utf-8")).get("folder", ""))
        files["delivered"] = site_dir / folder / "student.pt"
    return {name: path for name, path in files.items() if path.is_file()}


def score_site_models(out: Path, settings: FederatedRunConfig, num_sites: int) -> Path | None:
    """Write ``OUT/site_scores.npz`` (see the module docstring); None when no site kept a model."""
    compute = resolve_compute(settings.compute)
    student = student_config(settings.distill, settings.teacher, settings.teacher.norm)
    arrays: dict[str, np.ndarray] = {}
    for name, site in load_sites(out, settings, num_sites).items():
        files = site_model_files(experiment_run(out).site_dir(name))
        scored: dict[Path, tuple[np.ndarray, np.ndarray]] = {}  # the delivered student is often the KD one
        for model_name, path in files.items():
            weights = path.resolve()
            if weights not in scored:
                config = settings.teacher if model_name == "teacher" else student
                model = build_loaded_model(config, settings.task, load_model_state(path)).to(compute.device)
                val, test = (
                    evaluate_split(model, site.dataset(part), settings, compute) for part in ("val", "test")
                )
                decisions = decide_at_site_point(val.scores, val.targets, test.scores, settings.task)
                scored[weights] = (test.scores, decisions)
                arrays[f"{name}{SEPARATOR}labels"] = test.targets
            key = f"{name}{SEPARATOR}{model_name}"
            arrays[f"{key}_probabilities"], arrays[f"{key}_decisions"] = scored[weights]
    if not arrays:
        return None
    path = out / SITE_SCORES_FILE
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
    logger.info("Per-image scores of the sites' models in %s", path)
    return path


def read_site_scores(path: Path) -> dict[str, dict[str, np.ndarray]] | None:
    """``{site: {"labels": ..., "MODEL_probabilities": ..., "MODEL_decisions": ...}}`` (None: no file)."""
    if not path.is_file():
        return None
    sites: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as arrays:
        for key in arrays.files:
            site, _, name = key.partition(SEPARATOR)
            sites.setdefault(site, {})[name] = arrays[key]
    return sites
