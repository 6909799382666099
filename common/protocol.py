"""What server and sites agree on about messages, without importing Flower.

Error codes a site puts in its error replies (Flower's own codes are below 100), the message
type of the distillation round, and the keys of the records in replies.
"""

from __future__ import annotations

import re

SITE_DECLINED = 1001
"""The site declines the round (its differential-privacy budget would be exceeded, or the run asks
for more work than the site's policy allows: client/site_policy.py)."""
SITE_BAD_INPUT = 1002
"""The site cannot take part: bad data or settings; the reason says what to fix."""
SITE_FAILED = 1003
"""An unexpected failure at the site."""
SITE_APP_REFUSED = 1004
"""The site refuses the run's app: not its installed cxr-fl app nor one it allows (--allow-app)."""

DISTILL_MESSAGE_TYPE = "train.distill"
STUDENT_START_KEY = "student-start"
"""ArrayRecord of a distillation message beside the teacher: the student the coordinator distilled
on public images (run setting ``kd-public-manifest``), from which every site fine-tunes its own."""
STUDENT_ROUND_MESSAGE_TYPE = "train.student"
STUDENT_FINAL_MESSAGE_TYPE = "evaluate.student"
BN_STATISTICS_MESSAGE_TYPE = "query.bn_statistics"
"""The server asks for the moments of every BatchNorm layer's input over the site's train split
under the model it sends (common/batchnorm_stats.py, run setting ``bn-statistics``)."""
BN_STATISTICS_RECORD = "bn-statistics"
"""The ArrayRecord of a statistics reply (per layer: mean and mean of squares)."""
BN_MODEL_KEY = "model"
"""Config key of a statistics message: which of the run's models it brings, "teacher" or "student"."""
BN_MODELS = ("teacher", "student")
FINISH_MESSAGE_TYPE = "query.finish"
"""The server's last message of a run: a site writes RUN_FINISHED_MARKER and may stop."""
RUN_FINISHED_MARKER = "run_finished.json"
EVALUATE_MODEL_MESSAGE_TYPE = "evaluate.model"
"""An evaluation-only run's message (run setting ``evaluate-model``): the site scores the model
it brings on its test split and replies with aggregates only (client/model_evaluation.py)."""
EVALUATE_MODEL_FORMAT_KEY = "model-format"
"""Config key of an evaluation message: ``state-dict`` or ``onnx`` (common/model_exchange.py)."""
EVALUATE_MODEL_ROLE_KEY = "model-role"
"""Config key of an evaluation message: the run's ``teacher`` or ``student`` architecture."""
ONNX_MODEL_RECORD = "onnx-model"
"""ArrayRecord of an evaluation message with an ONNX model: one uint8 array, the file's bytes."""
DELIVERED_STUDENT_MESSAGE_TYPE = "query.delivered_student"
"""The end of a training run with ``cross-site-matrix``: a site that opted in (and is not under
DP) replies with its delivered student's ONNX bytes (ONNX_MODEL_RECORD), scored at the others."""
AUDIT_RECORD = "audit"
"""ConfigRecord of a deployed site's finish reply: ``head``, the hash of its audit log's last entry
(client/site_audit.py), which the coordinator records as the site's anchor (common/audit.py)."""
WEIGHT_KEY = "num-examples"
SITE_RECORD = "site"
VALIDATE_INCOMING_KEY = "validate-incoming"
"""Train-message config flag: score the received global model on the validation split first."""
VALIDATION_RECORD = "validation"
"""The MetricRecord of a train reply holding the validation scores of the model the site received."""


_REASON = re.compile(r"^site '([^']*)': (.*)$", re.DOTALL)


# Paths (absolute or relative, quoted ones with spaces too) and file names of images and tables:
# folder and file names may carry patient identifiers.
_QUOTED_PATHS = re.compile(r"(?<!\w)(['\"])[^'\"\n]*[/\\][^'\"\n]*\1(?!\w)")
_PATHS = re.compile(
    r"[^\s'\"]*[/\\](?:[^\s'\"]*[^\s'\":;,.)])?|[^\s'\"/\\]+\.(?:png|jpe?g|dcm|bmp|tiff?|npz|csv|xlsx?|json|txt)\b",
    re.IGNORECASE,
)
PATH_PLACEHOLDER = "<path at the site>"


def scrub_paths(text: str) -> str:
    """``text`` without file paths or image names (the site's own log keeps the full text)."""
    text = _QUOTED_PATHS.sub(lambda m: f"{m.group(1)}{PATH_PLACEHOLDER}{m.group(1)}", text)
    return _PATHS.sub(PATH_PLACEHOLDER, text)


def error_reason(site: str, text: str) -> str:
    """The reason of a site's error reply: names the site (error replies carry no records) and
    leaves out paths and image names, which stay in the site's own log."""
    return f"site '{site}': {scrub_paths(text)}"


def parse_error_reason(reason: str) -> tuple[str | None, str]:
    """``(site, text)`` of a reason made by :func:`error_reason`; ``(None, reason)`` otherwise."""
    match = _REASON.match(reason)
    return (match.group(1), match.group(2)) if match else (None, reason)
