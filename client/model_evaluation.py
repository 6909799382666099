"""An evaluation-only run at a site: score the coordinator's model on the site's labelled test split.

The message (``evaluate.model``, server/cross_site.py) brings a model that carries no code
(common/model_exchange.py): a teacher's or student's weights, which load into the architecture
the run's settings describe, or an exported student's ONNX bytes, checked again here (weights
inside the file, standard operators only) before ONNX Runtime loads them from memory. The site
then does what ``cxr-fl-client evaluate`` does (common/evaluation.py ``evaluate_scores``): the
macro AUROC with its 95% bootstrap interval on the test split, and balanced accuracy,
sensitivity and specificity at the site's own operating point, fitted on its validation split
with its own criterion (the rule stays here). The reply carries those aggregates only
(:func:`evaluation_metrics`), shaped by client/disclosure.py like every reply: coarse at a
deployed site, per-class figures (``eval_.../<class>``) only with the site's opt-in.

The cross-site matrix (run setting ``cross-site-matrix``, server/cross_site.py) asks each site
for its delivered student (``query.delivered_student``, :func:`delivered_student`): only a site
that opted in (``--share-delivered-student``) and does not train under DP sends it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from torch import nn
from torch.utils.data import DataLoader

from client.privacy_gate import CROSS_SITE_STUDENT, EVALUATION, PrivacyGate
from client.site import SiteConfig
from common.errors import DataError
from common.evaluation import EvaluationResult, EvaluationSettings, evaluate_scores
from common.local import EVAL_BATCH_SIZE, SiteData, build_loaded_model, student_config
from common.model_exchange import MODEL_FORMATS, ONNX, ROLES, check_onnx_bytes, onnx_array
from common.operating_point import OperatingPoint, fit_operating_point
from common.protocol import EVALUATE_MODEL_FORMAT_KEY, EVALUATE_MODEL_ROLE_KEY, ONNX_MODEL_RECORD, WEIGHT_KEY
from common.run_settings import FederatedRunConfig
from common.training import evaluate

logger = logging.getLogger(__name__)

EVALUATION_PREFIX = "eval_"


class OnnxModule(nn.Module):
    """An ONNX Runtime session as a module: logits of a batch [N, C, S, S] (CPU, no gradients)."""

    def __init__(self, session: Any, in_channels: int) -> None:
        super().__init__()
        self.session = session
        self.in_channels = in_channels
        self.input_name = session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.detach().cpu().numpy().astype(np.float32)
        if batch.shape[1] != self.in_channels:
            batch = np.repeat(batch[:, :1], self.in_channels, axis=1)
        (logits,) = self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})[:1]
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))


def onnx_module(data: bytes, settings: FederatedRunConfig, num_threads: int) -> OnnxModule:
    """The checked ONNX model as a module; DataError unless it fits the run's task and image size."""
    import onnxruntime as ort

    check_onnx_bytes(data)
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for unreadable models
        raise DataError(f"ONNX Runtime cannot load the coordinator's model: {exc}") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = list(inputs[0].shape) if len(inputs) == 1 else []
    size = settings.run.image_size
    if len(shape) != 4 or shape[2:] != [size, size] or not isinstance(shape[1], int):
        raise DataError(
            f"the coordinator's ONNX model takes input {shape}, not [N, C, {size}, {size}] images"
        )
    width = outputs[0].shape[-1] if outputs else None
    if width != settings.task.num_classes:
        raise DataError(
            f"the coordinator's ONNX model has {width} outputs; task '{settings.task.name}' has "
            f"{settings.task.num_classes} classes"
        )
    return OnnxModule(session, int(shape[1]))


def model_from_message(msg: Message, settings: FederatedRunConfig, site: SiteConfig) -> nn.Module:
    """The model the evaluation message brings, loaded without running any code it could carry."""
    config: Mapping[str, Any] = msg.content.config_records.get("config", {})
    model_format, role = config.get(EVALUATE_MODEL_FORMAT_KEY), config.get(EVALUATE_MODEL_ROLE_KEY)
    if model_format not in MODEL_FORMATS or role not in ROLES:
        raise DataError(
            f"the evaluation message names a {model_format!r} model of role {role!r}: expected a format of "
            f"{', '.join(MODEL_FORMATS)} and a role of {', '.join(ROLES)}"
        )
    if model_format == ONNX:
        record = msg.content.array_records.get(ONNX_MODEL_RECORD)
        if record is None or len(record) != 1:
            raise DataError("the evaluation message has no ONNX model")
        data = next(iter(record.values())).numpy()
        if data.dtype != np.uint8 or data.ndim != 1:
            raise DataError("the evaluation message's ONNX model is not a byte array")
        return onnx_module(data.tobytes(), settings, site.num_threads)
    arrays = msg.content.array_records.get("arrays")
    if arrays is None:
        raise DataError("the evaluation message has no weights")
    architecture = (
        settings.teacher
        if role == "teacher"
        else student_config(settings.distill, settings.teacher, settings.teacher.norm)
    )
    try:
        return build_loaded_model(architecture, settings.task, arrays.to_torch_state_dict())
    except RuntimeError as exc:  # load_state_dict: other tensors or shapes than the run's model
        raise DataError(
            f"the weights sent for evaluation are not the run's {role} {architecture.name}: {exc}"
        ) from None


