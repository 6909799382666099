"""What a deployed site's replies say about its data (issue 24, item 2).

Each test calls the ClientApp as Flower does and inspects the Message it returns: the server
controls the run settings and the model; the site controls only its node_config.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from PIL import Image

from client.app import app, data_request
from client.disclosure import Disclosure, coarse
from client.site import site_from_node_config
from common.local import load_site_data
from common.protocol import SITE_BAD_INPUT, WEIGHT_KEY
from common.run_settings import run_settings_from_config
from server.app import initial_teacher
from tests.client.helpers import site_context

pytestmark = pytest.mark.usefixtures("flower_task_identity")

HEAD_BIAS = (0.0, -1.0, -1000.0)
"""The crafted teacher of the attack: constant logits, so a loss is a known mix of class shares."""


def _site(root: Path, **extra: object) -> dict[str, object]:
    return {"site-name": "st-test", "data-format": "synthetic", "out-dir": str(root / "site"), **extra}


def _ask(
    context: Context, message_type: str, state: dict[str, torch.Tensor] | None = None, **config: object
) -> Message:
    if state is None:
        state = initial_teacher(run_settings_from_config(context.run_config)).to_torch_state_dict()
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(dict(config))})
    return app(Message(content, dst_node_id=1, message_type=message_type), context)


def _metrics(reply: Message, record: str = "metrics") -> dict[str, float]:
    assert not reply.has_error(), reply.error.reason
    return dict(reply.content.metric_records[record])


def _significant_digits(value: float) -> int:
    if value == 0 or not math.isfinite(value):
        return 0
    return len(f"{abs(value):.12e}".split("e")[0].replace(".", "").rstrip("0"))


def test_every_figure_a_deployed_site_sends_has_at_most_two_significant_digits(tmp_path: Path) -> None:
    train = _metrics(
        _ask(site_context(tmp_path, _site(tmp_path)), "train", **{"server-round": 1, "num-rounds": 1})
    )
    evaluate = _metrics(_ask(site_context(tmp_path, _site(tmp_path)), "evaluate", **{"server-round": 1}))
    for metrics in (train, evaluate):
        assert metrics[WEIGHT_KEY] % 10 == 0
        assert all(_significant_digits(float(v)) <= 2 for v in metrics.values()), metrics
    assert {"loss", "train_seconds"} <= set(train)


def test_exact_figures_leave_only_with_the_sites_own_opt_in(tmp_path: Path) -> None:
    context = site_context(tmp_path, _site(tmp_path, **{"share-exact-metrics": True}))
    metrics = _metrics(_ask(context, "evaluate", **{"server-round": 1}))
    settings = run_settings_from_config(context.run_config)
    site = site_from_node_config(context.node_config, settings)
    assert metrics[WEIGHT_KEY] == len(load_site_data(data_request(settings, site)).split.val)
    assert any(_significant_digits(float(v)) > 2 for v in metrics.values())
    assert not [k for k in metrics if "accuracy" in k or "/" in k]  # per-class is its own opt-in


def test_under_dp_nothing_computed_on_the_training_split_leaves_but_the_weights(tmp_path: Path) -> None:
    node_config = _site(tmp_path, **{"dp-target-epsilon": 8.0})
    context = site_context(tmp_path, node_config, batch_size=32)
    reply = _ask(context, "train", **{"server-round": 1, "num-rounds": 2})
    metrics = _metrics(reply)
    assert set(metrics) == {WEIGHT_KEY, "dp_epsilon"}
    assert _significant_digits(metrics["dp_epsilon"]) <= 2
    assert reply.content.array_records["arrays"]


def _crafted_teacher(context: Context) -> dict[str, torch.Tensor]:
    """All weights zero, the head's bias (0, -1, -1000): every image gets the same logits."""
    state = initial_teacher(run_settings_from_config(context.run_config)).to_torch_state_dict()
    crafted = {k: torch.zeros_like(v) for k, v in state.items()}
    head_bias = [k for k, v in state.items() if k.endswith("bias") and v.shape == (len(HEAD_BIAS),)][-1]
    crafted[head_bias] = torch.tensor(HEAD_BIAS)
    return crafted


