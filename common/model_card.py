"""Model cards of exported site students: one JSON (machine-readable) and one markdown page.

A card records what a hospital needs before deploying the student: where and on what it was
trained (site, split counts per class, whether the data was synthetic), its classes and task
kind, its decision rule (the site's operating point, in one line: common/operating_point.py),
test metrics of teacher and student on the site's test split, the DP epsilon of the
teacher it learnt from (or "not DP"), its size, parameters, FLOPs (with the counting convention),
median latency on the exporting machine, the KD settings, the SHA-256 of every exported file,
the creation date and an intended-use / limitations paragraph.

:data:`CARD_FIELDS` lists the top-level keys every card has; tests check against it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.markdown import table_lines

CARD_FORMAT = "cxr-fl-model-card-v1"
FLOPS_CONVENTION = (
    "forward FLOPs for one image, 2 FLOPs per multiply-add of convolutions and matrix products "
    "(torch.utils.flop_counter); elementwise ops, norms and pooling not counted"
)

CARD_FIELDS: tuple[str, ...] = (
    "format",
    "model_name",
    "site",
    "created",
    "task",
    "task_kind",
    "classes",
    "image_size",
    "data_source",
    "synthetic_data",
    "data_counts",
    "class_counts",
    "operating_point",
    "metrics",
    "teacher",
    "teacher_dp_epsilon",
    "distillation",
    "size_mb",
    "parameters",
    "flops",
    "flops_convention",
    "latency",
    "onnx_max_abs_diff",
    "files",
    "intended_use",
)


@dataclass(frozen=True)
class ModelCard:
    """Everything the card says; see the module docstring."""

    model_name: str
    site: str
    task: str
    task_kind: str
    classes: tuple[str, ...]
    image_size: int
    data_source: str
    synthetic_data: bool
    data_counts: dict[str, int]
    class_counts: dict[str, dict[str, int]]
    metrics: dict[str, dict[str, float]]
    teacher: dict[str, Any]
    teacher_dp_epsilon: float | None
    distillation: dict[str, Any]
    size_mb: float
    parameters: int
    flops: int
    latency: dict[str, Any]
    onnx_max_abs_diff: float
    files: dict[str, str]
    operating_point: str = "argmax (the model's own rule)"
    """The decision rule in one line (:meth:`common.operating_point.OperatingPoint.describe`)."""
    created: str = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0).isoformat())
    flops_convention: str = FLOPS_CONVENTION
    format: str = CARD_FORMAT

    @property
    def intended_use(self) -> str:
        return intended_use_text(self.synthetic_data)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["classes"] = list(self.classes)
        out["intended_use"] = self.intended_use
        out["metrics"] = {part: {k: _finite(v) for k, v in m.items()} for part, m in self.metrics.items()}
        return {key: out[key] for key in CARD_FIELDS}


def _finite(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def intended_use_text(synthetic: bool) -> str:
    text = (
        "Research use only. This model is not a medical device, has not been clinically validated and must "
        "not be used to diagnose, triage or treat patients. Its metrics come from one site's small held-out "
        "split and may not transfer to other hospitals, scanners, populations or image-processing chains; "
        "check it on local data first. Grad-CAM maps show where the model looked, not why it is right."
    )
    if synthetic:
        text += (
            " WARNING: it was trained and evaluated on procedurally generated synthetic images, not"
            " radiographs;"
            " its outputs on real chest X-rays are meaningless."
        )
    return text


def split_metrics(
    metrics: Mapping[str, float], prefixes: tuple[str, ...] = ("teacher_", "student_", "nokd_")
) -> dict[str, dict[str, float]]:
    """``{"teacher": {...}, "student": {...}}`` from flat ``teacher_auroc_macro``-style keys."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                out.setdefault(prefix.rstrip("_"), {})[key[len(prefix) :]] = float(value)
    return out


def render_markdown(card: ModelCard) -> str:
    """The card as a markdown page."""
    eps = "not DP (the teacher was trained without differential privacy)"
    if card.teacher_dp_epsilon is not None:
        eps = f"epsilon = {card.teacher_dp_epsilon:.3f} (DP-SGD at this site; see the privacy ledger)"
    lines = [
        f"# Model card: {card.model_name} ({card.site})",
        "",
        f"Created {card.created}. Task `{card.task}` ({card.task_kind}), "
        f"{card.image_size} px greyscale input.",
        "",
        "## Intended use and limitations",
        "",
        card.intended_use,
        "",
        "## Data (this site only)",
        "",
        f"Source: {card.data_source}"
        + (" (synthetic images, not radiographs)." if card.synthetic_data else "."),
        "",
    ]
    lines += table_lines(
        ["split", "images", *card.classes],
        [
            [part, n, *(card.class_counts.get(part, {}).get(c, "") for c in card.classes)]
            for part, n in card.data_counts.items()
        ],
        align="lr" + "r" * len(card.classes),
    )
    lines += [
        "",
        "## Decision rule",
        "",
        f"Operating point: {card.operating_point}. `cxr-fl-client predict`, `evaluate` and `explain` "
        "decide with it (`--ignore-operating-point`: the plain argmax).",
        "",
        "## Test metrics (site test split)",
        "",
    ]
    columns = list(card.metrics)
    names = sorted({k for m in card.metrics.values() for k in m if "/" not in k})
    per_class_names = sorted({k for m in card.metrics.values() for k in m if "/" in k})
    lines += table_lines(
        ["metric", *columns],
        [[name, *(_cell(card.metrics[c].get(name)) for c in columns)] for name in [*names, *per_class_names]],
        align="l" + "r" * len(columns),
    )
    d = card.distillation
    lines += [
        "",
        "## Model",
        "",
        f"- student: `{card.model_name}`; teacher: `{card.teacher.get('name')}` "
        f"({card.teacher.get('parameters', 0):,} parameters)",
        f"- teacher DP: {eps}",
        f"- knowledge distillation: {', '.join(f'{k}={v}' for k, v in d.items())}",
        f"- size: {card.size_mb:.2f} MB (ONNX file); parameters: {card.parameters:,}",
        f"- FLOPs: {card.flops / 1e6:.1f} M ({card.flops_convention})",
        f"- latency on the exporting machine: median {card.latency.get('median_ms', float('nan')):.2f} ms "
        f"({card.latency.get('runtime')}, batch 1, {card.latency.get('threads')} threads, "
        f"{card.latency.get('repeats')} runs)",
        f"- ONNX Runtime vs PyTorch: max abs logit difference {card.onnx_max_abs_diff:.2e} "
        f"on {card.latency.get('parity_images', '?')} test images",
        "",
        "## Files (SHA-256)",
        "",
    ]
    lines += table_lines(["file", "sha256"], [[name, f"`{digest}`"] for name, digest in card.files.items()])
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}"


def write_model_card(card: ModelCard, out_dir: Path, *, stem: str = "model_card") -> tuple[Path, Path]:
    """``<stem>.md`` and ``<stem>.json`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{stem}.md"
    md.write_text(render_markdown(card), encoding="utf-8")
    js = out_dir / f"{stem}.json"
    js.write_text(json.dumps(card.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
    return md, js