def score_model(
    model: nn.Module, data: SiteData, settings: FederatedRunConfig, site: SiteConfig
) -> EvaluationResult:
    """``cxr-fl-client evaluate``'s figures on the test split, at the site's operating point."""
    torch.set_num_threads(site.num_threads)
    task = settings.task
    point: OperatingPoint | None = None
    if site.operating_point.name != "argmax" and len(data.split.val) > 0:
        val = evaluate(model, DataLoader(data.dataset("val"), batch_size=EVAL_BATCH_SIZE), task)
        point = fit_operating_point(val.scores, val.targets, task, site.operating_point)
    if len(data.split.test) == 0:
        raise DataError("this site's test split is empty: nothing to evaluate the model on")
    test = evaluate(model, DataLoader(data.dataset("test"), batch_size=EVAL_BATCH_SIZE), task)
    options = EvaluationSettings(n_bootstrap=settings.run.evaluate_bootstrap, seed=0, operating_point=point)
    return evaluate_scores(task, test.targets, test.scores, options)


def evaluation_metrics(result: EvaluationResult) -> dict[str, float]:
    """The aggregates a reply carries (before client/disclosure.py): the macro AUROC and its
    interval, balanced accuracy (and its interval) and the mean sensitivity and specificity at the
    site's operating point (the model's own rule without one), and per class the same figures."""
    p = EVALUATION_PREFIX
    balanced = result.site_balanced_accuracy or result.balanced_accuracy
    out = {
        f"{p}auroc_macro": result.auroc_macro.value,
        f"{p}auroc_macro_low": result.auroc_macro.low,
        f"{p}auroc_macro_high": result.auroc_macro.high,
        f"{p}op_balanced_accuracy": balanced.value,
        f"{p}op_balanced_accuracy_low": balanced.low,
        f"{p}op_balanced_accuracy_high": balanced.high,
        f"{p}op_site_rule": 1.0 if result.site_balanced_accuracy is not None else 0.0,
    }
    sensitivities, specificities = [], []
    for c in result.classes:
        sensitivity = c.site_sensitivity or c.sensitivity
        specificity = c.site_specificity or c.specificity
        sensitivities.append(sensitivity.value)
        specificities.append(specificity.value)
        out[f"{p}auroc/{c.name}"] = c.auroc.value
        out[f"{p}op_sensitivity/{c.name}"] = sensitivity.value
        out[f"{p}op_specificity/{c.name}"] = specificity.value
    out[f"{p}op_sensitivity_mean"] = _nanmean(sensitivities)
    out[f"{p}op_specificity_mean"] = _nanmean(specificities)
    return {k: float(v) for k, v in out.items()}


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


DELIVERED_STUDENT_FILES = ("global_student/student.onnx", "student/student.onnx")
"""Where a run's delivered student is exported: after federated-student rounds, else the site's own."""


def delivered_student(
    msg: Message, settings: FederatedRunConfig, site: SiteConfig, data: SiteData, gate: PrivacyGate
) -> RecordDict:
    """The ClientApp's handler of ``query.delivered_student`` (the cross-site matrix): the delivered
    student's ONNX bytes, only from a site that opted in and does not train under DP (its
    student was distilled from its images without DP: it never leaves; the gate declines)."""
    gate.enter(CROSS_SITE_STUDENT)
    for name in DELIVERED_STUDENT_FILES:
        path = site.out_dir / name
        if path.is_file():
            model = path.read_bytes()
            check_onnx_bytes(model)
            record = ArrayRecord({"model": Array(onnx_array(model))})
            return RecordDict({ONNX_MODEL_RECORD: record, "metrics": MetricRecord({WEIGHT_KEY: 0})})
    raise DataError("this site has no delivered student in this run")


def evaluate_model(
    msg: Message, settings: FederatedRunConfig, site: SiteConfig, data: SiteData, gate: PrivacyGate
) -> RecordDict:
    """The ClientApp's handler of ``evaluate.model`` (client/app.py)."""
    gate.enter(EVALUATION)
    model = model_from_message(msg, settings, site)
    result = score_model(model, data, settings, site)
    logger.info("evaluated the coordinator's model on %d test images", result.n_images)
    return RecordDict({"metrics": MetricRecord({WEIGHT_KEY: result.n_images, **evaluation_metrics(result)})})
