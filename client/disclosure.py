"""What a site's metric replies may say about its data.

A coordinator needs a loss, the macro AUROC and rough example counts to aggregate (FedAvg weights)
and to pick a model. Accuracy, balanced accuracy, macro F1 and every per-class figure, together
with an exact count, let it recover the site's class counts (a model that predicts one class
makes accuracy the share of that class). By default a deployed site sends none of them and
rounds its counts (:func:`bucket_count`); ``cxr-fl-client start --share-per-class-metrics``
(node_config ``share-per-class-metrics=true``) sends everything, exact. Simulated sites share by
default: they are the coordinator's own partitions and the simulation report uses their figures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from common.metrics import PER_CLASS_NAMES, SCALAR_NAMES
from common.protocol import WEIGHT_KEY

CLASS_REVEALING = tuple(name for name in SCALAR_NAMES if name != "auroc_macro")
"""Scalar metrics that, with a crafted model, give class shares (all but the macro AUROC)."""


def bucket_count(n: int) -> int:
    """``n`` rounded to two significant digits, in steps of at least 10 (0 stays 0).

    7 -> 10, 57 -> 60, 123 -> 120, 1234 -> 1200: FedAvg weights stay within about 5% of the
    exact ones for sites of 100 images or more (within 50% below that).
    """
    if n <= 0:
        return 0
    step = max(10, 10 ** (int(math.log10(n)) - 1))
    return max(step, round(n / step) * step)


def _reveals_classes(key: str) -> bool:
    if "/" in key:  # per-class figures are named '<metric>/<class>'
        return True
    return any(key == name or key.endswith("_" + name) for name in (*CLASS_REVEALING, *PER_CLASS_NAMES))


def shareable_metrics(metrics: Mapping[str, float | int], *, share_per_class: bool) -> dict[str, float | int]:
    """The metrics a site sends: all of them when it opted in, else no class-revealing ones."""
    if share_per_class:
        return dict(metrics)
    out = {k: v for k, v in metrics.items() if not _reveals_classes(k)}
    if WEIGHT_KEY in out:
        out[WEIGHT_KEY] = bucket_count(int(out[WEIGHT_KEY]))
    return out
