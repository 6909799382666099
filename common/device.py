"""Which device a site computes on, and what follows from it: mixed precision, pinned memory.

Settings (kebab-case, as everywhere):

- ``device``: ``auto`` (a CUDA GPU when torch sees one, else the CPU, said in an INFO log),
  ``cpu``, ``cuda`` (the current GPU) or ``cuda:N`` (GPU number N). Asking for ``cuda`` on a
  machine without CUDA is an error (:class:`DeviceUnavailableError`), never a silent fallback.
- ``amp``: automatic mixed precision (float16 autocast with a gradient scaler) for training on
  CUDA. It is never used on the CPU (float16 autocast is slow there and bfloat16 was not measured
  to help on these machines) and never under DP-SGD: Opacus 1.6 computes and clips per-sample
  gradients itself, outside ``GradScaler``'s scaling and inf/NaN checks, so the clipping norm
  would apply to scaled gradients.

Who decides: the site. In a deployment the device comes from the site's own node config
(``cxr-fl-client start --device``); a ``device`` run setting sent by the server is ignored
there. In the simulation runtime the simulated sites use the run setting.

Evaluation and inference run in float32 on the chosen device; ONNX export always works on a CPU
copy of the model (see common/export.py callers).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from common.errors import ConfigError, CxrFlError

logger = logging.getLogger(__name__)

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N (N = a GPU index, e.g. cuda:1)"
_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


class DeviceUnavailableError(CxrFlError):
    """A device was asked for that this machine does not have."""


def check_device_setting(value: object, option: str = "device") -> str:
    """The device setting normalised (``" CUDA:0 "`` -> ``"cuda:0"``), or ConfigError."""
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text is None or not _DEVICE_PATTERN.fullmatch(text):
        raise ConfigError(option, value, DEVICE_CHOICES)
    return text


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"this PyTorch build ({torch.__version__}) has no CUDA support"
    return "PyTorch sees no CUDA GPU (no driver, or CUDA_VISIBLE_DEVICES hides them)"


def resolve_device(setting: str, *, option: str = "device") -> torch.device:
    """The torch device of a ``device`` setting on this machine.

    ``auto`` falls back to the CPU with an INFO log; ``cuda``/``cuda:N`` without CUDA (or with
    fewer GPUs than N + 1) raise :class:`DeviceUnavailableError` saying what to use instead.
    """
    choice = check_device_setting(setting, option)
    if choice == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if choice == "auto":
        if available:
            return torch.device("cuda")
        logger.info("device 'auto': %s, so the CPU is used", _why_no_cuda())
        return torch.device("cpu")
    if not available:
        raise DeviceUnavailableError(
            f"{option} '{choice}' was asked for, but {_why_no_cuda()}; use {option} 'auto' "
            "(CUDA when present, else the CPU) or 'cpu'"
        )
    if ":" in choice:
        index = int(choice.split(":", 1)[1])
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceUnavailableError(
                f"{option} '{choice}' was asked for, but this machine has {count} CUDA GPU(s) "
                f"(cuda:0 to cuda:{count - 1}); use one of those, 'cuda' or 'auto'"
            )
    return torch.device(choice)


@dataclass(frozen=True)
class ComputeConfig:
    """The ``device`` and ``amp`` settings as given (resolved on the machine that computes)."""

    device: str = "auto"
    amp: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", check_device_setting(self.device))


@dataclass(frozen=True)
class Compute:
    """A resolved device and the precision used on it."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: bool = False

    def __post_init__(self) -> None:
        if self.amp and self.device.type != "cuda":
            raise ConfigError("amp", True, f"false on {self.device} (mixed precision is for CUDA only)")

    @property
    def pin_memory(self) -> bool:
        """Page-locked loader memory speeds host-to-GPU copies; useless (and costly) on the CPU."""
        return self.device.type == "cuda"

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A fresh gradient scaler when mixed precision is on (one per training run), else None."""
        return torch.amp.GradScaler(self.device.type) if self.amp else None

    def describe(self) -> str:
        return f"{self.device}" + (" with mixed precision (float16)" if self.amp else "")


CPU = Compute()
"""The CPU in float32: the default of every loop (and what tests use)."""


def resolve_compute(config: ComputeConfig, *, dp: bool = False, option: str = "device") -> Compute:
    """The device to use and whether mixed precision is on (CUDA, ``amp`` set, no DP-SGD)."""
    device = resolve_device(config.device, option=option)
    amp = config.amp and device.type == "cuda"
    if amp and dp:
        logger.info("mixed precision is off for DP-SGD (Opacus clips per-sample gradients in float32)")
        amp = False
    return Compute(device, amp)


@contextlib.contextmanager
def autocast(device: torch.device | str, enabled: bool) -> Iterator[None]:
    """float16 autocast on CUDA when ``enabled``; a no-op otherwise (never autocast on the CPU)."""
    device = torch.device(device)
    if not enabled or device.type != "cuda":
        yield
        return
    with torch.autocast(device_type="cuda", dtype=torch.float16):
        yield
