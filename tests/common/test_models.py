"""Tests of the model zoo: registry, shapes, norm choice, sizes, FLOPs and Opacus compatibility."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.config import ModelConfig
from common.errors import ModelError, PrivacyError, UnknownNameError
from common.models import (
    MODELS,
    build_model,
    count_flops,
    count_parameters,
    get_spec,
    has_depthwise_convolutions,
    list_models,
    to_standard_layout,
    to_training_layout,
)
from common.models.norms import group_count, make_norm
from common.privacy import check_model_is_private_compatible

# Parameter counts for num_outputs=3, in_channels=1 (identical for both norms: BatchNorm and
# GroupNorm both carry a weight and a bias per channel). A change here is an architecture change.
EXPECTED_PARAMETERS: dict[str, int] = {
    "densenet121": 6_950_659,
    "mobilenetv2": 2_227_139,
    "resnet18": 11_171_779,
    "resnet50v2-vgg19": 43_530_499,
    "tiny-cnn": 6_043,
}
SMALL = 32  # the smallest size every registered model accepts (all downsample by 32 at most)


def _build(name: str, norm: str = "group", **kwargs: object) -> nn.Module:
    return build_model(ModelConfig(name=name, norm=norm, **kwargs), num_outputs=3)  # type: ignore[arg-type]


def test_registry_lists_every_model_by_role() -> None:
    assert list_models() == sorted(EXPECTED_PARAMETERS)
    assert list_models("teacher") == ["densenet121", "resnet18", "resnet50v2-vgg19"]
    assert list_models("student") == ["mobilenetv2"]
    assert list_models("test") == ["tiny-cnn"]
    with pytest.raises(ModelError, match="teacher, student, test"):
        list_models("professor")


def test_unknown_model_name_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        ModelConfig(name="resnet-9000")
    message = str(info.value)
    assert "resnet-9000" in message
    for name in EXPECTED_PARAMETERS:
        assert name in message
    with pytest.raises(UnknownNameError, match="densenet121"):
        get_spec("vgg16")


@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_forward_shape_parameters_and_norm(name: str, norm: str) -> None:
    model = _build(name, norm)
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 1, SMALL, SMALL))
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
    assert count_parameters(model) == EXPECTED_PARAMETERS[name]

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.GroupNorm)]
    assert norms, "every registered model normalises"
    wanted = nn.BatchNorm2d if norm == "batch" else nn.GroupNorm
    assert all(isinstance(m, wanted) for m in norms), f"{name}: mixed norms in {norm} mode"
    for module in norms:
        if isinstance(module, nn.GroupNorm):
            assert module.num_channels % module.num_groups == 0
            assert module.num_groups == math.gcd(module.num_channels, 32)

    # Opacus: no activation may modify its input in place.
    assert not [n for n, m in model.named_modules() if getattr(m, "inplace", False) is True]
    # Grad-CAM's default layer exists and produces feature maps.
    layer = dict(model.named_modules())[get_spec(name).gradcam_layer]
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        model(torch.randn(1, 1, SMALL, SMALL))
    handle.remove()
    assert len(seen) == 1
    assert seen[0].dim() == 4


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_rgb_input_channels(name: str) -> None:
    model = _build(name, in_channels=3).eval()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 3
    with torch.no_grad():
        assert model(torch.randn(1, 3, SMALL, SMALL)).shape == (1, 3)
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 1, SMALL, SMALL))


def test_group_count_divides_channels() -> None:
    assert [group_count(c) for c in (8, 24, 64, 96, 144, 1024, 1280)] == [8, 8, 32, 32, 16, 32, 32]
    with pytest.raises(ValueError, match="one of batch, group"):
        make_norm("layer", 8)


def test_width_multiplier() -> None:
    slim = _build("mobilenetv2", width_mult=0.5)
    assert count_parameters(slim) < EXPECTED_PARAMETERS["mobilenetv2"] / 2
    assert slim.features[0][0].out_channels == 16
    with pytest.raises(ModelError, match="no width multiplier"):
        _build("resnet18", width_mult=0.5)


def _channels_last(model: nn.Module) -> bool:
    """Every kernel whose two layouts differ has channels-last strides (is_contiguous() cannot
    tell: a kernel with a dimension of size 1 counts as contiguous in both)."""
    kernels = [p for p in model.parameters() if p.dim() == 4]
    channels_last = [
        p.stride() == torch.empty_like(p, memory_format=torch.channels_last).stride() for p in kernels
    ]
    standard = [p.stride() == torch.empty(p.shape).stride() for p in kernels]
    return all(cl or std for cl, std in zip(channels_last, standard, strict=True)) and not all(standard)


def test_only_a_depthwise_network_on_the_cpu_trains_channels_last() -> None:
    student, teacher = _build("mobilenetv2", width_mult=0.5), _build("resnet18")
    assert has_depthwise_convolutions(student)
    assert not has_depthwise_convolutions(teacher)
    x = torch.randn(2, 1, SMALL, SMALL)
    before = student.eval()(x)

    assert _channels_last(to_training_layout(student, "cpu"))
    assert not _channels_last(to_training_layout(teacher, "cpu"))
    assert not _channels_last(to_training_layout(_build("mobilenetv2"), "meta"))
    assert torch.allclose(student(x), before, atol=1e-5)  # the same function, another layout
    restored = to_standard_layout(student)
    assert all(p.stride() == torch.empty(p.shape).stride() for p in restored.parameters())


def test_dropout_only_in_training() -> None:
    model = _build("tiny-cnn", dropout=0.5)
    x = torch.randn(4, 1, SMALL, SMALL)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_count_parameters_and_flops_by_hand() -> None:
    model = _build("tiny-cnn")
    # convs (no bias): 8*1*9 + 16*8*9 + 32*16*9; GroupNorm 2 per channel; linear 32*3 + 3.
    assert count_parameters(model) == 72 + 1152 + 4608 + 2 * (8 + 16 + 32) + 99
    model.features[0][0].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - 72
    # multiply-adds at 32 px: 32x32, 16x16 and 8x8 output maps, then the linear layer; x2 FLOPs.
    macs = 72 * 32 * 32 + 1152 * 16 * 16 + 4608 * 8 * 8 + 32 * 3
    model.train()
    assert count_flops(model, 32, 1) == 2 * macs
    assert model.training  # mode restored
    assert count_flops(model, 64, 1) == 2 * (4 * (macs - 96) + 96)


def _one_dp_step(model: nn.Module) -> nn.Module:
    """One Opacus DP-SGD step on 2 images of 32 px; returns the wrapped model."""
    data = TensorDataset(torch.randn(2, 1, SMALL, SMALL), torch.tensor([0, 2]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure-RNG and accountant notices
        private, optimizer, loader = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(data, batch_size=2),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
        )
    images, labels = next(iter(loader))
    optimizer.zero_grad()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")  # inputs need no grad
        nn.functional.cross_entropy(private(images), labels).backward()
    optimizer.step()
    return private


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_opacus_dp_step_with_group_norm(name: str) -> None:
    # (resnet18 uses OutOfPlaceBasicBlock: torchvision's `out += identity` and in-place ReLU
    # modify a hooked layer's output in place, which Opacus' hooks mode cannot handle)
    model = _build(name, "group")
    assert ModuleValidator.validate(model, strict=False) == []
    before = {k: v.clone() for k, v in model.state_dict().items()}
    private = _one_dp_step(model)
    params = [p for p in private.parameters() if p.requires_grad]
    assert all(p.grad_sample is not None and p.grad_sample.shape[0] == 2 for p in params)
    assert all(torch.isfinite(p.grad).all() for p in params)
    after = private._module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_a_batch_norm_model_is_refused_for_dp_naming_the_layers(name: str) -> None:
    # BatchNorm normalises each image with statistics of the whole batch, so one image's
    # gradient depends on the others: per-sample gradients (hence DP-SGD) are undefined.
    with pytest.raises(PrivacyError, match="BatchNorm") as refused:
        check_model_is_private_compatible(_build(name, "batch"))
    assert "norm='group'" in str(refused.value)  # and it says what to change
    check_model_is_private_compatible(_build(name, "group"))  # the same model with GroupNorm passes


def test_every_registered_model_is_tested() -> None:
    assert set(MODELS) == set(EXPECTED_PARAMETERS)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_mobilenetv2_residual_blocks_start_as_the_identity(norm: str) -> None:
    from torchvision.models.mobilenetv2 import InvertedResidual

    model = _build("mobilenetv2", norm=norm).eval()
    residual = [m for m in model.modules() if isinstance(m, InvertedResidual) and m.use_res_connect]
    assert len(residual) == 10
    for block in residual:  # zero-gamma: each residual block adds nothing until it is trained
        channels = block.conv[0][0].in_channels
        x = torch.randn(2, channels, 8, 8)
        assert torch.equal(block(x), x)
