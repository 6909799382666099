"""A model as a few contiguous arrays, one per dtype, plus the layout that puts it back together.

Why: Flower 1.42 moves a message as a tree of objects, one per ``Array`` of an ``ArrayRecord``
plus one per 5 MB chunk of it, and every object costs one call per hop (ServerApp -> SuperLink
-> gateway -> SuperNode -> site runner, and back), one SQLite transaction in the SuperLink's
store (when it keeps its state on disk) and a SHA-256 on each side. A ResNet18 state_dict is
122 tensors: a message of it is 212 objects. Packed, it is two arrays (all float32 values in
one, the int64 BatchNorm counters in another) and their chunks: 16 objects.

Packing changes nothing about the values: each tensor is laid out, raveled in C order, in the
buffer of its own dtype (integers stay integers, float32 stays float32), in the order of the
record, and unpacking returns views of the same values. The layout (names, dtypes, shapes) travels
beside the buffers and is checked when a packed model is read: the buffers must hold exactly the
values the layout describes (no byte more or less), names must be unique, dtypes plain numeric
ones, and the caller can compare it with the model it expects (:meth:`Layout.mismatch`).

No Flower import here: ``flower_adapter/packed_arrays.py`` puts this into Flower records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from common.errors import CxrFlError

PACKABLE_DTYPES = frozenset(
    {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"}
)
"""Dtypes a packed model may hold (native byte order): what torch state_dicts are made of."""
MAX_RANK = 8
MAX_NAME_LENGTH = 1024


class PackedModelError(CxrFlError):
    """A packed model whose layout or buffers do not fit together, or not the model expected."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a packed model."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    """The tensors of a packed model, in order."""

    entries: tuple[Entry, ...]

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> Layout:
        """The layout of ``arrays`` (in their order)."""
        return cls(
            tuple(Entry(name, str(a.dtype), tuple(int(d) for d in a.shape)) for name, a in arrays.items())
        )

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]

    def buffer_sizes(self) -> dict[str, int]:
        """Elements of each dtype's buffer, dtypes in order of first appearance."""
        sizes: dict[str, int] = {}
        for entry in self.entries:
            sizes[entry.dtype] = sizes.get(entry.dtype, 0) + entry.size
        return sizes

    def to_config(self) -> dict[str, list[str] | list[int]]:
        """Plain lists (a Flower ConfigRecord holds them): names, dtypes, ranks and all dims."""
        return {
            "names": self.names,
            "dtypes": [entry.dtype for entry in self.entries],
            "ranks": [len(entry.shape) for entry in self.entries],
            "dims": [d for entry in self.entries for d in entry.shape],
        }

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> Layout:
        """The layout that :meth:`to_config` wrote, checked; :class:`PackedModelError` if malformed."""
        names = _list_of(config, "names", str)
        dtypes = _list_of(config, "dtypes", str)
        ranks = _list_of(config, "ranks", int)
        dims = _list_of(config, "dims", int)
        if not len(names) == len(dtypes) == len(ranks):
            raise PackedModelError(
                f"packed model layout: {len(names)} names, {len(dtypes)} dtypes and {len(ranks)} ranks "
                "(one of each per tensor)"
            )
        if len(set(names)) != len(names):
            raise PackedModelError("packed model layout: a tensor name occurs twice")
        entries = []
        position = 0
        for name, dtype, rank in zip(names, dtypes, ranks, strict=True):
            if not name or len(name) > MAX_NAME_LENGTH:
                raise PackedModelError(f"packed model layout: a tensor name of {len(name)} characters")
            if dtype not in PACKABLE_DTYPES:
                raise PackedModelError(
                    f"packed model layout: tensor {name!r} has dtype {dtype!r}; allowed: "
                    + ", ".join(sorted(PACKABLE_DTYPES))
                )
            if not 0 <= rank <= MAX_RANK:
                raise PackedModelError(f"packed model layout: tensor {name!r} has rank {rank}")
            shape = tuple(dims[position : position + rank])
            if len(shape) != rank or any(d < 0 for d in shape):
                raise PackedModelError(f"packed model layout: tensor {name!r} has shape {list(shape)}")
            position += rank
            entries.append(Entry(name, dtype, shape))
        if position != len(dims):
            raise PackedModelError(
                f"packed model layout: {len(dims)} dims for ranks that add up to {position}"
            )
        return cls(tuple(entries))

    def mismatch(self, expected: Layout, *, integers_from_float64: bool = False) -> str | None:
        """Why this layout is not ``expected`` (the first difference, in words), or None.

        ``integers_from_float64``: accept an integer tensor where ``expected`` has float64. Flower's
        weighted average returns integer tensors (BatchNorm's ``num_batches_tracked``) as float64,
        and a site sends back its own integer counter for them.
        """
        if self.names != expected.names:
            missing = [n for n in expected.names if n not in set(self.names)]
            extra = [n for n in self.names if n not in set(expected.names)]
            if missing or extra:
                return (
                    f"its tensors differ from the model's: missing {_few(missing)}, unexpected {_few(extra)}"
                )
            return "its tensors are in another order than the model's"
        for got, want in zip(self.entries, expected.entries, strict=True):
            if got.shape != want.shape:
                return f"tensor {got.name!r} has shape {list(got.shape)}, the model's is {list(want.shape)}"
            if got.dtype != want.dtype and not (
                integers_from_float64 and want.dtype == "float64" and np.dtype(got.dtype).kind in "iu"
            ):
                return f"tensor {got.name!r} has dtype {got.dtype}, the model's is {want.dtype}"
        return None


