"""Grad-CAM: heat map shape and range, where it points, chosen classes, bad layers, overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from common.config import ModelConfig
from common.errors import ModelError
from common.gradcam import default_layer, grad_cam, resolve_layer, save_overlay
from common.models import build_model
from common.tasks import get_task

SIZE = 32
TASK = get_task("normal-pneumonia-covid")


class _Spotter(nn.Module):
    """Feature map = ReLU(image); class 0 = mean of it, other classes = minus the mean."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU())
        self.head = nn.Linear(1, 3)
        with torch.no_grad():
            self.features[0].weight.fill_(1.0)
            self.head.weight.copy_(torch.tensor([[1.0], [-1.0], [-1.0]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def test_heat_map_points_at_the_evidence() -> None:
    image = torch.zeros(1, SIZE, SIZE)
    image[0, 2:8, 20:28] = 3.0  # a bright patch, top right
    result = grad_cam(_Spotter(), image, TASK, layer="features")
    assert result.class_index == 0
    assert result.class_name == "normal"
    assert result.heatmap.shape == (SIZE, SIZE)
    assert result.heatmap.dtype == np.float32
    assert result.heatmap.min() >= 0.0
    assert result.heatmap.max() == pytest.approx(1.0)
    row, col = np.unravel_index(result.heatmap.argmax(), result.heatmap.shape)
    assert 2 <= row < 8
    assert 20 <= col < 28
    assert result.heatmap[20:, :10].max() == 0.0  # nothing where the image is empty
    logits = torch.tensor([1.0, -1.0, -1.0]) * image.clamp(min=0).mean()
    assert result.probability == pytest.approx(float(torch.softmax(logits, 0)[0]), rel=1e-5)


def test_chosen_class_with_negative_evidence_gives_an_empty_map() -> None:
    image = torch.zeros(1, SIZE, SIZE)
    image[0, 10:20, 10:20] = 2.0
    result = grad_cam(_Spotter(), image, TASK, layer="features", class_index=1)
    assert result.class_name == "pneumonia"
    assert result.heatmap.max() == 0.0  # the patch lowers class 1: ReLU removes it


@pytest.mark.parametrize("name", ["tiny-cnn", "mobilenetv2", "resnet18"])
def test_registered_models_at_their_default_layer(name: str) -> None:
    width = 0.35 if name == "mobilenetv2" else 1.0
    model = build_model(ModelConfig(name=name, width_mult=width), TASK.num_classes).eval()
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():  # no ties between classes in an untrained model
        last.bias.add_(torch.tensor([-0.2, 0.3, 0.0]))
    x = torch.randn(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = grad_cam(model, x, TASK, layer=default_layer(name))
    assert result.heatmap.shape == (SIZE, SIZE)
    assert result.heatmap.min() >= 0.0
    assert result.heatmap.max() <= 1.0
    assert result.class_index == int(probs.argmax())
    assert result.probability == pytest.approx(float(probs.max()), rel=1e-5)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_dual_teacher_works_at_a_tiny_size() -> None:
    model = build_model(ModelConfig(name="resnet50v2-vgg19"), TASK.num_classes).eval()
    result = grad_cam(model, torch.randn(1, SIZE, SIZE), TASK, layer=default_layer("resnet50v2-vgg19"))
    assert result.heatmap.shape == (SIZE, SIZE)
    assert result.layer == "resnet.layer4"


def test_unknown_layer_lists_valid_names() -> None:
    model = build_model(ModelConfig(name="tiny-cnn"), TASK.num_classes)
    with pytest.raises(ModelError, match=r"layer 'featurs\.2' does not exist in TinyCnn.*'features\.2'"):
        resolve_layer(model, "featurs.2")
    with pytest.raises(ModelError, match="'head'"):
        grad_cam(model, torch.zeros(1, SIZE, SIZE), TASK, layer="no.such.layer")


def test_layer_without_a_feature_map_and_bad_class_are_refused() -> None:
    model = build_model(ModelConfig(name="tiny-cnn"), TASK.num_classes)
    with pytest.raises(ModelError, match=r"\[B, C, H, W\] feature map"):
        grad_cam(model, torch.zeros(1, SIZE, SIZE), TASK, layer="head")
    with pytest.raises(ModelError, match="out of range"):
        grad_cam(model, torch.zeros(1, SIZE, SIZE), TASK, layer="features", class_index=3)


def test_overlay_png_is_written(tmp_path: Path) -> None:
    image = torch.zeros(1, SIZE, SIZE)
    image[0, 4:9, 4:9] = 2.0
    result = grad_cam(_Spotter(), image, TASK, layer="features")
    grey = (np.random.default_rng(0).random((SIZE, SIZE)) * 255).astype(np.uint8)
    path = save_overlay(grey, result, tmp_path / "cams" / "x.png", title="x.png")
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size[0] > SIZE
