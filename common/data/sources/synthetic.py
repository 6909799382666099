"""``synthetic``: procedural CXR-like images made in memory (smoke tests; not medical data)."""

from __future__ import annotations

import numpy as np

from common.data.catalog import Catalog, ImageRecord
from common.data.sources.base import SourceRequest, _build, _register
from common.data.synthetic import SYNTHETIC_CLASSES, SyntheticReader
from common.errors import ConfigError, DataError

SYNTHETIC_OPTIONS: dict[str, str] = {
    "n_images": "number of images (default 300)",
    "seed": "random seed (default 0)",
    "image_size": "native size in pixels (default 64)",
    "class_weights": "relative class frequencies in task order, comma-separated (default equal)",
    "max_images_per_patient": "1..N images per synthetic patient (default 3)",
    "n_sites": "number of synthetic sites with their own contrast (default 1)",
    "difficulty": "0..1: fainter, smaller lesions, more noise, benign look-alikes (default 0)",
}


@_register(
    "synthetic",
    "procedural CXR-like images made in memory (smoke tests and demos; not medical data)",
    SYNTHETIC_OPTIONS,
    needs_path=False,
)
def _load_synthetic(req: SourceRequest) -> Catalog:
    task = req.task
    if task.is_multilabel:
        raise DataError(
            f"the synthetic source draws one class per image; task '{task.name}' is multi-label. "
            "Choose normal-pneumonia-covid, normal-pneumonia or normal-covid"
        )
    unknown = [c for c in task.classes if c not in SYNTHETIC_CLASSES]
    if unknown:
        raise DataError(
            f"the synthetic source cannot draw class(es) {unknown}; it knows {list(SYNTHETIC_CLASSES)}"
        )
    n_images = req.opt_int("n_images", 300, minimum=1)
    seed = req.opt_int("seed", 0)
    size = req.opt_int("image_size", 64, minimum=8)
    max_per_patient = req.opt_int("max_images_per_patient", 3, minimum=1)
    n_sites = req.opt_int("n_sites", 1, minimum=1)
    difficulty = req.opt_float("difficulty", 0.0)
    if not 0.0 <= difficulty <= 1.0:
        raise ConfigError("difficulty", difficulty, "a number between 0 (easy) and 1 (hardest)")
    weights_raw = req.opt_list("class_weights", None)
    if weights_raw is None:
        weights = np.ones(task.num_classes)
    else:
        try:
            weights = np.asarray([float(w) for w in weights_raw])
        except ValueError:
            raise ConfigError("class-weights", ",".join(weights_raw), "numbers, one per class") from None
        if len(weights) != task.num_classes or (weights < 0).any() or weights.sum() <= 0:
            raise ConfigError(
                "class-weights",
                ",".join(weights_raw),
                f"{task.num_classes} non-negative numbers for {', '.join(task.classes)}",
            )
    probs = weights / weights.sum()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2024]))
    records: list[ImageRecord] = []
    class_idx: list[int] = []
    patient = 0
    while len(records) < n_images:
        cls = int(rng.choice(task.num_classes, p=probs))
        count = min(int(rng.integers(1, max_per_patient + 1)), n_images - len(records))
        site = int(rng.integers(n_sites))
        for _ in range(count):
            i = len(records)
            image_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
            records.append(
                ImageRecord(
                    req.source_id,
                    f"{i:06d}",
                    (task.classes[cls],),
                    patient_id=f"synth-{patient:05d}",
                    site=f"synthetic-site-{site}" if n_sites > 1 else None,
                    view="PA",
                    meta={"seed": str(image_seed), "site_index": str(site)},
                )
            )
            class_idx.append(cls)
        patient += 1
    targets = np.zeros((len(records), task.num_classes), dtype=np.float32)
    targets[np.arange(len(records)), class_idx] = 1.0
    return _build(req, records, targets, SyntheticReader(size, difficulty))
