"""The coordinator's round loop: federated teacher rounds with checkpoints, resume and drop-out.

Flower's ``Strategy.start`` runs rounds but keeps no checkpoints, cannot resume, and waits for
replies with a fixed 3 s poll. This loop calls the same strategy methods (``configure_train``,
``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate``) itself, so aggregation
stays Flower's, and adds what a multi-day hospital federation needs:

- replies are polled every 50 ms; a site that fails or does not answer within the round timeout
  is logged and left out of that round's aggregate, and the round completes when at least the
  minimum number of sites replied;
- a site that declines a round (its DP budget is spent) is logged with its reason;
- after every round the global teacher, the strategy state and the seeds are checkpointed, the
  best teacher by federated validation is kept, and every site's metrics go to metrics.jsonl;
- node sampling is seeded per round, so a resumed run samples what the straight run sampled.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.errors import CxrFlError
from common.protocol import SITE_DECLINED, SITE_RECORD, WEIGHT_KEY, parse_error_reason
from server.progress_lines import RESUME_ADVICE, resume_line, round_line
from server.run_folder import ResumeState, RunFolder
from server.strategies import load_strategy_state, strategy_state

logger = logging.getLogger(__name__)

REPLY_POLL_SECONDS = 0.05


class RoundFailedError(CxrFlError):
    """Fewer sites than the minimum replied in a round."""


@dataclass
class SiteOutcome:
    """What one site did with one message."""

    node_id: int
    site: str
    status: str  # ok | declined | failed | timeout
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    def row(self, server_round: int, phase: str) -> dict[str, Any]:
        row: dict[str, Any] = {
            "round": server_round,
            "phase": phase,
            "site": self.site,
            "node_id": self.node_id,
            "status": self.status,
        }
        if self.reason:
            row["reason"] = self.reason
        row.update(self.metrics)
        return row


def site_name(message: Message) -> str:
    """The site's self-declared name (a ConfigRecord 'site' in its reply), else its node id."""
    if not message.has_error() and SITE_RECORD in message.content.config_records:
        return str(message.content.config_records[SITE_RECORD].get("name", message.metadata.src_node_id))
    return f"node-{message.metadata.src_node_id}"


def exchange(grid: Grid, messages: Iterable[Message], timeout: float) -> tuple[list[Message], dict[str, int]]:
    """Send messages and collect replies until all arrive or ``timeout`` seconds pass.

    Returns the replies and, for every message sent, its id -> destination node (the ids left
    without a reply are the sites that timed out).
    """
    outgoing = list(messages)
    destination: dict[str, int] = {}
    for message_id, message in zip(grid.push_messages(outgoing), outgoing, strict=True):
        if message_id:
            destination[message_id] = message.metadata.dst_node_id
    pending = set(destination)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
        if pending:
            time.sleep(REPLY_POLL_SECONDS)
    return replies, destination


def collect(
    grid: Grid, messages: Iterable[Message], timeout: float, names: dict[int, str]
) -> tuple[list[Message], list[SiteOutcome]]:
    """Exchange messages and describe what each site did.

    ``names`` maps node ids to the names sites gave in earlier replies; it is updated here, so
    that a site which later fails (an error reply made by Flower itself, or no reply at all) is
    still reported under its name.

    The replies come back sorted by site name (then node id), not in order of arrival: the
    weighted average of the models is a floating-point sum whose order would otherwise change
    from run to run, and training amplifies that last-bit difference over the rounds.
    """
    replies, destination = exchange(grid, messages, timeout)
    replies = sorted(replies, key=lambda r: (site_name(r), r.metadata.src_node_id))
    answered = {reply.metadata.reply_to_message_id for reply in replies}
    outcomes = []
    for reply in replies:
        node = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error():
            status = "declined" if reply.error.code == SITE_DECLINED else "failed"
            site, reason = parse_error_reason(reply.error.reason or "")
            outcomes.append(SiteOutcome(node, site or names.get(node, f"node-{node}"), status, reason))
            continue
        names[node] = site_name(reply)
        metrics = {}
        for record in reply.content.metric_records.values():
            metrics.update({k: float(v) for k, v in record.items() if not isinstance(v, list)})
        outcomes.append(SiteOutcome(node, names[node], "ok", metrics=metrics))
    for message_id, node in destination.items():
        if message_id not in answered:
            reason = "no reply within the round timeout"
            outcomes.append(SiteOutcome(node, names.get(node, f"node-{node}"), "timeout", reason))
    return replies, sorted(outcomes, key=lambda o: o.site)


