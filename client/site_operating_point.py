"""A site's operating points for the models it holds, and its check before it delivers a student.

Every model the site keeps or exports gets the site's own decision rule, fitted on its
validation split with the site's criterion (node_config ``operating-point``, client/site.py;
common/operating_point.py): the global teacher as it arrived in the distillation message
(:data:`TEACHER_OPERATING_POINT_FILE` beside it), each distilled student (in its export's
preprocessing JSON, weights metadata and model card; the no-KD student's in its weights
metadata) and the delivered student. The rules stay in the site's files: their shifts and
thresholds encode its class mix.

The check before delivery (:func:`check_before_delivery`): once the site's delivered student is
decided, the global teacher and that student are scored on the site's test split, each at its
own operating point. The student is fit for delivery when its balanced accuracy there is at most
:data:`DELIVERY_TOLERANCE` below the teacher's and it chooses every class the test split holds.
The reply carries the figures (:func:`delivery_check`; client/disclosure.py shapes them) and
:data:`DELIVERY_CHECK_FILE` in the site's output folder keeps them exactly.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.config import ModelConfig
from common.device import CPU, Compute
from common.errors import ModelError
from common.jsonio import write_json
from common.local import SiteData, evaluate_state
from common.operating_point import Criterion, OperatingPoint, fit_operating_point, metrics_at
from common.tasks import Task
from common.training import EvalResult

logger = logging.getLogger(__name__)

TEACHER_OPERATING_POINT_FILE = "teacher_operating_point.json"
"""Beside the site's global teacher: its operating point at this site."""
DELIVERY_CHECK_FILE = "delivery_check.json"
DELIVERY_TOLERANCE = 0.05
"""How far below the teacher's balanced accuracy (at their operating points) a fit student may be."""


@dataclass(frozen=True)
class AtOperatingPoint:
    """A model's operating point at this site and its outputs on the site's test split."""

    point: OperatingPoint
    test: EvalResult

    def figures(self, task: Task) -> dict[str, float]:
        """``balanced_accuracy``, ``sensitivity/<c>``, ``specificity/<c>``, ``never_predicted``."""
        return metrics_at(self.point, self.test.scores, self.test.targets, task)


def fit_at_site(
    data: SiteData,
    task: Task,
    config: ModelConfig,
    state: Mapping[str, torch.Tensor],
    criterion: Criterion,
    *,
    compute: Compute = CPU,
) -> OperatingPoint:
    """The model's operating point fitted on the site's validation split (the argmax without one)."""
    if criterion.name == "argmax" or len(data.split.val) == 0:
        return OperatingPoint.argmax(task)
    val = evaluate_state(data, "val", task, config, state, compute=compute)
    return fit_operating_point(val.scores, val.targets, task, criterion)


def score_at_site(
    data: SiteData,
    task: Task,
    config: ModelConfig,
    state: Mapping[str, torch.Tensor],
    criterion: Criterion,
    *,
    compute: Compute = CPU,
    point: OperatingPoint | None = None,
    test: EvalResult | None = None,
) -> AtOperatingPoint:
    """The model's operating point (``point``, else fitted) and its test-split outputs (``test``,
    else scored now)."""
    if point is None:
        point = fit_at_site(data, task, config, state, criterion, compute=compute)
    if test is None:
        test = evaluate_state(data, "test", task, config, state, compute=compute)
    return AtOperatingPoint(point, test)


def save_teacher_point(site_dir: Path, point: OperatingPoint) -> None:
    write_json(Path(site_dir) / TEACHER_OPERATING_POINT_FILE, point.to_dict())


def load_teacher_point(site_dir: Path, task: Task, criterion: Criterion) -> OperatingPoint | None:
    """The global teacher's operating point kept at the distillation round, when it is readable,
    for this task and fitted by the site's current criterion (else None: fit it again)."""
    path = Path(site_dir) / TEACHER_OPERATING_POINT_FILE
    if not path.is_file():
        return None
    try:
        point = OperatingPoint.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))
    except (OSError, ValueError, ModelError) as exc:
        logger.warning("ignoring %s (%s): the teacher's operating point is fitted again", path, exc)
        return None
    fits = point.classes == tuple(task.classes) and point.task_kind == task.kind
    return point if fits and point.criterion == str(criterion) else None


