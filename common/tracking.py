"""Local experiment tracking of federated runs: TensorBoard event files in the run's own folder.

Opt-in with the run setting ``track = "tensorboard"`` (``cxr-fl-server start --track
tensorboard``, ``python -m simulation run --track tensorboard``); the default ``""`` tracks
nothing. Events go to ``RUN_DIR/tensorboard/`` and are read with
``tensorboard --logdir RUN_DIR/tensorboard`` (it serves on localhost only by default).

Why TensorBoard, and not MLflow: both are well kept and widely used; but

* TensorBoard's ``SummaryWriter`` (through ``torch.utils.tensorboard``) only ever appends to
  local event files: there is no tracking URI, no server, no client telemetry, nothing that
  could send data off the machine, which is what a hospital consortium must be able to show.
  MLflow 3 is a client of a tracking server (local file or SQLite stores are one choice of
  URI among remote ones), and its client collects usage telemetry unless switched off.
* It is small: ``tensorboard`` adds five pure-Python or prebuilt packages (absl-py, markdown,
  werkzeug, tensorboard-data-server) beside what Flower already installs (grpcio, protobuf);
  ``mlflow-skinny`` adds sixteen, among them the Databricks SDK, google-auth and OpenTelemetry.
* The learning curves people want to watch are scalars per round, which TensorBoard shows
  live while the run goes on; text (settings, summary, model cards) renders as markdown, and
  images (learning-curve PNG) have their own tab.

What is logged (:class:`RunTracker`): round metrics (``global/*`` per round, ``site/<site>/*``
per site and round), DP epsilon per site (``dp_epsilon/<site>``), distillation and federated
student results (``distillation/<site>/*``, ``federated_student/<site>/*``), the run settings,
the summary and model cards as text, and aggregate figures as images. Only scalars of the
metric rows a coordinator already keeps are logged, never an image or a per-image value; site
names and metric names come from sites and are reduced to a safe character set. A failure to
write an event never stops a run: it is logged as a warning.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ConfigError
from common.markdown import table

logger = logging.getLogger(__name__)

TRACKERS = ("tensorboard",)
TRACK_DIR = "tensorboard"
INSTALL_HINT = "install the optional extra: pip install 'cxr-fl[track]' (TensorBoard)"

# Row fields that describe a row rather than measure something.
_ROW_FIELDS = frozenset({"round", "phase", "site", "node_id", "status", "reason"})
_PHASE_PREFIX = {
    "train": "site",
    "evaluate": "site",
    "distill": "distillation",
    "student": "federated_student",
    "student-final": "federated_student",
}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")
_NAME_LIMIT = 64


@dataclass(frozen=True)
class TrackingSettings:
    """The run setting ``track``: ``""`` (off) or ``"tensorboard"``."""

    track: str = ""

    def __post_init__(self) -> None:
        check_tracker(self.track)

    @property
    def enabled(self) -> bool:
        return bool(self.track)


def check_tracker(name: str) -> str:
    """``name`` if it is a known tracker ("" for none) whose library is installed; else ConfigError."""
    if name == "":
        return name
    if name == "mlflow":
        raise ConfigError(
            "track",
            name,
            "'tensorboard' or '' (off): cxr-fl tracks runs with TensorBoard event files, which never "
            "leave the machine (see common/tracking.py for why not MLflow)",
        )
    if name not in TRACKERS:
        raise ConfigError("track", name, "'tensorboard' or '' (off)")
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("track", name, f"an installed tracker; {INSTALL_HINT}")
    return name


def safe_name(text: object) -> str:
    """A tag component from untrusted text (a site's self-declared name, a metric key)."""
    cleaned = _UNSAFE.sub("_", str(text)).strip("._")[:_NAME_LIMIT]
    return cleaned or "unnamed"


def local_log_dir(path: Path | str) -> Path:
    """``path`` as an absolute local folder; a URI (``s3://``, ``gs://``, ``http://``...) is refused.

    SummaryWriter hands ``scheme://`` paths to remote file systems when TensorFlow is installed;
    tracking must stay on this machine, so only plain local paths are accepted.
    """
    text = str(path)
    if "://" in text or text.startswith(("\\\\", "//")):
        raise ConfigError("tracking folder", text, "a local folder path (remote locations are refused)")
    return Path(text).expanduser().resolve()


def row_scalars(row: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """The step and ``tag -> value`` of one metrics.jsonl row (finite numbers only)."""
    step = int(row.get("round", 0) or 0)
    phase = str(row.get("phase", ""))
    if phase == "aggregate":
        prefix = "global"
    elif phase in _PHASE_PREFIX:
        prefix = f"{_PHASE_PREFIX[phase]}/{safe_name(row.get('site'))}"
        if phase == "evaluate":
            prefix += "/evaluate"
    else:
        prefix = f"{safe_name(phase)}"
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in _ROW_FIELDS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not math.isfinite(value):
            continue
        out[f"{prefix}/{safe_name(key)}"] = float(value)
        if key == "dp_epsilon" and phase == "train":
            out[f"dp_epsilon/{safe_name(row.get('site'))}"] = float(value)
    return step, out


def settings_markdown(run_config: Mapping[str, Any]) -> str:
    """The run settings as a markdown table (what TensorBoard's text tab renders)."""
    rows = [[key, str(run_config[key]).replace("|", "\\|").replace("\n", " ")] for key in sorted(run_config)]
    return table(["setting", "value"], rows)


class RunTracker:
    """TensorBoard event files of one run under ``log_dir`` (see the module docstring)."""

    def __init__(self, log_dir: Path | str) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the 'tensorboard' package

        self.log_dir = local_log_dir(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer: Any = SummaryWriter(log_dir=str(self.log_dir), flush_secs=30)

    def _guard(self, what: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
            self._writer.flush()
        except Exception as exc:  # tracking must never break a run
            logger.warning("experiment tracking: could not log %s: %s", what, exc)

    def log_settings(self, run_config: Mapping[str, Any]) -> None:
        self._guard("the run settings", self._writer.add_text, "run/settings", settings_markdown(run_config))

    def log_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Scalars of metrics.jsonl rows (a RunFolder listener)."""

        def write() -> None:
            for row in rows:
                step, scalars = row_scalars(row)
                for tag, value in scalars.items():
                    self._writer.add_scalar(tag, value, step)

        self._guard("round metrics", write)

    def log_text(self, tag: str, markdown: str, step: int = 0) -> None:
        self._guard(f"text '{tag}'", self._writer.add_text, tag, markdown, step)

    def log_text_file(self, tag: str, path: Path) -> None:
        if Path(path).is_file():
            self.log_text(tag, Path(path).read_text(encoding="utf-8"))

    def log_image_file(self, tag: str, path: Path, step: int = 0) -> None:
        """A PNG figure (aggregate plots only: callers never pass an X-ray or an overlay)."""
        if not Path(path).is_file():
            return

        def write() -> None:
            from PIL import Image

            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self._writer.add_image(tag, pixels, step, dataformats="HWC")

        self._guard(f"image '{tag}'", write)

    def log_scalars(self, prefix: str, values: Mapping[str, Any], step: int = 0) -> None:
        """Finite numbers of a flat mapping as ``prefix/<key>`` scalars."""

        def write() -> None:
            for key, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                    self._writer.add_scalar(f"{prefix}/{safe_name(key)}", float(value), step)

        self._guard(f"scalars '{prefix}'", write)

    def close(self) -> None:
        try:
            self._writer.close()
        except Exception as exc:
            logger.warning("experiment tracking: could not close the event file: %s", exc)


def open_tracker(settings: TrackingSettings, run_dir: Path | str) -> RunTracker | None:
    """The run's tracker in ``RUN_DIR/tensorboard``, or None when tracking is off."""
    if not settings.enabled:
        return None
    tracker = RunTracker(Path(run_dir) / TRACK_DIR)
    logger.info("Experiment tracking: TensorBoard event files in %s", tracker.log_dir)
    return tracker
