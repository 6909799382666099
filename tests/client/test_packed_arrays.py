"""Packed models in Flower records, and the site's ClientApp mod that unpacks and repacks them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.app import packed_arrays_mod
from common.packing import Layout, PackedModelError
from common.protocol import SITE_BAD_INPUT
from flower_adapter.packed_arrays import is_packed, pack_content, unpack_content

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Linear(3, 2))
    model[1].num_batches_tracked += 5
    return model.state_dict()


def _content() -> RecordDict:
    return RecordDict({"arrays": ArrayRecord(_state()), "config": ConfigRecord({"server-round": 2})})


def test_a_packed_model_comes_back_tensor_for_tensor_and_other_records_untouched() -> None:
    content = _content()

    packed, layouts = pack_content(content)

    assert sorted(packed) == ["arrays.layout", "arrays.packed", "config"]
    assert sorted(packed["arrays.packed"]) == ["float32", "int64"]  # type: ignore[arg-type]
    assert packed["config"] is content["config"]
    assert is_packed(packed)
    assert not is_packed(content)
    back = unpack_content(packed, layouts)["arrays"].to_torch_state_dict()  # type: ignore[union-attr]
    state = _state()
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype  # num_batches_tracked stays int64
        assert torch.equal(back[name], tensor)


def test_messages_sharing_one_model_pack_it_once() -> None:
    content, cache = _content(), {}

    first, _ = pack_content(content, cache)
    second, _ = pack_content(content, cache)

    assert first["arrays.packed"] is second["arrays.packed"]  # Flower uploads its objects once


def test_a_model_that_is_not_the_one_sent_is_refused_naming_the_tensor() -> None:
    _, layouts = pack_content(_content())
    state = _state()
    state["2.weight"] = torch.zeros(5, 3)
    reply, _ = pack_content(RecordDict({"arrays": ArrayRecord(state)}))

    with pytest.raises(PackedModelError, match=r"'2.weight' has shape \[5, 3\], the model's is \[2, 3\]"):
        unpack_content(reply, layouts)
    with pytest.raises(PackedModelError, match="per-tensor form"):
        unpack_content(RecordDict({"arrays": ArrayRecord(_state())}), layouts)


def test_buffers_without_their_layout_or_with_a_forged_one_are_refused() -> None:
    packed, _ = pack_content(_content())
    orphan = RecordDict({"arrays.packed": packed["arrays.packed"]})
    with pytest.raises(PackedModelError, match="without their"):
        unpack_content(orphan)

    layout = dict(packed["arrays.layout"])  # type: ignore[call-overload]
    layout["dims"] = [d * 1000 for d in layout["dims"]]  # claims far more values than were sent
    forged = RecordDict({"arrays.packed": packed["arrays.packed"], "arrays.layout": ConfigRecord(layout)})
    with pytest.raises(PackedModelError, match="fewer than"):
        unpack_content(forged)

    pickled = ArrayRecord({"float32": Array(dtype="float32", shape=(3,), stype="pickle", data=b"\x80")})
    with pytest.raises(PackedModelError, match="cannot be read"):
        unpack_content(RecordDict({"arrays.packed": pickled, "arrays.layout": packed["arrays.layout"]}))


def _context() -> Context:
    return Context(
        run_id=7, node_id=1, node_config={"site-name": "site-a"}, state=RecordDict(), run_config={}
    )


def test_the_site_mod_unpacks_for_its_handlers_and_packs_their_reply() -> None:
    packed, _ = pack_content(_content())
    message = Message(packed, dst_node_id=1, message_type="train")
    seen: list[RecordDict] = []

    def handler(msg: Message, context: Context) -> Message:
        seen.append(msg.content)
        state = msg.content["arrays"].to_torch_state_dict()  # type: ignore[union-attr]
        trained = {k: v + 1 for k, v in state.items()}
        return Message(
            RecordDict({"arrays": ArrayRecord(trained), "m": MetricRecord({"n": 3})}), reply_to=msg
        )

    reply = packed_arrays_mod(message, _context(), handler)

    assert sorted(seen[0]) == ["arrays", "config"]
    assert sorted(reply.content) == ["arrays.layout", "arrays.packed", "m"]
    back = unpack_content(reply.content)["arrays"].to_torch_state_dict()  # type: ignore[union-attr]
    assert back["1.num_batches_tracked"].dtype == torch.int64
    assert int(back["1.num_batches_tracked"]) == 6


def test_the_site_mod_leaves_unpacked_messages_as_they_are() -> None:
    message = Message(_content(), dst_node_id=1, message_type="train")

    reply = packed_arrays_mod(message, _context(), lambda msg, ctx: Message(msg.content, reply_to=msg))

    assert sorted(reply.content) == ["arrays", "config"]


def test_the_site_refuses_a_malformed_packed_model_with_a_reason_and_never_runs_the_handler() -> None:
    packed, _ = pack_content(_content())
    layout = dict(packed["arrays.layout"])  # type: ignore[call-overload]
    layout["dtypes"] = ["object"] * len(layout["dtypes"])
    packed["arrays.layout"] = ConfigRecord(layout)
    message = Message(packed, dst_node_id=1, message_type="train")

    def handler(msg: Message, context: Context) -> Message:
        raise AssertionError("the handler must not see a refused model")

    reply = packed_arrays_mod(message, _context(), handler)

    assert reply.has_error()
    assert reply.error.code == SITE_BAD_INPUT
    assert reply.error.reason.startswith("site 'site-a': packed model layout")
    assert "dtype 'object'" in reply.error.reason


def test_layouts_survive_a_config_record() -> None:
    layout = Layout.of({"a": np.zeros((2, 3), np.float32), "s": np.array(1, np.int64)})
    assert Layout.from_config(ConfigRecord(layout.to_config())) == layout  # type: ignore[arg-type]
