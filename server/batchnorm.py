"""The coordinator's side of federated BatchNorm statistics (run setting ``bn-statistics``).

With ``federated`` (the default), once the teacher rounds are over, for the teacher the run
delivers (``distill-teacher``: best.pt or last.pt, rewritten before distillation), and after the
federated student's last aggregate (server/app.py); with ``every-round``, also after every
teacher round's aggregate (server/rounds.py), so that validation and the best-round choice see
pooled statistics, at the cost of one more message per round (in the demo 6-10 s on rounds of
38-63 s: a site's pass over its train split costs a fifth to a third of its local training;
benchmarks/results/bn_statistics.md). The statistics change neither training nor, since a
site's pass does not read the statistics the model arrives with, the delivered teacher: only
the per-round validation scores. The server sends the aggregated
model to the sites whose replies it aggregated (a ``query.bn_statistics`` message); each
site answers with the exact per-channel moments of every BatchNorm layer's input over its train
split (common/batchnorm_stats.py) and its image count, and the server writes the pooled
statistics into the model's running_mean / running_var. So the teacher the sites distil from
(and, with ``every-round``, validation and every checkpoint) has statistics that match its
weights, instead of FedAvg's average of the sites' moving averages (``averaged``). The statistics
do not change training (sites train with batch statistics), only what the model predicts.

A reply is untrusted: it is dropped, with its reason logged, unless its arrays are exactly
the model's layers (shape, floating point, finite, variance >= 0) and its image count is a
whole number > 0 and no more than the site reported for training in the round (the same coarse
``num-examples`` weights FedAvg). With no usable reply the model keeps the averaged statistics
and the log says so. A model without BatchNorm (GroupNorm, e.g. under DP) skips the phase: no
message is sent. A site under DP declines (its activation statistics are not covered by
DP-SGD's guarantee) and is left out like any other site that does not answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.batchnorm_stats import (
    expected_channels,
    has_batchnorm,
    moments_problem,
    pooled_statistics,
    positions_per_image,
    with_statistics,
)
from common.checkpoint import load_metadata, save_model
from common.config import ModelConfig
from common.local import student_config
from common.models import build_model
from common.protocol import BN_MODEL_KEY, BN_STATISTICS_MESSAGE_TYPE, BN_STATISTICS_RECORD, WEIGHT_KEY
from common.run_settings import FederatedRunConfig
from server.aggregation import reply_metrics
from server.rounds import BatchNormUpdate, collect, mark_dropped
from server.run_folder import BN_STATISTICS_PHASE, RunFolder

logger = logging.getLogger(__name__)


class FederatedBatchNorm:
    """Recomputes one model's BatchNorm statistics with the sites (see the module docstring).

    ``role`` ("teacher" or "student") tells the sites which of the run's models the arrays are;
    ``config`` is that model's architecture, from which the expected layers and each layer's
    values per image are derived here (never from a site).
    """

    def __init__(
        self,
        grid: Grid,
        role: str,
        layers: tuple[dict[str, int], dict[str, int]],
        *,
        timeout: float,
        names: dict[int, str],
    ) -> None:
        self.grid, self.role, self.timeout, self.names = grid, role, timeout, names
        self.channels, self.positions = layers

    @classmethod
    def for_model(
        cls,
        grid: Grid,
        role: str,
        config: ModelConfig,
        num_classes: int,
        image_size: int,
        *,
        timeout: float,
        names: dict[int, str],
    ) -> FederatedBatchNorm | None:
        """The phase for the run's ``role`` model (None when it has no BatchNorm layer: nothing
        to recompute, no message sent). The expected layers and each layer's values per image
        come from the architecture here, never from a site."""
        model = build_model(replace(config, weights=None), num_classes)
        if not has_batchnorm(model):
            logger.info("The %s has no BatchNorm layer (norm %s): no federated statistics", role, config.norm)
            return None
        layers = (expected_channels(model), positions_per_image(model, config.in_channels, image_size))
        return cls(grid, role, layers, timeout=timeout, names=names)

    def update(self, server_round: int, arrays: ArrayRecord, counts: Mapping[int, float]) -> BatchNormUpdate:
        """``arrays`` with statistics pooled from the sites in ``counts`` (node id -> the example
        count each reported for training this round)."""
        if not counts:
            logger.warning(
                "BatchNorm statistics of the %s, round %d: no aggregated site to ask; the model keeps the "
                "averaged ones",
                self.role,
                server_round,
            )
            return BatchNormUpdate(arrays, [], {"bn_statistics_sites": 0.0})
        started = time.monotonic()
        config = ConfigRecord({"server-round": server_round, BN_MODEL_KEY: self.role})
        messages = [
            Message(
                RecordDict({"arrays": arrays, "config": config}),
                dst_node_id=node,
                message_type=BN_STATISTICS_MESSAGE_TYPE,
            )
            for node in sorted(counts)
        ]
        replies, outcomes = collect(self.grid, messages, self.timeout, self.names)
        accepted, dropped = self._screen(replies, counts)
        mark_dropped(outcomes, dropped)
        for outcome in outcomes:
            if outcome.status != "ok":
                logger.warning(
                    "BatchNorm statistics of the %s, round %d: site %s %s: %s",
                    self.role,
                    server_round,
                    outcome.site,
                    outcome.status,
                    outcome.reason,
                )
        metrics = {"bn_statistics_sites": float(len(accepted))}
        if not accepted:
            logger.warning(
                "BatchNorm statistics of the %s, round %d: no site sent usable statistics; the model "
                "keeps the averaged ones",
                self.role,
                server_round,
            )
            return BatchNormUpdate(arrays, outcomes, metrics)
        pooled = pooled_statistics(accepted, self.positions)
        updated = ArrayRecord(with_statistics(arrays.to_torch_state_dict(), pooled))
        metrics["bn_statistics_seconds"] = time.monotonic() - started
        logger.info(
            "BatchNorm statistics of the %s, round %d: pooled from %d site(s) in %.1f s",
            self.role,
            server_round,
            len(accepted),
            metrics["bn_statistics_seconds"],
        )
        return BatchNormUpdate(updated, outcomes, metrics)

    def _screen(
        self, replies: list[Message], counts: Mapping[int, float]
    ) -> tuple[list[tuple[float, dict[str, np.ndarray]]], dict[int, str]]:
        """The (count, moments) of every usable reply, and node id -> why the others are not."""
        accepted: list[tuple[float, dict[str, np.ndarray]]] = []
        dropped: dict[int, str] = {}
        for reply in replies:
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            problem, usable = statistics_problem(reply.content, counts.get(node), self.channels)
            if problem is not None:
                dropped[node] = problem
            else:
                accepted.append(usable)
        return accepted, dropped


def statistics_problem(
    content: RecordDict, trained: float | None, channels: Mapping[str, int]
) -> tuple[str | None, tuple[float, dict[str, np.ndarray]]]:
    """Why a site's statistics reply cannot be used (None when it can), and its (count, arrays)."""
    empty: tuple[float, dict[str, np.ndarray]] = (0.0, {})
    count = reply_metrics(content).get(WEIGHT_KEY)
    if count is None or not np.isfinite(count) or count <= 0 or not float(count).is_integer():
        return f"its image count ({WEIGHT_KEY!r}) is {count!r}, not a whole number > 0", empty
    if trained is None or count > trained:
        return f"its image count {count:g} is more than it reported for training ({trained})", empty
    record = content.array_records.get(BN_STATISTICS_RECORD)
    if record is None:
        return f"it carries no {BN_STATISTICS_RECORD!r} arrays", empty
    try:
        arrays = {key: array.numpy() for key, array in record.items()}
    except (TypeError, ValueError) as exc:
        return f"its statistics cannot be read ({type(exc).__name__})", empty
    problem = moments_problem(arrays, channels)
    return (problem, empty) if problem is not None else (None, (float(count), arrays))


