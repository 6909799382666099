"""Models in Flower messages as packed arrays (common/packing.py): the format both ends speak.

An ``ArrayRecord`` named ``K`` in a message's content travels as an ``ArrayRecord`` named
``K.packed`` (one Array per dtype) and a ``ConfigRecord`` named ``K.layout`` (names, dtypes,
shapes); everything else in the content travels as it is. The coordinator's grid packs what it
sends and unpacks replies (flower_adapter/grid.py), and the site's ClientApp unpacks what it receives
and packs its reply when the message came packed (``packed_arrays_mod`` in client/app.py), so
strategies, checkpoints and handlers see the usual one-Array-per-tensor records on both sides,
in deployment and in simulation alike.

Why: see common/packing.py (a ResNet18 message: 212 Flower objects per-tensor, 16 packed).
Both sides import it, so it sits in the Flower adapter (it knows Flower's records, not only the
app API's use of them).
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common.packing import Layout, PackedModelError, pack, unpack

PACKED_SUFFIX = ".packed"
LAYOUT_SUFFIX = ".layout"

PackCache = dict[int, tuple[ArrayRecord, ConfigRecord, Layout]]
"""Packed records by ``id()`` of the record they were made from (one push of many messages
that share one model packs it once, and Flower then uploads its objects once)."""


def is_packed(content: RecordDict) -> bool:
    """Does ``content`` hold a packed model?"""
    return any(key.endswith(LAYOUT_SUFFIX) for key in content.config_records) or any(
        key.endswith(PACKED_SUFFIX) for key in content.array_records
    )


def pack_record(record: ArrayRecord) -> tuple[ArrayRecord, ConfigRecord, Layout]:
    """One ``ArrayRecord`` as its packed buffers, its layout as a record, and its layout."""
    layout, buffers = pack({name: array.numpy() for name, array in record.items()})
    packed = ArrayRecord({dtype: Array(buffer) for dtype, buffer in buffers.items()})
    return packed, ConfigRecord(layout.to_config()), layout  # type: ignore[arg-type]


def pack_content(content: RecordDict, cache: PackCache | None = None) -> tuple[RecordDict, dict[str, Layout]]:
    """A new RecordDict with every ArrayRecord of ``content`` packed (other records are the same
    objects), and the layout of each packed record by its name."""
    cache = {} if cache is None else cache
    out = RecordDict()
    layouts: dict[str, Layout] = {}
    for key, record in content.items():
        if not isinstance(record, ArrayRecord):
            out[key] = record
            continue
        if id(record) not in cache:
            cache[id(record)] = pack_record(record)
        packed, layout_record, layout = cache[id(record)]
        out[key + PACKED_SUFFIX] = packed
        out[key + LAYOUT_SUFFIX] = layout_record
        layouts[key] = layout
    return out, layouts


def unpack_content(content: RecordDict, expected: Mapping[str, Layout] | None = None) -> RecordDict:
    """A new RecordDict with the packed models of ``content`` as usual ArrayRecords.

    ``expected``: for a record name, the layout its model must have (checked with
    :meth:`Layout.mismatch`, integer tensors accepted where float64 ones were sent). Raises
    :class:`PackedModelError` with a one-line reason for a packed model that is malformed or
    not the expected one, and for an unpacked ArrayRecord where a packed one was expected.
    """
    expected = expected or {}
    out = RecordDict()
    layouts = {key[: -len(LAYOUT_SUFFIX)] for key in content.config_records if key.endswith(LAYOUT_SUFFIX)}
    packed = {key[: -len(PACKED_SUFFIX)] for key in content.array_records if key.endswith(PACKED_SUFFIX)}
    if layouts != packed:
        raise PackedModelError(
            f"packed model: records {sorted(layouts ^ packed)} come without their "
            f"{PACKED_SUFFIX!r} arrays or {LAYOUT_SUFFIX!r}"
        )
    for key, record in content.items():
        if key.endswith(LAYOUT_SUFFIX):
            continue
        if key.endswith(PACKED_SUFFIX):
            name = key[: -len(PACKED_SUFFIX)]
            out[name] = _unpack_record(name, record, content.config_records[name + LAYOUT_SUFFIX], expected)  # type: ignore[arg-type]
        elif isinstance(record, ArrayRecord) and key in expected:
            raise PackedModelError(
                f"record {key!r}: a model in per-tensor form where a packed one was expected"
            )
        else:
            out[key] = record
    return out


def _unpack_record(
    name: str, packed: ArrayRecord, layout_record: ConfigRecord, expected: Mapping[str, Layout]
) -> ArrayRecord:
    layout = Layout.from_config(layout_record)
    if name in expected and (why := layout.mismatch(expected[name], integers_from_float64=True)):
        raise PackedModelError(f"record {name!r} is not the model that was sent: {why}")
    try:
        buffers = {dtype: array.numpy() for dtype, array in packed.items()}
    except (TypeError, ValueError) as exc:  # not an .npy payload (another stype, a corrupt header)
        raise PackedModelError(f"record {name!r}: a packed buffer cannot be read: {exc}") from None
    arrays = unpack(layout, buffers)
    return ArrayRecord({key: Array(value) for key, value in arrays.items()})