def pack(arrays: Mapping[str, np.ndarray]) -> tuple[Layout, dict[str, np.ndarray]]:
    """``arrays`` as one 1-D buffer per dtype (in order of first appearance) and their layout."""
    layout = Layout.of(arrays)
    for entry in layout.entries:
        if entry.dtype not in PACKABLE_DTYPES:
            raise PackedModelError(f"cannot pack tensor {entry.name!r} of dtype {entry.dtype}")
    groups: dict[str, list[np.ndarray]] = {dtype: [] for dtype in layout.buffer_sizes()}
    for entry, array in zip(layout.entries, arrays.values(), strict=True):
        groups[entry.dtype].append(np.ravel(array, order="C"))
    buffers = {
        dtype: np.concatenate(parts) if parts else np.empty(0, dtype=dtype) for dtype, parts in groups.items()
    }
    return layout, buffers


def unpack(layout: Layout, buffers: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The named arrays (views of ``buffers``) that ``layout`` describes.

    Raises :class:`PackedModelError` unless there is exactly one 1-D buffer per dtype of the
    layout, of that dtype, holding exactly the layout's number of elements.
    """
    sizes = layout.buffer_sizes()
    if set(buffers) != set(sizes):
        raise PackedModelError(
            f"packed model: buffers for dtypes {sorted(buffers)}, its layout has {sorted(sizes)}"
        )
    for dtype, size in sizes.items():
        buffer = buffers[dtype]
        if buffer.dtype != np.dtype(dtype) or buffer.ndim != 1:
            raise PackedModelError(
                f"packed model: the {dtype} buffer is a {buffer.ndim}-D array of {buffer.dtype.str}"
            )
        if buffer.size != size:
            word = "more" if buffer.size > size else "fewer"
            raise PackedModelError(
                f"packed model: the {dtype} buffer holds {buffer.size} values, {word} than the "
                f"{size} its layout describes"
            )
    offsets = dict.fromkeys(sizes, 0)
    out: dict[str, np.ndarray] = {}
    for entry in layout.entries:
        start = offsets[entry.dtype]
        out[entry.name] = buffers[entry.dtype][start : start + entry.size].reshape(entry.shape)
        offsets[entry.dtype] = start + entry.size
    return out


def _list_of(config: Mapping[str, object], key: str, kind: type) -> list:  # type: ignore[type-arg]
    value = config.get(key)
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise PackedModelError(f"packed model layout: {key!r} is not a list of {kind.__name__}")
    return value


def _few(names: list[str]) -> str:
    if not names:
        return "none"
    return ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
