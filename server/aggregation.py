"""What the coordinator aggregates of the sites' replies, and which replies it leaves out.

Sites send different metric keys by design: a site under its own DP sends no training loss or
timings but its epsilon, a site that did not opt in to per-class metrics sends fewer scores,
and sites may run different code. Flower's strategies check, before any
``train_metrics_aggr_fn``/``evaluate_metrics_aggr_fn`` runs, that every reply's MetricRecord
has the same keys (``validate_message_reply_consistency``), and raise
``InconsistentMessageReplies`` otherwise: one DP site among non-DP sites stopped the whole run.
Their array averaging trusts the replies just as much: a model with other keys raises, one with
another shape either raises or is broadcast silently into the average, and NaN poisons it.

So the round loop hands a strategy only replies that can be aggregated:

- a train reply is dropped, with its reason, when its model does not match the model sent
  (one ArrayRecord, the same keys and shapes, real numbers), holds a non-finite value, or
  carries no usable example count (a finite number > 0); any reply without a usable count is
  dropped;
- every kept reply reaches the strategy with its arrays (under one record name) and a
  MetricRecord holding only its example count, so the strategy's key check always holds and
  its weights are the sites';
- the metrics are averaged here, per key over the replies that carry that key, weighted by
  their example counts, skipping non-finite values (:func:`weighted_mean_per_key`).

Evaluation replies carry metrics only; their average is the same per-key mean (Flower's
``aggregate_evaluate`` is only that average, behind the same key check).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from common.protocol import WEIGHT_KEY


@dataclass
class Screened:
    """The replies of a round that can be aggregated (each left with its arrays and its example
    count), the metrics each of them carried, and the node id -> reason of every reply left out."""

    replies: list[Message] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)


def reply_metrics(content: RecordDict) -> dict[str, float]:
    """Every scalar number of a reply's MetricRecords (lists, e.g. per-class curves, left out)."""
    metrics: dict[str, float] = {}
    for record in content.metric_records.values():
        metrics.update({k: float(v) for k, v in record.items() if isinstance(v, int | float)})
    return metrics


def weight_problem(metrics: Mapping[str, float]) -> str | None:
    """Why a reply's example count cannot weight it (None when it can)."""
    if WEIGHT_KEY not in metrics:
        return f"its metrics carry no example count ({WEIGHT_KEY!r})"
    weight = metrics[WEIGHT_KEY]
    if not (math.isfinite(weight) and weight > 0):
        return f"its example count ({WEIGHT_KEY!r}) is {weight!r}, not a finite number > 0"
    return None


def arrays_problem(content: RecordDict, sent: ArrayRecord) -> str | None:
    """Why a reply's model cannot be averaged with the model ``sent`` (None when it can)."""
    records = list(content.array_records.values())
    if len(records) != 1:
        return f"it carries {len(records)} model records, expected 1"
    arrays = records[0]
    missing, extra = sorted(set(sent) - set(arrays)), sorted(set(arrays) - set(sent))
    if missing or extra:
        return f"its tensors differ from the global model's (missing {missing[:3]}, extra {extra[:3]})"
    for key, expected in sent.items():
        try:
            values = arrays[key].numpy()
        except (ValueError, TypeError) as exc:
            return f"its tensor {key!r} cannot be read ({type(exc).__name__})"
        if values.shape != tuple(expected.shape):
            return f"its tensor {key!r} has shape {values.shape}, the global model's {tuple(expected.shape)}"
        # The dtype may differ from the global model's (averaging turns an integer buffer such
        # as BatchNorm's num_batches_tracked into floats), but it must hold real numbers.
        if values.dtype.kind not in "biuf":
            return f"its tensor {key!r} holds {values.dtype} values, not real numbers"
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"its tensor {key!r} holds non-finite values"
    return None


PRIVACY_PREFIX = "dp_"
"""Sites' privacy figures (epsilon spent, ...): an average of two sites' epsilons describes no
site, so the aggregate keeps the largest (the most any site reported)."""


def weighted_mean_per_key(replies: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Each metric averaged over the replies that carry it, weighted by their example counts;
    NaN/inf values are skipped (a site whose split lacks a class reports NaN for its AUROC).
    Privacy figures (``dp_*``) keep their largest value instead. ``WEIGHT_KEY`` in the result
    is the total example count of the replies."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    largest: dict[str, float] = {}
    total = 0.0
    for metrics in replies:
        weight = metrics[WEIGHT_KEY]
        total += weight
        for key, value in metrics.items():
            if key == WEIGHT_KEY or not math.isfinite(value):
                continue
            if key.startswith(PRIVACY_PREFIX):
                largest[key] = max(largest.get(key, value), value)
                continue
            sums[key] = sums.get(key, 0.0) + weight * value
            weights[key] = weights.get(key, 0.0) + weight
    out = {key: sums[key] / weights[key] for key in sorted(sums) if weights[key] > 0}
    out.update(largest)
    out[WEIGHT_KEY] = total
    return out


def _without_weight(metrics: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in metrics.items() if key != WEIGHT_KEY}


def _for_strategy(reply: Message, weight: float) -> None:
    """Leave ``reply`` (in place) with its arrays, named as every other reply's (Krum and
    FedMedian read every reply's model under the first reply's record name), and one
    MetricRecord: its example count."""
    (name,) = reply.content.array_records
    reply.content["arrays"] = reply.content.pop(name)
    for name in list(reply.content.metric_records):
        reply.content.pop(name)
    reply.content["metrics"] = MetricRecord({WEIGHT_KEY: int(weight) if weight.is_integer() else weight})


def screen_train_replies(replies: Iterable[Message], sent: ArrayRecord) -> Screened:
    """The train replies that can be averaged with the model ``sent``, ready for a strategy
    (modified in place: their metrics are kept apart), and why the others cannot be (the
    caller reports them by site). Error replies are skipped (the round loop reports them)."""
    screened = Screened()
    for reply in replies:
        if reply.has_error():
            continue
        values = reply_metrics(reply.content)
        problem = weight_problem(values) or arrays_problem(reply.content, sent)
        if problem is not None:
            screened.dropped[reply.metadata.src_node_id] = problem
            continue
        _for_strategy(reply, values[WEIGHT_KEY])
        screened.replies.append(reply)
        screened.metrics.append(values)
    return screened


def aggregate_train(
    strategy: FedAvg, server_round: int, screened: Screened
) -> tuple[ArrayRecord | None, dict[str, float]]:
    """The strategy's aggregate of the screened replies' models, and their metrics averaged per
    key (with what the strategy adds to them, e.g. central DP's epsilon)."""
    if not screened.replies:
        return None, {}
    arrays, strategy_metrics = strategy.aggregate_train(server_round, screened.replies)
    metrics = _without_weight(weighted_mean_per_key(screened.metrics))
    for key, value in (strategy_metrics or {}).items():
        if key != WEIGHT_KEY and isinstance(value, int | float):
            metrics[key] = float(value)
    return arrays, metrics


def aggregate_evaluate(scores: Mapping[int, Mapping[str, float]]) -> tuple[dict[str, float], dict[int, str]]:
    """The per-key average of the sites' scores (node id -> a reply's metrics, as
    :func:`reply_metrics` reads them), and node id -> why a site's scores were left out."""
    kept: list[Mapping[str, float]] = []
    dropped: dict[int, str] = {}
    for node, metrics in scores.items():
        problem = weight_problem(metrics)
        if problem is not None:
            dropped[node] = problem
        else:
            kept.append(metrics)
    return (_without_weight(weighted_mean_per_key(kept)) if kept else {}), dropped