def _count_candidates(loss: float, total: int, half_width: float) -> list[tuple[int, int, int]]:
    """Class counts of ``total`` images whose loss under the crafted teacher is within
    ``half_width`` of ``loss``: what a coordinator can solve for."""
    per_class = -torch.log_softmax(torch.tensor(HEAD_BIAS, dtype=torch.float64), 0).numpy()
    found = []
    for n1 in range(total + 1):
        for n2 in range(total + 1 - n1):
            n0 = total - n1 - n2
            if abs(float(np.dot(per_class, (n0, n1, n2))) / total - loss) <= half_width:
                found.append((n0, n1, n2))
    return found


def _rounding_half_width(value: float) -> float:
    exponent = math.floor(math.log10(abs(value)))
    return 0.5 * 10 ** (exponent - 1) * (1 + 1e-9) + 1e-6


def test_a_crafted_model_solves_for_class_counts_no_finer_than_the_rounding(tmp_path: Path) -> None:
    """The attack of the issue: a constant teacher makes the validation loss a known mix of the
    class shares. Exact, it gives the validation split's class counts; coarse, many counts fit."""
    context = site_context(tmp_path, _site(tmp_path))
    settings = run_settings_from_config(context.run_config)
    site = site_from_node_config(context.node_config, settings)
    data = load_site_data(data_request(settings, site))
    total = len(data.split.val)
    labels = data.catalog.targets[data.split.val].argmax(axis=1)
    truth = tuple(int((labels == c).sum()) for c in range(3))
    crafted = _crafted_teacher(context)

    exact = _metrics(
        _ask(
            site_context(tmp_path, _site(tmp_path, **{"share-exact-metrics": True})),
            "evaluate",
            crafted,
            **{"server-round": 1},
        )
    )
    assert _count_candidates(exact["val_loss"], total, 1e-4) == [truth]  # the attack works on exact figures

    coarse_loss = _metrics(_ask(context, "evaluate", crafted, **{"server-round": 1}))["val_loss"]
    candidates = _count_candidates(coarse_loss, total, _rounding_half_width(coarse_loss))
    assert truth in candidates
    assert len(candidates) >= 5  # even knowing the exact split size, the counts stay unknown


def _image_folder(root: Path, counts: dict[str, int]) -> Path:
    for label, n in counts.items():
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8), 40 * i % 255, dtype=np.uint8)).save(folder / f"IM-{i:04d}.png")
    return root


@pytest.mark.parametrize("folder", ["Doe_John_1961-04-02", "Doe John 1961"])
def test_an_error_reply_names_no_folder_and_no_count(tmp_path: Path, folder: str) -> None:
    data = _image_folder(tmp_path / "scans" / folder, {"normal": 13, "covid-19": 7, "tuberculosis": 3})
    node_config = _site(tmp_path, **{"data-format": "image-folder", "data-path": str(data)})
    reply = _ask(site_context(tmp_path, node_config), "evaluate", **{"server-round": 1})
    assert reply.has_error()
    assert reply.error.code == SITE_BAD_INPUT
    reason = reply.error.reason
    assert "tuberculosis" in reason  # still says what to fix
    assert "Doe" not in reason
    assert "scans" not in reason
    assert not re.search(r"\(\d+\)", reason), reason
    assert not re.search(r"\b(13|7|3|23)\b", reason), reason


def test_error_texts_keep_hashes_and_words_but_no_paths_or_counts() -> None:
    text = "on 208 training images at /data/x/IM-1.png: epsilon 6.4123 > 8.0; sha256 3fa9c0 site_00"
    shaped = Disclosure().text(text)
    assert shaped == "on # training images at <path at the site>: epsilon 6.4 > 8; sha256 3fa9c0 site_00"
    assert Disclosure(exact=True).text(text) == text.replace("/data/x/IM-1.png", "<path at the site>")
    assert [coarse(v) for v in (0.69314, 208.1, -0.0123456)] == [0.69, 210.0, -0.012]
