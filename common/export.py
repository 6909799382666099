"""Edge export of a trained model: ONNX and TorchScript files, their preprocessing, and checks.

What a hospital deploys is an ONNX file plus ``<name>.preprocessing.json`` beside it:

* ONNX (legacy TorchScript-based exporter, ``dynamo=False``, opset 17): one input ``image``
  float32 ``[B, C, S, S]`` already normalised, one output ``logits`` ``[B, num_classes]``; the
  batch axis is dynamic. :func:`check_onnx_parity` runs ONNX Runtime against PyTorch on real
  images and raises :class:`~common.errors.ModelError` when they differ by more than 1e-4.
* TorchScript (``torch.jit.trace`` in eval mode) for PyTorch-only deployments.
* :class:`Preprocessing`: everything needed to turn an image file into the model's input the
  way training did -- decode to 8-bit greyscale (:func:`common.data.readers.decode_image_file`),
  resize the shorter side to ``image_size`` and centre-crop (:func:`common.data.cache.resize_square`),
  scale to [0, 1], ``(x - mean) / std`` with :data:`common.data.dataset.NORMALISATION` -- plus the
  class names and how logits become probabilities (softmax for multi-class, sigmoid per finding
  for multi-label), and the site's operating point (``operating_point``, optional: the decision
  rule the site fitted on its validation split, :mod:`common.operating_point`; an export without
  one decides by argmax / 0.5 per finding).

:class:`OnnxPredictor` is the deployed side: it reads the JSON beside the model (a clear error
if it is missing), preprocesses image files exactly like the cache, runs ONNX Runtime and decides
at the export's operating point.
:func:`measure_latency` gives the median latency of batch-1 inference on this machine.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.config import ModelConfig
from common.data.cache import PREPROCESS_VERSION, resize_square
from common.data.dataset import NORMALISATION
from common.data.readers import IMAGE_SUFFIXES, decode_image_file
from common.errors import DataError, ModelError
from common.operating_point import OperatingPoint
from common.run_settings import from_mapping, to_mapping
from common.tasks import Task, get_task

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
OPSET = 17
PARITY_TOLERANCE = 1e-4
PREPROCESSING_SUFFIX = ".preprocessing.json"
PREPROCESSING_FORMAT = "cxr-fl-preprocessing-v1"
MODEL_METADATA_FORMAT = "cxr-fl-torch-model-v1"
WEIGHTS_NAME = "student.pt"
RESIZE_DESCRIPTION = (
    "decode to 8-bit greyscale (16-bit images stretched min..max), resize the shorter side to image_size "
    "(PIL bilinear), centre-crop the longer side to image_size"
)


@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes the model input, and how logits become probabilities.

    ``input = (pixel / 255 - mean) / std`` on the greyscale image resized as described in
    ``resize`` (then histogram-equalised when ``equalize`` is true, as the model was trained:
    run setting ``preprocess-equalize``); ``activation`` is ``softmax`` (multi-class) or
    ``sigmoid`` (multi-label). ``operating_point``: the site's decision rule, fitted on its
    validation split (common/operating_point.py); None (an export without one): the argmax.
    """

    image_size: int
    classes: tuple[str, ...]
    task: str
    task_kind: str
    mean: float = NORMALISATION["mean"]
    std: float = NORMALISATION["std"]
    in_channels: int = 1
    greyscale: bool = True
    scale: float = 1.0 / 255.0
    resize: str = RESIZE_DESCRIPTION
    resize_version: str = PREPROCESS_VERSION
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    input_layout: str = "NCHW float32"
    format: str = PREPROCESSING_FORMAT
    equalize: bool = False
    equalize_method: str = ""
    operating_point: OperatingPoint | None = None

    @property
    def activation(self) -> str:
        return "sigmoid" if self.task_kind == "multilabel" else "softmax"

    @classmethod
    def for_task(
        cls,
        task: Task,
        image_size: int,
        in_channels: int = 1,
        *,
        equalize: bool = False,
        operating_point: OperatingPoint | None = None,
    ) -> Preprocessing:
        from common.data.preprocess import EQUALIZE_METHOD

        return cls(
            image_size=image_size,
            classes=tuple(task.classes),
            task=task.name,
            task_kind=task.kind,
            in_channels=in_channels,
            equalize=equalize,
            equalize_method=EQUALIZE_METHOD if equalize else "",
            operating_point=operating_point,
        )

    @property
    def decision_rule(self) -> OperatingPoint:
        """The site's operating point, or the model's own rule (argmax / 0.5) without one."""
        return self.operating_point or OperatingPoint.model_rule(self.task_kind, self.classes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["classes"] = list(self.classes)
        out["activation"] = self.activation
        if self.operating_point is None:
            del out["operating_point"]
        else:
            out["operating_point"] = self.operating_point.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "preprocessing JSON") -> Preprocessing:
        if data.get("format") != PREPROCESSING_FORMAT:
            raise ModelError(
                f"{source} has format {data.get('format')!r}, expected {PREPROCESSING_FORMAT!r}; "
                "re-export the model with this version of cxr-fl"
            )
        try:
            return cls(
                image_size=int(data["image_size"]),
                classes=tuple(str(c) for c in data["classes"]),
                task=str(data["task"]),
                task_kind=str(data["task_kind"]),
                mean=float(data["mean"]),
                std=float(data["std"]),
                in_channels=int(data.get("in_channels", 1)),
                greyscale=bool(data.get("greyscale", True)),
                scale=float(data.get("scale", 1.0 / 255.0)),
                resize=str(data.get("resize", RESIZE_DESCRIPTION)),
                resize_version=str(data.get("resize_version", PREPROCESS_VERSION)),
                input_name=str(data.get("input_name", INPUT_NAME)),
                output_name=str(data.get("output_name", OUTPUT_NAME)),
                equalize=_json_bool(data.get("equalize", False), "equalize"),
                equalize_method=str(data.get("equalize_method", "")),
                operating_point=read_operating_point(
                    data.get("operating_point"), data["classes"], str(data["task_kind"]), source
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{source} is missing or has a bad field ({exc}); re-export the model") from None

    def normalise(self, grey: np.ndarray) -> np.ndarray:
        """uint8 [S, S] -> float32 [C, S, S] model input."""
        x = (grey.astype(np.float32) * np.float32(self.scale) - np.float32(self.mean)) / np.float32(self.std)
        return np.repeat(x[None], self.in_channels, axis=0)

    def load_grey(self, path: Path) -> np.ndarray:
        """Decode and resize one image file like the training cache -> uint8 [S, S] (DataError if bad)."""
        grey = decode_image_file(Path(path))
        if grey.ndim != 2 or grey.size == 0:
            raise DataError(f"image {path} decoded to shape {grey.shape}, not a 2-D image")
        if self.resize_version != PREPROCESS_VERSION:
            logger.warning(
                "model was exported with resize %s; this version resizes with %s",
                self.resize_version,
                PREPROCESS_VERSION,
            )
        resized = resize_square(grey, self.image_size)
        if self.equalize:
            from common.data.preprocess import equalize_images

            resized = equalize_images(resized)
        return resized

    def load_image(self, path: Path) -> np.ndarray:
        """Decode, resize and normalise one image file -> float32 [C, S, S] (DataError if unreadable)."""
        return self.normalise(self.load_grey(path))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Softmax (multi-class) or sigmoid (multi-label) of ``[N, C]`` logits, float64."""
        z = np.asarray(logits, dtype=np.float64)
        if self.activation == "sigmoid":
            return 1.0 / (1.0 + np.exp(-z))
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def read_operating_point(
    data: Any, classes: Sequence[Any], task_kind: str, source: str
) -> OperatingPoint | None:
    """The ``operating_point`` of a model file (None when absent: an older export, the argmax),
    checked and matched against the model's classes and task kind (ModelError otherwise)."""
    if data is None:
        return None
    point = OperatingPoint.from_dict(data, f"{source}: operating_point")
    if point.classes != tuple(str(c) for c in classes) or point.task_kind != task_kind:
        raise ModelError(
            f"{source}: its operating_point is for {point.task_kind} classes {', '.join(point.classes)}, "
            "not the model's; re-export the model"
        )
    return point


def _json_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"'{name}' must be true or false, not {value!r}")
    return value


def preprocessing_path(model_path: Path) -> Path:
    """``<dir>/<stem>.preprocessing.json`` for ``<dir>/<stem>.onnx``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + PREPROCESSING_SUFFIX)


def write_preprocessing(prep: Preprocessing, model_path: Path) -> Path:
    path = preprocessing_path(model_path)
    path.write_text(json.dumps(prep.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def read_preprocessing(model_path: Path) -> Preprocessing:
    """The preprocessing JSON beside ``model_path`` (ModelError naming the expected file if absent)."""
    path = preprocessing_path(model_path)
    if not path.is_file():
        raise ModelError(
            f"no preprocessing file for model '{model_path}': expected '{path}' beside it (written by the "
            "site's export together with the ONNX file); copy it next to the model"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read preprocessing file '{path}': {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"preprocessing file '{path}' does not hold a JSON object")
    return Preprocessing.from_dict(data, f"preprocessing file '{path}'")


def _example_input(image_size: int, in_channels: int) -> torch.Tensor:
    return torch.zeros(1, in_channels, image_size, image_size)


def on_cpu(model: nn.Module) -> nn.Module:
    """``model`` itself when it lives on the CPU, else a CPU copy (a model trained on a GPU stays there)."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return model
    return copy.deepcopy(model).cpu()


def export_onnx(model: nn.Module, path: Path, image_size: int, in_channels: int = 1) -> Path:
    """Export ``model`` (eval mode) to ONNX: input ``image`` [B, C, S, S], output ``logits``.

    Export always runs on the CPU (on a CPU copy of a model that is on a GPU).
    """
    model = on_cpu(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            torch.onnx.export(
                model,
                (_example_input(image_size, in_channels),),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
    finally:
        model.train(was_training)
    logger.info("exported ONNX %s (%.2f MB)", path, path.stat().st_size / 1e6)
    return path


def export_torchscript(model: nn.Module, path: Path, image_size: int, in_channels: int = 1) -> Path:
    """Trace ``model`` (eval mode) and save it as TorchScript."""
    model = on_cpu(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch 2.14 marks jit.trace deprecated; TorchScript is still what PyTorch-only edge
            # runtimes (LibTorch, PyTorch Mobile) load, so keep exporting it while it works.
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(model, (_example_input(image_size, in_channels),), check_trace=False)
        traced.save(str(path))
    finally:
        model.train(was_training)
    return path


def make_session(path: Path, num_threads: int = 2) -> Any:
    """An ONNX Runtime CPU session with ``num_threads`` intra-op threads (one inter-op thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for unreadable models
        raise ModelError(f"ONNX Runtime cannot load '{path}': {exc}") from None


def run_session(session: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits of ``images`` [N, C, S, S] float32 through an ORT session, in batches."""
    name = session.get_inputs()[0].name
    outputs = [
        session.run(None, {name: np.ascontiguousarray(images[i : i + batch_size], dtype=np.float32)})[0]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)


def check_onnx_parity(
    model: nn.Module,
    onnx_path: Path,
    images: np.ndarray | torch.Tensor,
    *,
    tolerance: float = PARITY_TOLERANCE,
    num_threads: int = 2,
) -> float:
    """Max abs difference of logits between PyTorch and ONNX Runtime on ``images`` [N, C, S, S].

    Raises ModelError when it exceeds ``tolerance`` (the export is then not trustworthy).
    """
    batch = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if batch.ndim != 4 or len(batch) == 0:
        raise ModelError(f"parity check needs a non-empty [N, C, S, S] batch, got shape {tuple(batch.shape)}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(batch).float().numpy()
    finally:
        model.train(was_training)
    got = run_session(make_session(onnx_path, num_threads), batch.numpy())
    diff = float(np.max(np.abs(expected.astype(np.float64) - got.astype(np.float64))))
    if not np.isfinite(diff) or diff > tolerance:
        raise ModelError(
            f"ONNX model '{onnx_path}' disagrees with PyTorch: max abs logit difference {diff:.3g} > "
            f"{tolerance:g} "
            f"on {len(batch)} image(s); do not deploy it (re-export, or report the model and opset {OPSET})"
        )
    return diff


@dataclass(frozen=True)
class Latency:
    """Batch-1 latency of repeated runs, in milliseconds."""

    median_ms: float
    p90_ms: float
    repeats: int
    warmup: int
    runs_ms: list[float] = field(repr=False, default_factory=list)


def measure_latency(run: Callable[[], object], *, repeats: int = 50, warmup: int = 5) -> Latency:
    """Median (and p90) wall time of ``run()`` over ``repeats`` calls after ``warmup`` calls."""
    if repeats < 1:
        raise ModelError(f"latency repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        run()
    runs: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        runs.append((time.perf_counter() - start) * 1000.0)
    ordered = sorted(runs)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return Latency(statistics.median(runs), p90, repeats, warmup, runs)


def onnx_latency(
    path: Path,
    image_size: int,
    in_channels: int = 1,
    *,
    num_threads: int = 2,
    repeats: int = 50,
    warmup: int = 5,
) -> Latency:
    """ONNX Runtime latency of one image (batch 1) with ``num_threads`` threads."""
    session = make_session(path, num_threads)
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((1, in_channels, image_size, image_size)).astype(np.float32)
    return measure_latency(lambda: session.run(None, {name: x}), repeats=repeats, warmup=warmup)


def torch_latency(
    model: nn.Module, image_size: int, in_channels: int = 1, *, repeats: int = 20, warmup: int = 2
) -> Latency:
    """PyTorch eager latency of one image (batch 1, eval mode, no_grad) with the current threads."""
    x = torch.randn(1, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return measure_latency(lambda: model(x), repeats=repeats, warmup=warmup)
    finally:
        model.train(was_training)


def list_images(target: Path) -> list[Path]:
    """``target`` itself when it is a file; else the image files under the folder, sorted."""
    target = Path(target)
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise DataError(f"'{target}' is neither an image file nor a folder; check the path")
    return sorted(p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass(frozen=True)
class Prediction:
    """Class probabilities of one image file, or why it could not be read."""

    path: Path
    probabilities: dict[str, float] | None
    error: str | None = None
    decided: str | None = None
    """The decision at the predictor's rule (:attr:`OnnxPredictor.decision_rule`)."""

    @property
    def top_class(self) -> str | None:
        if not self.probabilities:
            return None
        return max(self.probabilities, key=lambda c: self.probabilities[c])  # type: ignore[index]


class OnnxPredictor:
    """An exported model and its preprocessing, ready to score image files with ONNX Runtime.

    Decisions are taken at the site's operating point the export carries, unless
    ``use_operating_point`` is False (then, as for an export without one, the model's own rule).
    """

    def __init__(self, model_path: Path, *, num_threads: int = 2, use_operating_point: bool = True) -> None:
        self.model_path = Path(model_path)
        self.use_operating_point = use_operating_point
        if not self.model_path.is_file():
            raise ModelError(
                f"model file '{self.model_path}' not found; give the path of the exported .onnx file"
            )
        self.preprocessing = read_preprocessing(self.model_path)
        self.session = make_session(self.model_path, num_threads)
        outputs = self.session.get_outputs()
        width = outputs[0].shape[-1] if outputs else None
        if isinstance(width, int) and width != len(self.preprocessing.classes):
            raise ModelError(
                f"model '{self.model_path}' has {width} outputs but its preprocessing file lists "
                f"{len(self.preprocessing.classes)} classes; the two files do not belong together"
            )

    @property
    def decision_rule(self) -> OperatingPoint:
        prep = self.preprocessing
        if self.use_operating_point:
            return prep.decision_rule
        return OperatingPoint.model_rule(prep.task_kind, prep.classes)

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, C]`` for preprocessed ``images`` ``[N, C, S, S]``."""
        return self.preprocessing.probabilities(run_session(self.session, images))

    def predict_files(self, paths: Sequence[Path]) -> list[Prediction]:
        """One :class:`Prediction` per file; unreadable files get ``error`` instead of probabilities."""
        results: list[Prediction] = []
        loaded: list[tuple[Path, np.ndarray]] = []
        for path in paths:
            try:
                loaded.append((Path(path), self.preprocessing.load_image(Path(path))))
            except DataError as exc:
                logger.warning("skipping %s: %s", path, exc)
                results.append(Prediction(Path(path), None, str(exc)))
        if loaded:
            probs = self.predict_arrays(np.stack([x for _, x in loaded]))
            classes = self.preprocessing.classes
            decided = self.decision_rule.decided_names(probs)
            for (path, _), row, decision in zip(loaded, probs, decided, strict=True):
                scores = {c: float(p) for c, p in zip(classes, row, strict=True)}
                results.append(Prediction(path, scores, decided=decision))
        order = {Path(p): i for i, p in enumerate(paths)}
        return sorted(results, key=lambda r: order.get(r.path, 0))


def model_metadata(
    config: ModelConfig,
    task: Task,
    image_size: int,
    role: str,
    *,
    equalize: bool = False,
    operating_point: OperatingPoint | None = None,
) -> dict[str, Any]:
    """The ``<weights>.json`` beside a state_dict, so it can be rebuilt (see :func:`load_torch_model`),
    with the site's operating point of the model when it has one."""
    meta = {
        "format": MODEL_METADATA_FORMAT,
        "role": role,
        "model": to_mapping(config),
        "task": task.name,
        "classes": list(task.classes),
        "image_size": image_size,
        "equalize": equalize,
    }
    if operating_point is not None:
        meta["operating_point"] = operating_point.to_dict()
    return meta


@dataclass
class LoadedModel:
    """A PyTorch model rebuilt from saved weights and their metadata."""

    model: nn.Module
    config: ModelConfig
    task: Task
    image_size: int
    path: Path
    equalize: bool = False
    operating_point: OperatingPoint | None = None

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.for_task(
            self.task,
            self.image_size,
            self.config.in_channels,
            equalize=self.equalize,
            operating_point=self.operating_point,
        )


def load_torch_model(path: Path) -> LoadedModel:
    """Rebuild a model saved by the site export.

    ``path`` is a weights file (``student.pt`` or ``teacher.pt``) with its ``<file>.json``
    metadata and ``<file>.sha256`` beside it, or a folder holding ``student.pt`` (the
    ``student/`` folder of a site's output). The checksum is verified before loading.
    """
    from common.checkpoint import load_metadata, load_model_state
    from common.models import build_model

    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.is_file():
        raise ModelError(
            f"no model weights at '{weights}': give a site's student folder (holding {WEIGHTS_NAME}) "
            "or a .pt "
            "file written by the site export"
        )
    meta = load_metadata(weights)
    if meta is None or meta.get("format") != MODEL_METADATA_FORMAT:
        raise ModelError(
            f"'{weights}' has no model metadata ('{weights.name}.json' with format "
            f"{MODEL_METADATA_FORMAT!r}) "
            "beside it, so the architecture is unknown; use the files written by the site export"
        )
    try:
        config = from_mapping(ModelConfig, dict(meta["model"]))
        task = get_task(str(meta["task"]))
        image_size = int(meta["image_size"])
        equalize = _json_bool(meta.get("equalize", False), "equalize")
        point = read_operating_point(
            meta.get("operating_point"), task.classes, task.kind, f"metadata '{weights.name}.json'"
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(
            f"metadata '{weights.name}.json' is incomplete ({exc}); re-export the model"
        ) from None
    model = build_model(config, task.num_classes)
    model.load_state_dict(load_model_state(weights))
    model.eval()
    return LoadedModel(model, config, task, image_size, weights, equalize, point)
