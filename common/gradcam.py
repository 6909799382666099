"""Grad-CAM explanations of a model's decision on one image, and PNG overlays of them.

:func:`grad_cam` hooks one layer (by default the model's ``ModelSpec.gradcam_layer``, or any
dotted module name), runs the image forward, back-propagates the logit of the predicted (or a
chosen) class, weights each channel of the layer's activations by the spatial mean of its
gradient, keeps the positive part of the weighted sum and upsamples it (bilinear) to the image
size, scaled to [0, 1]. The returned probability is the softmax (multi-class) or sigmoid
(multi-label) of that class. Inference only: the model's parameters are not modified and its
train/eval mode is restored.

:func:`save_overlay` writes the greyscale image with the heat map on top as a PNG (matplotlib,
Agg backend) titled with the class and its probability.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ModelError
from common.tasks import Task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GradCamResult:
    """A heat map ``[S, S]`` in [0, 1] for ``class_index`` and that class's probability."""

    heatmap: np.ndarray
    class_index: int
    class_name: str
    probability: float
    layer: str


def layer_names(model: nn.Module) -> list[str]:
    """Dotted names of every sub-module (those Grad-CAM can hook)."""
    return [name for name, _ in model.named_modules() if name]


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The sub-module called ``name``; ModelError listing close or typical names otherwise."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    names = layer_names(model)
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    top = [n for n in names if "." not in n]
    suggestions = list(dict.fromkeys(close + top))[:8]
    raise ModelError(
        f"layer '{name}' does not exist in {type(model).__name__}; choose a module name such as "
        f"{', '.join(repr(s) for s in suggestions)} ({len(names)} modules in all)"
    )


def default_layer(model_name: str) -> str:
    """The registered Grad-CAM layer of a model name."""
    from common.models import get_spec

    return get_spec(model_name).gradcam_layer


def grad_cam(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    task: Task,
    *,
    layer: str,
    class_index: int | None = None,
) -> GradCamResult:
    """Grad-CAM of ``model`` on one normalised image ``[C, S, S]`` (or ``[1, C, S, S]``).

    ``class_index`` None explains the predicted class (argmax of the logits).
    """
    x = torch.as_tensor(np.asarray(image, dtype=np.float32)).float()
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[0] != 1:
        raise ModelError(f"Grad-CAM takes one image [C, S, S] or [1, C, S, S], got shape {tuple(x.shape)}")
    target = resolve_layer(model, layer)
    captured: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: object, output: object) -> None:
        tensor = output[0] if isinstance(output, tuple) else output
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 4:
            return
        tensor.retain_grad()
        captured["act"] = tensor

    handle = target.register_forward_hook(keep)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(x.requires_grad_(True))
            if "act" not in captured:
                raise ModelError(
                    f"layer '{layer}' does not output a [B, C, H, W] feature map (Grad-CAM needs one); "
                    "choose a convolutional block"
                )
            if logits.ndim != 2 or logits.shape[1] != task.num_classes:
                raise ModelError(
                    f"model gives logits of shape {tuple(logits.shape)}, task '{task.name}' has "
                    f"{task.num_classes} classes"
                )
            index = int(logits[0].argmax()) if class_index is None else int(class_index)
            if not 0 <= index < task.num_classes:
                raise ModelError(
                    f"class index {index} is out of range for task '{task.name}' (0..{task.num_classes - 1})"
                )
            model.zero_grad(set_to_none=True)
            logits[0, index].backward()
        act = captured["act"].detach()[0]
        grad = captured["act"].grad
        if grad is None:
            raise ModelError(f"no gradient reached layer '{layer}'; choose a layer the output depends on")
        weights = grad.detach()[0].mean(dim=(1, 2))
        cam = F.relu((weights[:, None, None] * act).sum(dim=0))
        cam = F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
        peak = float(cam.max())
        heat = (cam / peak if peak > 0 else torch.zeros_like(cam)).clamp(0.0, 1.0).numpy()
        with torch.no_grad():
            scores = torch.sigmoid(logits[0]) if task.is_multilabel else torch.softmax(logits[0], dim=0)
        probability = float(scores[index])
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return GradCamResult(heat.astype(np.float32), index, task.classes[index], probability, layer)


def save_overlay(
    grey: np.ndarray, result: GradCamResult, path: Path, *, alpha: float = 0.4, title: str | None = None
) -> Path:
    """PNG of the greyscale image (uint8 or float ``[S, S]``) with the heat map overlaid."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(4, 4.3), dpi=100)
    axes = figure.add_subplot(1, 1, 1)
    axes.imshow(np.asarray(grey), cmap="gray", interpolation="nearest")
    axes.imshow(result.heatmap, cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear")
    axes.set_axis_off()
    heading = f"{result.class_name}: p = {result.probability:.3f}"
    axes.set_title(f"{title}\n{heading}" if title else heading, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path
