"""Device selection (auto / cpu / cuda / cuda:N), its fallbacks and mixed-precision rules, on CPU.

CUDA is simulated by replacing ``torch.cuda.is_available`` and ``torch.cuda.device_count``:
nothing here touches a GPU, so the tests pass the same on machines with and without one.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.config import TrainConfig
from common.device import (
    CPU,
    Compute,
    ComputeConfig,
    DeviceUnavailableError,
    autocast,
    check_device_setting,
    resolve_compute,
    resolve_device,
)
from common.distillation import IndexedDataset, distill_one_epoch
from common.errors import ConfigError
from common.run_settings import run_settings_from_config
from common.tasks import get_task
from common.training import make_optimizer, train_one_epoch


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize(
    ("given", "normalised"), [("auto", "auto"), (" CPU ", "cpu"), ("cuda", "cuda"), ("Cuda:1", "cuda:1")]
)
def test_device_settings_are_normalised(given: str, normalised: str) -> None:
    assert check_device_setting(given) == normalised


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:-1", "cuda0", "mps", "", 0, None])
def test_a_bad_device_setting_names_the_option_and_the_choices(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"'device'.*auto, cpu, cuda or cuda:N"):
        check_device_setting(bad)


def test_run_settings_carry_the_device_and_refuse_a_bad_one() -> None:
    assert run_settings_from_config({}).compute == ComputeConfig("auto", True)
    assert run_settings_from_config({"device": "cuda:0", "amp": False}).compute == ComputeConfig(
        "cuda:0", False
    )
    with pytest.raises(ConfigError, match="'device'"):
        run_settings_from_config({"device": "gpu"})


@pytest.mark.usefixtures("no_cuda")
def test_auto_falls_back_to_the_cpu_with_an_info_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="common.device"):
        assert resolve_device("auto") == torch.device("cpu")
    assert "the CPU is used" in caplog.text


@pytest.mark.usefixtures("no_cuda")
@pytest.mark.parametrize("asked", ["cuda", "cuda:0", "cuda:1"])
def test_asking_for_cuda_without_it_is_a_clear_error(asked: str) -> None:
    with pytest.raises(DeviceUnavailableError) as caught:
        resolve_device(asked, option="--device")
    message = str(caught.value)
    assert f"--device '{asked}' was asked for" in message
    assert "'auto'" in message
    assert "'cpu'" in message
    assert "\n" not in message


@pytest.mark.usefixtures("no_cuda")
def test_cpu_never_needs_cuda() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_compute(ComputeConfig("cpu", amp=True)) == CPU


@pytest.mark.usefixtures("two_gpus")
def test_with_gpus_auto_picks_cuda_and_an_index_must_exist() -> None:
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceUnavailableError, match=r"2 CUDA GPU\(s\) \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


@pytest.mark.usefixtures("two_gpus")
def test_mixed_precision_only_on_cuda_and_never_under_dp() -> None:
    on_gpu = resolve_compute(ComputeConfig("auto", amp=True))
    assert on_gpu.device.type == "cuda"
    assert on_gpu.amp
    assert on_gpu.pin_memory
    assert not resolve_compute(ComputeConfig("cuda", amp=True), dp=True).amp
    assert not resolve_compute(ComputeConfig("cuda", amp=False)).amp
    on_cpu = resolve_compute(ComputeConfig("cpu", amp=True))
    assert not on_cpu.amp
    assert not on_cpu.pin_memory
    assert on_cpu.grad_scaler() is None


def test_mixed_precision_on_the_cpu_is_refused() -> None:
    with pytest.raises(ConfigError, match="'amp'"):
        Compute(torch.device("cpu"), amp=True)


def test_autocast_is_a_no_op_on_the_cpu() -> None:
    layer = nn.Linear(4, 2)
    with autocast("cpu", True):
        out = layer(torch.ones(1, 4))
    assert out.dtype == torch.float32


def _tiny_batches(n: int = 12) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 1, 8, 8, generator=generator)
    targets = torch.nn.functional.one_hot(torch.arange(n) % 3, 3).float()
    return TensorDataset(images, targets)


def _tiny_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


def test_the_gradient_scaler_path_trains() -> None:
    # GradScaler also exists for the CPU: it exercises the scaled backward / step / update path
    # that CUDA mixed precision uses, without a GPU.
    task = get_task("normal-pneumonia-covid")
    model = _tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = make_optimizer(model, TrainConfig(lr=0.1))
    scaler = torch.amp.GradScaler("cpu")

    stats = train_one_epoch(model, DataLoader(_tiny_batches(), batch_size=4), task, optimizer, scaler=scaler)

    assert stats["steps"] == 3
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert scaler.get_scale() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_the_gradient_scaler_path_distils() -> None:
    from common.config import DistillConfig

    task = get_task("normal-pneumonia-covid")
    student, teacher = _tiny_model(), _tiny_model()
    before = [p.detach().clone() for p in student.parameters()]
    optimizer = make_optimizer(student, TrainConfig(lr=0.1))
    loader = DataLoader(IndexedDataset(_tiny_batches()), batch_size=4)

    stats = distill_one_epoch(
        student, teacher, loader, task, optimizer, DistillConfig(), scaler=torch.amp.GradScaler("cpu")
    )

    assert stats["steps"] == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