def federated_batchnorm(
    grid: Grid, settings: FederatedRunConfig, role: str, names: dict[int, str]
) -> FederatedBatchNorm | None:
    """The federated BatchNorm statistics phase of the run's teacher or student (None with
    ``bn-statistics = "averaged"`` or a model without BatchNorm)."""
    if settings.run.bn_statistics == "averaged":
        return None
    config = (
        settings.teacher
        if role == "teacher"
        else student_config(settings.distill, settings.teacher, settings.teacher.norm)
    )
    return FederatedBatchNorm.for_model(
        grid,
        role,
        config,
        settings.task.num_classes,
        settings.run.image_size,
        timeout=settings.run.round_timeout,
        names=names,
    )


POOLED_MARK = "bn_statistics"
"""Checkpoint metadata key: the model's BatchNorm statistics were pooled from the sites."""


def pool_delivered_teacher(
    grid: Grid, folder: RunFolder, settings: FederatedRunConfig, names: dict[int, str]
) -> None:
    """Give the teacher the run delivers (``distill-teacher``: best.pt or last.pt) BatchNorm
    statistics pooled from the sites that trained its round (``bn-statistics = "federated"``),
    in that checkpoint only, before distillation: a run resumed for more rounds trains on from
    last.pt as the straight run would. A checkpoint already pooled (marked in its metadata: a
    resumed run) is left as it is."""
    which = settings.run.distill_teacher
    path = folder.checkpoints / f"{which}.pt"
    metadata = load_metadata(path) or {}
    if settings.run.bn_statistics != "federated" or metadata.get(POOLED_MARK) == "pooled":
        return
    phase = federated_batchnorm(grid, settings, "teacher", names)
    if phase is None:
        return
    server_round = int(metadata.get("round", settings.run.num_rounds))
    connected = set(grid.get_node_ids())
    counts = {  # the sites whose replies made this model, with the counts FedAvg weighted them by
        int(row["node_id"]): float(row[WEIGHT_KEY])
        for row in folder.read_metrics()
        if row.get("phase") == "train"
        and row.get("round") == server_round
        and row.get("status") == "ok"
        and WEIGHT_KEY in row
        and int(row["node_id"]) in connected
    }
    update = phase.update(server_round, ArrayRecord(folder.load_model(which)), counts)
    if update.metrics.get("bn_statistics_sites", 0) > 0:
        save_model(update.arrays.to_torch_state_dict(), path, metadata={**metadata, POOLED_MARK: "pooled"})
        folder.append_metrics([o.row(server_round, BN_STATISTICS_PHASE) for o in update.outcomes])
