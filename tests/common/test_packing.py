"""A model as one buffer per dtype plus its layout: exact round trips, checked layouts."""

from __future__ import annotations

import numpy as np
import pytest

from common.packing import Layout, PackedModelError, pack, unpack


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "bn.running_mean": rng.standard_normal(4).astype(np.float32),
        "bn.num_batches_tracked": np.array(37, dtype=np.int64),
        "fc.weight": rng.standard_normal((3, 4)).astype(np.float32).T,  # not C-contiguous
        "fc.bias": np.zeros(3, dtype=np.float32),
        "other.num_batches_tracked": np.array(2**53 + 1, dtype=np.int64),  # not exact as a float
    }


def test_packing_keeps_every_tensor_its_name_order_dtype_shape_and_values() -> None:
    model = _model()

    layout, buffers = pack(model)

    assert list(buffers) == ["float32", "int64"]  # one buffer per dtype, integers kept apart
    assert buffers["int64"].tolist() == [37, 2**53 + 1]
    assert buffers["float32"].size == 108 + 4 + 12 + 3 == 127
    back = unpack(Layout.from_config(layout.to_config()), buffers)
    assert list(back) == list(model)
    for name, array in model.items():
        assert back[name].dtype == array.dtype
        assert back[name].shape == array.shape
        np.testing.assert_array_equal(back[name], array)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"names": ["a", "b"]}, "2 names, 1 dtypes and 1 ranks"),
        ({"names": ["a", "a"], "dtypes": ["float32", "float32"], "ranks": [1, 1], "dims": [1, 1]}, "twice"),
        ({"dtypes": ["object"]}, "dtype 'object'"),
        ({"dtypes": [">f4"]}, "dtype '>f4'"),
        ({"ranks": [9], "dims": [1] * 9}, "rank 9"),
        ({"dims": [-2]}, "shape"),
        ({"dims": [2, 2]}, "2 dims for ranks that add up to 1"),
        ({"dims": []}, "shape"),
        ({"ranks": [1.0]}, "'ranks' is not a list of int"),
        ({"names": "a"}, "'names' is not a list"),
    ],
)
def test_a_malformed_layout_is_refused_with_its_reason(change: dict, reason: str) -> None:
    config = {"names": ["a"], "dtypes": ["float32"], "ranks": [1], "dims": [2], **change}

    with pytest.raises(PackedModelError, match=reason):
        Layout.from_config(config)


@pytest.mark.parametrize(
    ("buffers", "reason"),
    [
        (
            {"float32": np.zeros(128, np.float32), "int64": np.zeros(2, np.int64)},
            "128 values, more than the 127",
        ),
        ({"float32": np.zeros(126, np.float32), "int64": np.zeros(2, np.int64)}, "fewer than"),
        (
            {"float32": np.zeros(127, np.float64), "int64": np.zeros(2, np.int64)},
            "float32 buffer is a 1-D array of <f8",
        ),
        ({"float32": np.zeros((127, 1), np.float32), "int64": np.zeros(2, np.int64)}, "2-D"),
        ({"float32": np.zeros(127, np.float32)}, "buffers for dtypes"),
        ({"float32": np.zeros(127, np.float32), "int64": np.zeros(2, np.int64), "x": np.zeros(1)}, "dtypes"),
    ],
)
def test_buffers_that_do_not_hold_exactly_the_layouts_values_are_refused(
    buffers: dict[str, np.ndarray], reason: str
) -> None:
    layout, _ = pack(_model())

    with pytest.raises(PackedModelError, match=reason):
        unpack(layout, buffers)


def test_a_layout_is_compared_with_the_expected_models() -> None:
    expected, _ = pack(_model())
    model = _model()

    assert Layout.of(model).mismatch(expected) is None
    renamed = {("x" if k == "fc.bias" else k): v for k, v in model.items()}
    assert "missing 'fc.bias', unexpected 'x'" in str(Layout.of(renamed).mismatch(expected))
    reordered = dict(reversed(list(model.items())))
    assert "order" in str(Layout.of(reordered).mismatch(expected))
    wider = {**model, "fc.bias": np.zeros(4, np.float32)}
    assert "'fc.bias' has shape [4], the model's is [3]" in str(Layout.of(wider).mismatch(expected))
    doubled = {**model, "fc.bias": np.zeros(3, np.float64)}
    assert "'fc.bias' has dtype float64, the model's is float32" in str(Layout.of(doubled).mismatch(expected))


def test_integer_tensors_may_answer_float64_ones_only_when_asked() -> None:
    """Flower's weighted average returns BatchNorm's integer counter as float64; a site answers
    with its own int64 counter."""
    averaged = {"w": np.zeros(2, np.float32), "n": np.array(3.5)}
    site = {"w": np.zeros(2, np.float32), "n": np.array(4, np.int64)}

    assert "dtype int64, the model's is float64" in str(Layout.of(site).mismatch(Layout.of(averaged)))
    assert Layout.of(site).mismatch(Layout.of(averaged), integers_from_float64=True) is None
    assert Layout.of(averaged).mismatch(Layout.of(site), integers_from_float64=True) is not None


def test_unpackable_dtypes_are_refused_when_packing() -> None:
    with pytest.raises(PackedModelError, match="complex128"):
        pack({"z": np.zeros(2, np.complex128)})
