"""``freeze-blocks``: fewer trained parameters, also under DP-SGD (Opacus never sees the frozen ones)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.config import ModelConfig, PrivacyConfig, TrainConfig
from common.errors import ConfigError
from common.freeze import backbone_blocks, freeze_blocks
from common.local import DataRequest, build_loaded_model, load_site_data, train_round
from common.models import build_model
from common.run_settings import check_run_config, run_settings_from_config
from common.tasks import get_task

TASK = get_task("normal-pneumonia-covid")
TINY = ModelConfig(name="tiny-cnn", norm="group")


def test_blocks_are_the_backbones_stages_in_order() -> None:
    assert [n for n, _ in backbone_blocks(build_model(TINY, 3))] == ["features.0", "features.1", "features.2"]
    resnet = build_model(ModelConfig(name="resnet18", norm="group"), 3)
    assert [n for n, _ in backbone_blocks(resnet)] == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]


def test_freezing_too_many_blocks_names_the_blocks() -> None:
    with pytest.raises(ConfigError, match=r"0 to 3 .*features\.0, features\.1, features\.2"):
        freeze_blocks(build_model(TINY, 3), 4)
    with pytest.raises(ConfigError, match="freeze-blocks"):
        run_settings_from_config({"freeze-blocks": -2})
    with pytest.raises(ConfigError, match=r"0 to 6 for resnet18, .*layer4"):  # before any run starts
        check_run_config({"teacher-name": "resnet18", "freeze-blocks": 7})
    check_run_config({"teacher-name": "resnet18", "freeze-blocks": 6})


def test_head_only_leaves_only_the_classifier_trainable() -> None:
    model = build_model(TINY, 3)
    frozen = freeze_blocks(model, -1)
    assert frozen == ["features.0", "features.1", "features.2"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.1.weight", "head.1.bias"}


@pytest.fixture
def site(tmp_path: Path):  # type: ignore[no-untyped-def]
    request = DataRequest(
        "synthetic", None, TASK, 32, tmp_path / "cache", 0.0, 0.0, 0, options=(("n-images", 32),)
    )
    return load_site_data(request)


@pytest.mark.parametrize("dp", [False, True])
def test_frozen_blocks_come_back_unchanged_and_the_rest_trains(site, dp: bool) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    start = build_loaded_model(TINY, TASK, None).state_dict()
    privacy = PrivacyConfig(enabled=True, target_epsilon=50.0, max_physical_batch_size=8) if dp else None

    outcome = train_round(
        site,
        TASK,
        TINY,
        start,
        TrainConfig(batch_size=8, lr=0.5, freeze_blocks=2, num_threads=1),
        seed=1,
        privacy=privacy,
        num_rounds=1,
    )

    for key, before in start.items():
        after = outcome.state_dict[key]
        if key.startswith(("features.0.", "features.1.")):
            assert torch.equal(after, before), f"{key} changed although frozen"
        elif key.endswith("weight"):
            assert not torch.equal(after, before), f"{key} did not train"
    if dp:  # noise went only to trained parameters: the round still spent its budget
        assert outcome.metrics["dp_epsilon"] > 0


def test_opacus_computes_no_per_sample_gradient_for_frozen_parameters() -> None:
    from opacus import GradSampleModule

    model = build_model(TINY, 3)
    freeze_blocks(model, 2)
    wrapped = GradSampleModule(model)
    loss = wrapped(torch.randn(4, 1, 32, 32)).sum()
    loss.backward()

    for name, param in model.named_parameters():
        if name.startswith(("features.0.", "features.1.")):
            assert getattr(param, "grad_sample", None) is None, name
            assert param.grad is None, name
        else:
            assert param.grad_sample is not None, name
            assert param.grad_sample.shape[0] == 4, name
