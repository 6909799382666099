"""Loading a local weights file into a built model; nothing is ever downloaded.

A weights file is anything ``torch.save`` wrote that holds a state_dict: the state_dict itself,
or a checkpoint dict with the state_dict under ``"state_dict"`` or ``"model"``. It is read with
``torch.load(..., weights_only=True)`` (no pickled code runs). Prefixes added by wrappers
(``module.`` from DataParallel, ``_module.`` from Opacus' GradSampleModule) are stripped.

Checks are strict and the error says what does not fit: each layer whose shape differs (with
both shapes), then the first few missing and unexpected keys. Two conveniences:

- *RGB -> greyscale*: when the only mismatches are input convolutions whose file kernels take 3
  channels and the model's take 1, the RGB kernels are summed into one channel (the response
  to a grey image ``g`` is then the same as to the RGB image ``(g, g, g)``), logged at INFO.
- *Head*: ``skip_head=True`` keeps the model's own (randomly initialised) classifier head and
  ignores the file's, for initialising a backbone from weights trained on other classes.
  :func:`common.models.build_model` does this by itself when the file's head has a different
  shape from the model's and everything else fits, and logs a WARNING saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from common.errors import ModelError

logger = logging.getLogger(__name__)

WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_module.")
CHECKPOINT_KEYS: tuple[str, ...] = ("state_dict", "model")
SHOWN_KEYS = 5


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_state` did: the layers adapted from RGB and the head keys left as built."""

    rgb_to_grey: tuple[str, ...] = ()
    skipped_head: tuple[str, ...] = ()


@dataclass
class _Comparison:
    shape_mismatches: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def read_state_dict(path: Path | str) -> dict[str, Tensor]:
    """The state_dict stored in ``path``, with wrapper prefixes stripped; ModelError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"weights file '{path}' does not exist; pass the path of a file written by torch.save"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike
        raise ModelError(
            f"cannot read weights file '{path}' with torch.load(weights_only=True): {exc}. "
            "Save a plain state_dict with torch.save(model.state_dict(), path)."
        ) from exc
    if isinstance(obj, Mapping):
        for key in CHECKPOINT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ModelError(
            f"weights file '{path}' holds {type(obj).__name__}, not a state_dict; expected a dict of "
            f"tensors, optionally under one of the keys {', '.join(CHECKPOINT_KEYS)}"
        )
    state: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise ModelError(
                f"weights file '{path}': entry '{key}' is a {type(value).__name__}, not a tensor; "
                "save model.state_dict() rather than a whole checkpoint"
            )
        state[strip_wrapper_prefix(str(key))] = value
    return state


def strip_wrapper_prefix(key: str) -> str:
    """``_module.module.conv1.weight`` -> ``conv1.weight``."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


def head_name(model: nn.Module) -> str:
    """Dotted name of the classifier head: the last ``nn.Linear`` registered in ``model``."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ModelError(f"{type(model).__name__} has no nn.Linear classifier head")
    return names[-1]


def head_keys(model: nn.Module) -> list[str]:
    """state_dict keys of the head (``fc.weight``, ``fc.bias`` ...)."""
    head = head_name(model) + "."
    return [key for key in model.state_dict() if key.startswith(head)]


def head_shapes_differ(model: nn.Module, state: Mapping[str, Tensor]) -> bool:
    """True when the file has every head key but some with another shape (other classes)."""
    own = model.state_dict()
    keys = head_keys(model)
    return all(k in state for k in keys) and any(tuple(state[k].shape) != tuple(own[k].shape) for k in keys)


def _compare(own: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> _Comparison:
    result = _Comparison()
    for key, tensor in own.items():
        if key not in state:
            result.missing.append(key)
        elif tuple(state[key].shape) != tuple(tensor.shape):
            result.shape_mismatches[key] = (list(state[key].shape), list(tensor.shape))
    result.unexpected = [key for key in state if key not in own]
    return result


def _rgb_convertible(model: nn.Module, key: str, file_shape: list[int], model_shape: list[int]) -> bool:
    """An input conv (groups 1) with 1 channel in the model and 3 in the file, otherwise alike."""
    if not key.endswith(".weight") or len(model_shape) != 4:
        return False
    module = dict(model.named_modules()).get(key[: -len(".weight")])
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and model_shape[1] == 1
        and file_shape[1] == 3
        and file_shape[0] == model_shape[0]
        and file_shape[2:] == model_shape[2:]
    )


def _describe(model: nn.Module, source: str, comparison: _Comparison) -> str:
    parts = [f"weights file '{source}' does not fit {type(model).__name__}:"]
    for key, (file_shape, model_shape) in comparison.shape_mismatches.items():
        parts.append(f"layer '{key}': file has {file_shape}, model expects {model_shape};")
    for label, keys in (
        ("missing from file", comparison.missing),
        ("unexpected in file", comparison.unexpected),
    ):
        if keys:
            shown = ", ".join(keys[:SHOWN_KEYS]) + (", ..." if len(keys) > SHOWN_KEYS else "")
            parts.append(f"{len(keys)} key(s) {label}: {shown};")
    parts.append(
        "use a file saved from the same model name, norm (batch/group), in_channels and width_mult "
        "(for another number of classes load with skip_head=True)."
    )
    return " ".join(parts)


def load_state(
    model: nn.Module, state: Mapping[str, Tensor], *, source: str = "<state_dict>", skip_head: bool = False
) -> LoadReport:
    """Copy ``state`` into ``model`` after the strict checks described in the module docstring."""
    own = model.state_dict()
    skipped: tuple[str, ...] = ()
    if skip_head:
        skipped = tuple(head_keys(model))
        state = {k: v for k, v in state.items() if k not in skipped}
        own = {k: v for k, v in own.items() if k not in skipped}
    comparison = _compare(own, state)
    converted: list[str] = []
    only_shapes = bool(comparison.shape_mismatches) and not comparison.missing and not comparison.unexpected
    if only_shapes and all(
        _rgb_convertible(model, k, f, m) for k, (f, m) in comparison.shape_mismatches.items()
    ):
        state = dict(state)
        for key in comparison.shape_mismatches:
            state[key] = state[key].sum(dim=1, keepdim=True)
            converted.append(key)
        logger.info(
            "weights '%s': summed the RGB kernels of %s into one greyscale channel",
            source,
            ", ".join(converted),
        )
        comparison.shape_mismatches.clear()
    if comparison.shape_mismatches or comparison.missing or comparison.unexpected:
        raise ModelError(_describe(model, source, comparison))
    model.load_state_dict(dict(state), strict=not skip_head)
    return LoadReport(rgb_to_grey=tuple(converted), skipped_head=skipped)


def load_weights(model: nn.Module, path: Path | str, *, skip_head: bool = False) -> LoadReport:
    """Load the local weights file ``path`` into ``model`` (in place); see the module docstring.

    Raises:
        ModelError: unreadable file, or keys/shapes that do not fit (each named, both shapes).
    """
    report = load_state(model, read_state_dict(path), source=str(path), skip_head=skip_head)
    logger.info(
        "loaded weights from '%s' into %s%s",
        path,
        type(model).__name__,
        " (head kept as initialised)" if report.skipped_head else "",
    )
    return report