def delivery_check(
    task: Task,
    teacher: AtOperatingPoint,
    student: AtOperatingPoint,
    *,
    nokd: AtOperatingPoint | None = None,
    kd: AtOperatingPoint | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """The reply's figures of the check (see the module docstring) and the full record.

    ``student`` is the delivered student; ``nokd`` the no-KD baseline (when it ran); ``kd`` the
    site's own KD student (the distillation round)."""
    t, s = teacher.figures(task), student.figures(task)
    gap_ok = s["balanced_accuracy"] >= t["balanced_accuracy"] - DELIVERY_TOLERANCE - 1e-12
    ok = bool(gap_ok and s["never_predicted"] == 0)  # a NaN balanced accuracy fails
    reply = {
        "teacher_op_balanced_accuracy": t["balanced_accuracy"],
        "student_op_balanced_accuracy": s["balanced_accuracy"],
        "student_op_never_predicted": s["never_predicted"],
        "delivery_check_ok": float(ok),
    }
    for c in task.classes:
        for role, figures in (("teacher", t), ("student", s)):
            reply[f"{role}_op_sensitivity/{c}"] = figures[f"sensitivity/{c}"]
            reply[f"{role}_op_specificity/{c}"] = figures[f"specificity/{c}"]
    models = {"teacher": teacher, "student": student, "nokd": nokd, "kd": kd}
    for role in ("nokd", "kd"):
        if (model := models[role]) is not None:
            reply[f"{role}_op_balanced_accuracy"] = model.figures(task)["balanced_accuracy"]
    record = {
        "ok": ok,
        "rule": f"student balanced accuracy >= teacher's - {DELIVERY_TOLERANCE:g} at their operating "
        "points, and every class of the test split chosen",
        "split": "test",
        "images": student.test.n,
        "never_predicted_by_student": _never_predicted(student, task),
        **{role: _model_record(model, task) for role, model in models.items() if model is not None},
    }
    return reply, record


def _never_predicted(model: AtOperatingPoint, task: Task) -> list[str]:
    """Classes present in the test split that the model never chooses at its operating point."""
    figures = model.figures(task)
    decided = model.point.decide(model.test.scores)
    columns = [decided[:, k] == 1 if task.is_multilabel else decided == k for k in range(task.num_classes)]
    chosen = [bool(column.any()) for column in columns]
    return [
        c
        for c, any_chosen in zip(task.classes, chosen, strict=True)
        if not math.isnan(figures[f"sensitivity/{c}"]) and not any_chosen
    ]


def _model_record(model: AtOperatingPoint, task: Task) -> dict[str, Any]:
    return {
        "operating_point": model.point.describe(),
        "at_operating_point": model.figures(task),
        "auroc_macro": float(model.test.metrics.auroc_macro),
        "argmax_balanced_accuracy": float(model.test.metrics.balanced_accuracy),
    }


def check_before_delivery(
    site_dir: Path,
    site_name: str,
    task: Task,
    teacher: AtOperatingPoint,
    student: AtOperatingPoint,
    **baselines: AtOperatingPoint | None,
) -> dict[str, float]:
    """Run :func:`delivery_check`, keep its record in ``site_dir``, log one line; the reply's figures."""
    reply, record = delivery_check(task, teacher, student, **baselines)
    write_json(Path(site_dir) / DELIVERY_CHECK_FILE, record)
    never = record["never_predicted_by_student"]
    logger.info(
        "site %s delivery check: %s (student balanced accuracy %.3f at its operating point, teacher %.3f; "
        "classes never predicted: %s)",
        site_name,
        "fit" if record["ok"] else "UNFIT",
        reply["student_op_balanced_accuracy"],
        reply["teacher_op_balanced_accuracy"],
        ", ".join(never) or "none",
    )
    return reply
