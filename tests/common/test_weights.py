"""Tests of local weights loading: round trip, wrappers, mismatches, RGB -> grey, head handling."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from common.config import ModelConfig
from common.errors import ModelError
from common.models import build_model, load_weights
from common.models.weights import head_name, read_state_dict, strip_wrapper_prefix


def _tiny(**kwargs: object) -> nn.Module:
    outputs = int(kwargs.pop("num_outputs", 3))  # type: ignore[call-overload]
    kwargs.setdefault("norm", "group")
    return build_model(ModelConfig(name="tiny-cnn", **kwargs), outputs).eval()  # type: ignore[arg-type]


def _save(state: dict[str, torch.Tensor] | object, path: Path) -> Path:
    torch.save(state, path)
    return path


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    source = build_model(ModelConfig(name="mobilenetv2", norm="group", width_mult=0.5), 3).eval()
    path = _save(source.state_dict(), tmp_path / "student.pt")
    torch.manual_seed(123)  # a different random init, so equality can only come from the file
    loaded = build_model(
        ModelConfig(name="mobilenetv2", norm="group", width_mult=0.5, weights=path), 3
    ).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(x), loaded(x))


@pytest.mark.parametrize("wrap", ["state_dict", "model", "_module.", "module.", "_module.module."])
def test_checkpoint_dicts_and_wrapper_prefixes(tmp_path: Path, wrap: str) -> None:
    source = _tiny()
    state = source.state_dict()
    if wrap.endswith("."):
        obj: object = {wrap + key: value for key, value in state.items()}
    else:
        obj = {wrap: state, "epoch": 7}
    path = _save(obj, tmp_path / "ckpt.pt")
    loaded = build_model(ModelConfig(name="tiny-cnn", norm="group", weights=path), 3)
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_strip_wrapper_prefix() -> None:
    assert strip_wrapper_prefix("_module.module.conv1.weight") == "conv1.weight"
    assert strip_wrapper_prefix("features.module.x") == "features.module.x"


def test_shape_mismatch_names_layer_and_both_shapes(tmp_path: Path) -> None:
    path = _save(_tiny(width_mult=2.0).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ModelError) as info:
        build_model(ModelConfig(name="tiny-cnn", norm="group", weights=path), 3)
    message = str(info.value)
    assert str(path) in message
    assert "layer 'features.0.0.weight': file has [16, 1, 3, 3], model expects [8, 1, 3, 3]" in message
    assert "layer 'features.2.0.weight': file has [64, 32, 3, 3], model expects [32, 16, 3, 3]" in message


def test_missing_and_unexpected_keys_listed(tmp_path: Path) -> None:
    # A BatchNorm file into a GroupNorm model: running statistics are unexpected.
    path = _save(_tiny(norm="batch").state_dict(), tmp_path / "batch.pt")
    with pytest.raises(ModelError, match=r"9 key\(s\) unexpected in file: features\.0\.1\.running_mean"):
        load_weights(_tiny(), path)
    state = _tiny().state_dict()
    del state["features.1.1.bias"]
    with pytest.raises(ModelError, match=r"1 key\(s\) missing from file: features\.1\.1\.bias;"):
        load_weights(_tiny(), _save(state, tmp_path / "partial.pt"))


def test_rgb_first_conv_summed_into_grey(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rgb = _tiny(in_channels=3)
    path = _save(rgb.state_dict(), tmp_path / "rgb.pt")
    with caplog.at_level(logging.INFO, logger="common.models.weights"):
        grey = build_model(ModelConfig(name="tiny-cnn", norm="group", weights=path), 3).eval()
    assert "summed the RGB kernels of features.0.0.weight" in caplog.text
    expected = rgb.features[0][0].weight.sum(dim=1, keepdim=True)
    assert torch.equal(grey.features[0][0].weight, expected)
    image = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(grey(image), rgb(image.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)


def test_rgb_adaptation_covers_both_branches_of_the_dual_teacher(tmp_path: Path) -> None:
    rgb = build_model(ModelConfig(name="resnet50v2-vgg19", norm="group", in_channels=3), 3)
    path = _save(rgb.state_dict(), tmp_path / "dual.pt")
    report = load_weights(build_model(ModelConfig(name="resnet50v2-vgg19", norm="group"), 3), path)
    assert report.rgb_to_grey == ("resnet.stem.weight", "vgg.features.0.weight")


def test_grey_file_into_rgb_model_is_refused(tmp_path: Path) -> None:
    path = _save(_tiny().state_dict(), tmp_path / "grey.pt")
    with pytest.raises(ModelError, match=r"file has \[8, 1, 3, 3\], model expects \[8, 3, 3, 3\]"):
        load_weights(_tiny(in_channels=3), path)


def test_head_with_other_outputs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    five = _tiny(num_outputs=5)
    path = _save(five.state_dict(), tmp_path / "five.pt")
    # load_weights is strict unless asked ...
    with pytest.raises(
        ModelError, match=r"layer 'head.1.weight': file has \[5, 32\], model expects \[3, 32\]"
    ):
        load_weights(_tiny(), path)
    model = _tiny()
    own_head = model.head[1].weight.clone()
    report = load_weights(model, path, skip_head=True)
    assert report.skipped_head == ("head.1.weight", "head.1.bias")
    assert torch.equal(model.head[1].weight, own_head)
    assert torch.equal(model.features[2][0].weight, five.features[2][0].weight)
    # ... while build_model keeps the head random and says so.
    with caplog.at_level(logging.WARNING):
        built = build_model(ModelConfig(name="tiny-cnn", norm="group", weights=path), 3)
    assert "keeping tiny-cnn's classifier head randomly initialised (3 outputs)" in caplog.text
    assert built(torch.rand(1, 1, 32, 32)).shape == (1, 3)
    assert torch.equal(built.features[0][0].weight, five.features[0][0].weight)


@pytest.mark.parametrize(
    ("name", "stock"),
    [
        ("resnet18", torchvision.models.resnet18),
        ("mobilenetv2", torchvision.models.mobilenet_v2),
        ("densenet121", torchvision.models.densenet121),
    ],
)
def test_torchvision_imagenet_layout_loads_as_backbone(tmp_path: Path, name: str, stock: object) -> None:
    # A local file in torchvision's own layout (RGB, 1000 classes, BatchNorm), e.g. ImageNet weights.
    reference = stock()  # type: ignore[operator]
    path = _save(reference.state_dict(), tmp_path / f"{name}.pth")
    model = build_model(ModelConfig(name=name, norm="batch", weights=path), 3)
    head = head_name(model)
    loaded = model.state_dict()
    for key, value in reference.state_dict().items():
        if key.startswith(head + "."):
            assert loaded[key].shape[0] == 3
        elif loaded[key].shape != value.shape:
            assert torch.equal(loaded[key], value.sum(dim=1, keepdim=True))
        else:
            assert torch.equal(loaded[key], value)


def test_unusable_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        read_state_dict(tmp_path / "absent.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ModelError, match="cannot read weights file"):
        read_state_dict(tmp_path / "text.pt")
    with pytest.raises(ModelError, match="holds list, not a state_dict"):
        read_state_dict(_save([1, 2], tmp_path / "list.pt"))
    with pytest.raises(ModelError, match="entry 'epoch' is a int"):
        read_state_dict(_save({"epoch": 3}, tmp_path / "int.pt"))