def wait_for_sites(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """Connected node ids once at least ``minimum`` are connected, or whatever is there at ``timeout``."""
    nodes = sorted(grid.get_node_ids())
    deadline = time.monotonic() + timeout
    while len(nodes) < minimum and time.monotonic() < deadline:
        time.sleep(1.0)
        nodes = sorted(grid.get_node_ids())
    return nodes


def _seed_sampling(seed: int, server_round: int, phase: str) -> None:
    random.seed(f"{seed}:{server_round}:{phase}")


@dataclass
class TeacherResult:
    arrays: ArrayRecord
    completed_round: int
    best_round: int
    best_metric: float


class TeacherRounds:
    """Runs the teacher rounds of one run against a Grid."""

    def __init__(
        self,
        grid: Grid,
        strategy: FedAvg,
        folder: RunFolder,
        *,
        num_rounds: int,
        round_timeout: float,
        site_wait_timeout: float,
        selection_metric: str,
        seed: int,
        min_train_sites: int,
        min_evaluate_sites: int,
        central_evaluate: Callable[[dict[str, Any]], dict[str, float]] | None = None,
    ) -> None:
        self.grid = grid
        self.strategy = strategy
        self.folder = folder
        self.num_rounds = num_rounds
        self.round_timeout = round_timeout
        self.site_wait_timeout = site_wait_timeout
        self.selection_metric = selection_metric
        self.seed = seed
        self.min_train_sites = min_train_sites
        self.min_evaluate_sites = min_evaluate_sites
        self.central_evaluate = central_evaluate
        self.site_names: dict[int, str] = {}

    def run(self, initial: ArrayRecord, resume: ResumeState | None) -> TeacherResult:
        arrays = initial
        start_round, best_round, best_metric = 1, 0, float("nan")
        if resume is not None:
            arrays = ArrayRecord(self.folder.load_model("last"))
            load_strategy_state(self.strategy, self.folder.load_strategy_state())
            start_round = resume.completed_round + 1
            best_round, best_metric = resume.best_round, resume.best_metric
            logger.info(
                "%s",
                resume_line(
                    self.folder.root,
                    resume.completed_round,
                    self.num_rounds,
                    best_round,
                    self.selection_metric,
                    best_metric,
                ),
            )
        for server_round in range(start_round, self.num_rounds + 1):
            started = time.monotonic()
            arrays, train_metrics, train_outcomes = self._train_round(server_round, arrays)
            val_metrics, eval_outcomes = self._evaluate_round(server_round, arrays)
            if self.central_evaluate is not None:
                central = self.central_evaluate(arrays.to_torch_state_dict())
                val_metrics.update({f"central_{k}": v for k, v in central.items()})
            metric = float(val_metrics.get(f"val_{self.selection_metric}", float("nan")))
            # The first round is the best so far even when its metric is undefined (NaN).
            is_best = best_round == 0 or self._better(metric, best_metric)
            if is_best:
                best_round = server_round
                best_metric = metric if math.isfinite(metric) else best_metric
            seconds = time.monotonic() - started
            trained = sum(o.status == "ok" for o in train_outcomes)
            rows = [o.row(server_round, "train") for o in train_outcomes]
            rows += [o.row(server_round, "evaluate") for o in eval_outcomes]
            rows.append(
                {
                    "round": server_round,
                    "phase": "aggregate",
                    "site": "_global",
                    "seconds": seconds,
                    "sites_trained": trained,
                    "sites_sampled": len(train_outcomes),
                    "is_best": is_best,
                    **{f"train_{k}": v for k, v in train_metrics.items()},
                    **val_metrics,
                }
            )
            # Metrics first, checkpoint state last: a server killed in between repeats the round
            # on resume, and the rows of the repeated round are dropped before it runs again.
            self.folder.append_metrics(rows)
            self.folder.save_round(
                server_round=server_round,
                state_dict=arrays.to_torch_state_dict(),
                strategy_state=strategy_state(self.strategy),
                is_best=is_best,
                best_round=best_round,
                best_metric=best_metric,
                seed=self.seed,
            )
            logger.info(
                "%s",
                round_line(
                    server_round,
                    self.num_rounds,
                    trained,
                    len(train_outcomes),
                    float(train_metrics.get("loss", float("nan"))),
                    self.selection_metric,
                    metric,
                    best_round,
                    seconds,
                ),
            )
        return TeacherResult(arrays, self.num_rounds, best_round, best_metric)

    def _better(self, metric: float, best: float) -> bool:
        """Is ``metric`` better than ``best``? Lower is better for ``loss``, higher otherwise."""
        if not math.isfinite(metric):
            return False
        if not math.isfinite(best):
            return True
        return metric < best if self.selection_metric == "loss" else metric > best

    def _train_round(
        self, server_round: int, arrays: ArrayRecord
    ) -> tuple[ArrayRecord, dict[str, float], list[SiteOutcome]]:
        # Flower's node sampling waits for min-available-sites without a time limit.
        available = len(wait_for_sites(self.grid, self.strategy.min_available_nodes, self.site_wait_timeout))
        if available < self.strategy.min_available_nodes:
            raise RoundFailedError(
                f"round {server_round}: {available} site(s) connected after {self.site_wait_timeout:.0f} s, "
                f"the minimum is {self.strategy.min_available_nodes}. " + RESUME_ADVICE
            )
        _seed_sampling(self.seed, server_round, "train")
        config = ConfigRecord({"phase": "teacher", "num-rounds": self.num_rounds})
        messages = self.strategy.configure_train(server_round, arrays, config, self.grid)
        replies, outcomes = collect(self.grid, messages, self.round_timeout, self.site_names)
        for outcome in outcomes:
            if outcome.status != "ok":
                logger.warning(
                    "Round %d: site %s %s: %s", server_round, outcome.site, outcome.status, outcome.reason
                )
        trained = sum(o.status == "ok" for o in outcomes)
        if trained < self.min_train_sites:
            self.folder.append_metrics([o.row(server_round, "train") for o in outcomes])
            reasons = "; ".join(f"{o.site}: {o.status} ({o.reason})" for o in outcomes if o.status != "ok")
            raise RoundFailedError(
                f"round {server_round}: only {trained} site(s) trained, the minimum is "
                f"{self.min_train_sites}. {reasons or 'No site replied.'} " + RESUME_ADVICE
            )
        new_arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if new_arrays is None:
            raise RoundFailedError(f"round {server_round}: aggregation produced no model")
        train_metrics = {
            k: float(v) for k, v in (metrics or {}).items() if k != WEIGHT_KEY and not isinstance(v, list)
        }
        return new_arrays, train_metrics, outcomes

    def _evaluate_round(
        self, server_round: int, arrays: ArrayRecord
    ) -> tuple[dict[str, float], list[SiteOutcome]]:
        available = len(wait_for_sites(self.grid, self.strategy.min_available_nodes, self.site_wait_timeout))
        if available < self.strategy.min_available_nodes:
            logger.warning(
                "Round %d: %d site(s) connected, fewer than min-available-sites; no federated validation",
                server_round,
                available,
            )
            return {}, []
        _seed_sampling(self.seed, server_round, "evaluate")
        config = ConfigRecord({"phase": "teacher"})
        messages = self.strategy.configure_evaluate(server_round, arrays, config, self.grid)
        replies, outcomes = collect(self.grid, messages, self.round_timeout, self.site_names)
        evaluated = sum(o.status == "ok" for o in outcomes)
        if evaluated < self.min_evaluate_sites:
            logger.warning(
                "Round %d: only %d site(s) evaluated (minimum %d); validation metrics are partial",
                server_round,
                evaluated,
                self.min_evaluate_sites,
            )
        metrics = self.strategy.aggregate_evaluate(server_round, replies) if evaluated else None
        val = {k: float(v) for k, v in (metrics or {}).items() if k != WEIGHT_KEY and not isinstance(v, list)}
        return val, outcomes
