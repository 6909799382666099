"""The study's decisions at each site's own operating point, on the held-out test set.

A site fits its decision rule on its own validation split (common/operating_point.py,
client/site_operating_point.py) and keeps it in its run folder: the delivered student's in its
export's preprocessing JSON (``<folder>/student.preprocessing.json``, else the weights metadata
``student.pt.json``), the global teacher's in ``teacher_operating_point.json`` beside
``global_teacher.pt``. :func:`score_site` scores both models on the study's held-out test set at
those rules (never at a rule fitted on the held-out images) and gives the figures as ``op_*``
keys (``op_balanced_accuracy``, ``op_sensitivity/<class>``, ``op_specificity/<class>``,
``op_never_predicted``) beside the held-out scalars at the argmax. A site without a delivered
student records ``{"failed": true}``: the study's targets count it as a miss.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from client.app import GLOBAL_TEACHER_FILE as TEACHER_FILE  # the teacher of the distillation message
from client.export import DELIVERED_FILE
from client.site_operating_point import TEACHER_OPERATING_POINT_FILE as TEACHER_POINT_FILE
from common.checkpoint import load_metadata, load_model_state
from common.config import ModelConfig
from common.export import preprocessing_path, read_operating_point, read_preprocessing
from common.local import EVAL_BATCH_SIZE, build_loaded_model, scalar_metrics
from common.operating_point import OperatingPoint, metrics_at
from common.tasks import Task
from common.training import EvalResult, evaluate

OP_PREFIX = "op_"


def evaluate_state(config: ModelConfig, state: Mapping[str, Any], dataset: Any, task: Task) -> EvalResult:
    model = build_loaded_model(config, task, state)
    return evaluate(model, DataLoader(dataset, batch_size=EVAL_BATCH_SIZE), task)


def held_out_scores(result: EvalResult) -> dict[str, float]:
    """The held-out scalars at the model's own rule (the argmax), as the study records them."""
    return {"n": float(result.n), **scalar_metrics(result, "")}


def at_point(result: EvalResult, point: OperatingPoint, task: Task) -> dict[str, float]:
    """The decisions of ``point`` on the held-out outputs: ``op_*`` figures."""
    figures = metrics_at(point, result.scores, result.targets, task)
    return {OP_PREFIX + key: value for key, value in figures.items()}


def student_point(weights: Path, task: Task) -> OperatingPoint | None:
    """The delivered student's operating point from its export (preprocessing JSON beside the
    ONNX file; else the weights metadata); None when the export carries none (the argmax)."""
    onnx = weights.with_name("student.onnx")
    if preprocessing_path(onnx).is_file():
        return read_preprocessing(onnx).operating_point
    meta = load_metadata(weights) or {}
    return read_operating_point(meta.get("operating_point"), task.classes, task.kind, str(weights))


def teacher_point(site_dir: Path) -> OperatingPoint | None:
    path = site_dir / TEACHER_POINT_FILE
    if not path.is_file():
        return None
    return OperatingPoint.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))


def score_site(
    site_dir: Path, student: ModelConfig, teacher: ModelConfig, test: Any, task: Task
) -> dict[str, Any]:
    """A site's delivered student (its ``delivered.json``) on the held-out test set, at the argmax
    and at the site's operating point; ``teacher_at_site``: the global teacher as the site received
    it, at the teacher's operating point there (when the site kept both)."""
    delivered_path = site_dir / DELIVERED_FILE
    if not delivered_path.is_file():
        return {"failed": True}
    delivered = json.loads(delivered_path.read_text(encoding="utf-8"))
    weights = site_dir / str(delivered["folder"]) / "student.pt"
    result = evaluate_state(student, load_model_state(weights), test, task)
    record: dict[str, Any] = {
        "folder": delivered["folder"],
        "delivered": delivered["delivered"],
        **held_out_scores(result),
    }
    point = student_point(weights, task)
    if point is not None:
        record["operating_point"] = point.describe()
        record.update(at_point(result, point, task))
    kept = teacher_point(site_dir)
    if kept is not None and (site_dir / TEACHER_FILE).is_file():
        teacher_result = evaluate_state(teacher, load_model_state(site_dir / TEACHER_FILE), test, task)
        record["teacher_at_site"] = {
            "operating_point": kept.describe(),
            **held_out_scores(teacher_result),
            **at_point(teacher_result, kept, task),
        }
    return record


def site_figure(record: Mapping[str, Any], key: str, *, teacher: bool = False) -> float | None:
    """A site's figure (the teacher's there with ``teacher``): 0.0 for a site whose phase failed
    (every site counts; a failed one is a miss); None when the record has no such figure."""
    if record.get("failed"):
        return 0.0
    source = record.get("teacher_at_site") if teacher else record
    if not isinstance(source, Mapping) or key not in source or source[key] is None:
        return None
    value = float(source[key])
    return None if math.isnan(value) else value


def mean_over_sites(result: Mapping[str, Any] | None, key: str, *, teacher: bool = False) -> float | None:
    """The mean over every site of the cell's delivered-student records (None unless each has it).

    A failed site counts 0 for its student; the teacher's mean (``teacher``) is over the sites
    that kept the teacher."""
    if result is None or not result.get("delivered"):
        return None
    records = [r for r in result["delivered"].values() if not (teacher and r.get("failed"))]
    if not records:
        return None
    values = [site_figure(r, key, teacher=teacher) for r in records]
    if any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None) / len(values)
