"""The coordinator's round loop: federated teacher rounds with checkpoints, resume and drop-out.

Flower's ``Strategy.start`` runs rounds but keeps no checkpoints, cannot resume, and waits for
replies with a fixed 3 s poll. This loop calls the same strategy methods (``configure_train``,
``aggregate_train``, ``configure_evaluate``) itself, so the models' aggregation stays Flower's,
and adds what a multi-day hospital federation needs:

- replies are polled on a short, gently growing interval (flower_adapter/grid.py); a site that fails or
  does not answer within the round timeout is logged and left out of that round's aggregate,
  and the round completes when at least the minimum number of sites replied;
- a site that declines a round (its DP budget is spent) is logged with its reason;
- a reply that cannot be aggregated (a model of other tensors or shapes, values that are not
  finite real numbers, no usable example count) is left out of the round with its reason, and
  each metric is averaged over the sites that send it (server/aggregation.py): sites with
  and without their own DP, or sharing per-class metrics or not, send different keys;
- with a ``batchnorm`` hook (run setting ``bn-statistics = "federated"``, server/batchnorm.py),
  the aggregate's BatchNorm statistics are recomputed with the sites it averaged before anything
  validates, checkpoints or sends it; a resume starts from the checkpoint, whose statistics are
  already pooled, and never pools them twice;
- after every round the global teacher, the strategy state and the seeds are checkpointed, the
  best teacher by federated validation is kept, and every site's metrics go to metrics.jsonl;
- node sampling is seeded per round, so a resumed run samples what the straight run sampled.

Federated validation (run setting ``validation-mode``):

- ``in-train`` (default): one message per site per round. The train message of round r carries
  the global model of round r-1; the site first scores it on its validation split, then trains,
  and replies with its weights and those scores. So round r's replies validate model r-1: the
  aggregate row of round r-1 (and whether model r-1 is the best so far) is completed during
  round r, and one evaluate message after the last round validates the last model. Round 1
  asks for no validation (the initial model is never a candidate). Until its validation
  arrives, a round's aggregate row waits in state.json (``pending_row``), so a resume completes
  it exactly as the straight run would. Sites sampled for training are the ones that validate;
  a site that declines or fails the train message validates nothing that round.
- ``separate``: Flower's usual two messages per round (train, then evaluate the new model).

Both modes write the same metrics.jsonl rows (round r's aggregate row holds the validation of
model r) and pick the same best round.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.errors import CxrFlError
from common.protocol import (
    SITE_DECLINED,
    SITE_RECORD,
    VALIDATE_INCOMING_KEY,
    VALIDATION_RECORD,
    WEIGHT_KEY,
    parse_error_reason,
)
from common.run_settings import VALIDATION_MODES
from flower_adapter.grid import wait_for_replies
from server.aggregation import aggregate_evaluate, aggregate_train, reply_metrics, screen_train_replies
from server.progress_events import Progress, announce
from server.progress_lines import RESUME_ADVICE
from server.run_folder import BN_STATISTICS_PHASE, CoordinatorFolder, ResumeState, RunFolder
from server.site_identity import SiteDirectory, identity_refusal, registered_name
from server.strategies import load_strategy_state, strategy_state

logger = logging.getLogger(__name__)

BatchNormHook = Callable[[int, ArrayRecord, dict[int, float]], "BatchNormUpdate"]
"""(round, aggregate, node id -> example count) -> the aggregate with pooled BatchNorm statistics."""


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


@dataclass
class BatchNormUpdate:
    """What one federated statistics phase did (server/batchnorm.py): the model (with the pooled
    statistics, or as it was), each site's outcome, and figures for the round's aggregate row."""

    arrays: ArrayRecord
    outcomes: list[SiteOutcome] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def site_name(message: Message) -> str:
    """The site's self-declared name (a ConfigRecord 'site' in its reply), else its node id."""
    if not message.has_error() and SITE_RECORD in message.content.config_records:
        return str(message.content.config_records[SITE_RECORD].get("name", message.metadata.src_node_id))
    return f"node-{message.metadata.src_node_id}"


def claimed_site(message: Message) -> str | None:
    """The name a reply claims (its ConfigRecord 'site'), None if it names none."""
    record = message.content.config_records.get(SITE_RECORD) if not message.has_error() else None
    return None if record is None or "name" not in record else str(record["name"])


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
    return wait_for_replies(grid, list(destination), timeout), destination


def collect(
    grid: Grid, messages: Iterable[Message], timeout: float, names: dict[int, str]
) -> tuple[list[Message], list[SiteOutcome]]:
    """Exchange messages and describe what each site did (see :func:`describe`)."""
    replies, destination = exchange(grid, messages, timeout)
    return describe(replies, destination, names)


def describe(
    replies: list[Message], destination: dict[str, int], names: dict[int, str]
) -> tuple[list[Message], list[SiteOutcome]]:
    """The replies in site order and what each site did with its message.

    ``names`` maps node ids to the names sites gave in earlier replies; it is updated here, so
    that a site which later fails (an error reply made by Flower itself, or no reply at all) is
    still reported under its name. When ``names`` is a :class:`SiteDirectory` (a deployment with
    registered site keys), a reply from an unregistered node or claiming another site's name is
    refused: logged, reported as ``refused`` and left out of the replies returned.

    The replies come back sorted by site name (then node id), not in order of arrival: the
    weighted average of the models is a floating-point sum whose order would otherwise change
    from run to run, and training amplifies that last-bit difference over the rounds.
    """
    replies = sorted(replies, key=lambda r: (site_name(r), r.metadata.src_node_id))
    answered = {reply.metadata.reply_to_message_id for reply in replies}
    outcomes = []
    accepted = []
    for reply in replies:
        node = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error():
            status = "declined" if reply.error.code == SITE_DECLINED else "failed"
            site, reason = parse_error_reason(reply.error.reason or "")
            site = registered_name(names, node) or site or names.get(node, f"node-{node}")
            outcomes.append(SiteOutcome(node, site, status, reason))
            accepted.append(reply)
            continue
        # A site's name is the one registered for its key, whatever its reply says (site_identity).
        refusal = identity_refusal(names, node, claimed_site(reply))
        if refusal is None and reply.metadata.src_node_id != node:
            refusal = f"the reply to a message for node {node} came from node {reply.metadata.src_node_id}"
        if refusal is not None:
            logger.error("Refused a reply: %s", refusal)
            outcomes.append(SiteOutcome(node, names.get(node, f"node-{node}"), "refused", refusal))
            continue
        names[node] = registered_name(names, node) or site_name(reply)
        accepted.append(reply)
        outcomes.append(SiteOutcome(node, names[node], "ok", metrics=reply_metrics(reply.content)))
    for message_id, node in destination.items():
        if message_id not in answered:
            reason = "no reply within the round timeout"
            outcomes.append(SiteOutcome(node, names.get(node, f"node-{node}"), "timeout", reason))
    return accepted, sorted(outcomes, key=lambda o: o.site)


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


Validation = tuple[dict[int, dict[str, float]], list[SiteOutcome]]
"""The sites' scores of a model (node id -> metrics) and one outcome per site."""


def pop_validation(replies: list[Message]) -> dict[int, MetricRecord]:
    """Take the validation record out of each train reply (in place), by node id.

    The train replies are left with exactly the records Flower's aggregation expects.
    """
    return {
        reply.metadata.src_node_id: reply.content.pop(VALIDATION_RECORD)
        for reply in replies
        if not reply.has_error() and VALIDATION_RECORD in reply.content.metric_records
    }


def validation_outcomes(records: dict[int, MetricRecord], train: list[SiteOutcome]) -> Validation:
    """The scores of every site that validated, and one evaluate outcome per train outcome:
    those scores, else why there are none."""
    scores: dict[int, dict[str, float]] = {}
    outcomes: list[SiteOutcome] = []
    for outcome in train:
        record = records.get(outcome.node_id)
        if outcome.status != "ok":
            outcomes.append(SiteOutcome(outcome.node_id, outcome.site, outcome.status, outcome.reason))
        elif record is None:
            reason = "its train reply carried no validation of the model it received"
            outcomes.append(SiteOutcome(outcome.node_id, outcome.site, "failed", reason))
        else:
            scores[outcome.node_id] = reply_metrics(RecordDict({"metrics": record}))
            outcomes.append(SiteOutcome(outcome.node_id, outcome.site, "ok", metrics=scores[outcome.node_id]))
    return scores, outcomes


def aggregated_counts(outcomes: Iterable[SiteOutcome]) -> dict[int, float]:
    """Node id -> example count of every site whose reply was aggregated (its FedAvg weight)."""
    return {
        o.node_id: o.metrics[WEIGHT_KEY] for o in outcomes if o.status == "ok" and WEIGHT_KEY in o.metrics
    }


def mark_dropped(outcomes: list[SiteOutcome], dropped: dict[int, str]) -> None:
    """Report (in place) the sites whose replies were left out of an aggregate, with why."""
    for outcome in outcomes:
        if outcome.status == "ok" and outcome.node_id in dropped:
            outcome.status = "dropped"
            outcome.reason = f"reply not aggregated: {dropped[outcome.node_id]}"
            outcome.metrics = {}


def improves(metric: float, best: float, metric_name: str) -> bool:
    """Is ``metric`` better than ``best``? Lower is better for ``loss``, higher otherwise; an
    undefined (NaN) figure never improves, and anything defined improves on an undefined best."""
    if not math.isfinite(metric):
        return False
    if not math.isfinite(best):
        return True
    return metric < best if metric_name == "loss" else metric > best


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
        validation_mode: str = "in-train",
        batchnorm: BatchNormHook | None = None,
        select_on_coordinator: bool = False,
    ) -> None:
        if validation_mode not in VALIDATION_MODES:
            raise ValueError(f"validation_mode={validation_mode!r}: expected one of {VALIDATION_MODES}")
        if select_on_coordinator and central_evaluate is None:
            raise ValueError("select_on_coordinator needs central_evaluate (the coordinator's hold-out)")
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
        # Registered names (RUN_DIR/sites.json) are who a reply is from, not what it claims.
        self.site_names: dict[int, str] = SiteDirectory(CoordinatorFolder(folder.root).sites_path)
        self.in_train = validation_mode == "in-train"
        self.batchnorm = batchnorm
        # select-on = "coordinator": the best model by the coordinator's hold-out, the initial one included
        self.select_on_coordinator = select_on_coordinator
        self.best_round = 0
        self.best_metric = float("nan")

    def run(self, initial: ArrayRecord, resume: ResumeState | None) -> TeacherResult:
        # pending: the aggregate row of the last trained round while its model waits for validation
        arrays, start_round, pending = (initial, 1, None) if resume is None else self._resume(resume)
        if resume is None and self.select_on_coordinator:
            self._score_initial(initial)
        for server_round in range(start_round, self.num_rounds + 1):
            started = time.monotonic()
            received = arrays
            validate = self.in_train and pending is not None
            arrays, train_metrics, train_outcomes, validation = self._train_round(
                server_round, arrays, validate=validate
            )
            arrays, bn_rows, bn_metrics = self._pooled_batchnorm(server_round, arrays, train_outcomes)
            rows: list[dict[str, Any]] = []
            best_state = None
            if pending is not None and validation is not None:
                val_metrics, eval_outcomes = self._aggregate_validation(int(pending["round"]), *validation)
                closed, is_best = self._close_round(pending, val_metrics, eval_outcomes)
                rows += closed
                best_state = received.to_torch_state_dict() if is_best else None
            rows += [o.row(server_round, "train") for o in train_outcomes] + bn_rows
            row = self._aggregate_row(server_round, train_metrics, train_outcomes) | bn_metrics
            if self.central_evaluate is not None:
                central = self.central_evaluate(arrays.to_torch_state_dict())
                row.update({f"central_{k}": v for k, v in central.items()})
            if self.in_train:
                row["seconds"] = time.monotonic() - started
                pending = row
            else:
                val_metrics, eval_outcomes = self._evaluate_round(server_round, arrays)
                row["seconds"] = time.monotonic() - started
                closed, is_best = self._close_round(row, val_metrics, eval_outcomes)
                rows += closed
                best_state = arrays.to_torch_state_dict() if is_best else None
                pending = None
            # Metrics first, checkpoint state last: a server killed in between repeats the round
            # on resume, and the rows of the repeated round are dropped before it runs again.
            self.folder.append_metrics(rows)
            if best_state is not None:
                self.folder.save_best(self.best_round, best_state, seed=self.seed)
            self.folder.save_round(
                server_round=server_round,
                state_dict=arrays.to_torch_state_dict(),
                strategy_state=strategy_state(self.strategy),
                is_best=False,
                best_round=self.best_round,
                best_metric=self.best_metric,
                seed=self.seed,
                pending_row=pending,
            )
            # the val part only when this round's model is already validated (separate mode)
            metric = None if self.in_train else float(row.get(self.metric_name, float("nan")))
            step = Progress(
                server_round,
                self.num_rounds,
                replied=row["sites_trained"],
                sampled=row["sites_sampled"],
                train_loss=float(train_metrics.get("loss", float("nan"))),
                metric_name=self.shown_metric if metric is not None else "",
                metric=metric,
                best_round=self.best_round,
                seconds=row["seconds"],
            )
            announce(self.folder, step, logger)
        if pending is not None:
            self._final_validation(pending, arrays)
        return TeacherResult(arrays, self.num_rounds, self.best_round, self.best_metric)

    def _resume(self, resume: ResumeState) -> tuple[ArrayRecord, int, dict[str, Any] | None]:
        """The last checkpointed model (its statistics already pooled: they are not pooled
        again), the next round and the pending aggregate row of a resumed run."""
        arrays = ArrayRecord(self.folder.load_model("last"))
        load_strategy_state(self.strategy, self.folder.load_strategy_state())
        self.best_round, self.best_metric = resume.best_round, resume.best_metric
        step = Progress(
            resume.completed_round,
            self.num_rounds,
            phase="resume",
            metric_name=self.selection_metric,
            best_round=self.best_round,
            best_metric=self.best_metric,
        )
        announce(self.folder, step, logger)
        return arrays, resume.completed_round + 1, resume.pending_row

    @property
    def metric_name(self) -> str:
        """The figure that picks the best model: the sites' ``val_`` or the coordinator's ``central_``."""
        return ("central_" if self.select_on_coordinator else "val_") + self.selection_metric

    @property
    def shown_metric(self) -> str:
        """The selection figure's name on progress lines."""
        coordinator = self.select_on_coordinator
        return f"{self.selection_metric} (coordinator)" if coordinator else self.selection_metric

    def _score_initial(self, initial: ArrayRecord) -> None:
        """The initial teacher on the coordinator's hold-out: round 0, the first candidate for best."""
        assert self.central_evaluate is not None
        central = self.central_evaluate(initial.to_torch_state_dict())
        row = {"round": 0, "phase": "start", "site": "_global"}
        row.update({f"central_{k}": v for k, v in central.items()})
        self.best_metric = float(row.get(self.metric_name, float("nan")))
        self.folder.append_metrics([row])
        self.folder.save_best(0, initial.to_torch_state_dict(), seed=self.seed)
        logger.info(
            "Initial teacher on the coordinator's hold-out: %s %.4f (a round must beat it to be delivered)",
            self.selection_metric,
            self.best_metric,
        )

    def _final_validation(self, pending: dict[str, Any], arrays: ArrayRecord) -> None:
        """Validate the last model with one evaluate message (in-train mode) and close its row."""
        server_round = int(pending["round"])
        started = time.monotonic()
        val_metrics, eval_outcomes = self._evaluate_round(server_round, arrays)
        rows, is_best = self._close_round(pending, val_metrics, eval_outcomes)
        rows[-1]["final_validation_seconds"] = time.monotonic() - started
        self.folder.append_metrics(rows)
        if is_best:
            self.folder.save_best(server_round, arrays.to_torch_state_dict(), seed=self.seed)
        self.folder.record_validation(best_round=self.best_round, best_metric=self.best_metric)

    def _aggregate_row(
        self, server_round: int, train_metrics: dict[str, float], outcomes: list[SiteOutcome]
    ) -> dict[str, Any]:
        return {
            "round": server_round,
            "phase": "aggregate",
            "site": "_global",
            "sites_trained": sum(o.status == "ok" for o in outcomes),
            "sites_sampled": len(outcomes),
            **{f"train_{k}": v for k, v in train_metrics.items()},
        }

    def _close_round(
        self, row: dict[str, Any], val_metrics: dict[str, float], eval_outcomes: list[SiteOutcome]
    ) -> tuple[list[dict[str, Any]], bool]:
        """The evaluate rows and the completed aggregate row of a validated round; is it the best?"""
        server_round = int(row["round"])
        figures = row if self.select_on_coordinator else val_metrics
        metric = float(figures.get(self.metric_name, float("nan")))
        # The first round is the best so far even when its metric is undefined (NaN), unless the
        # initial teacher is a candidate (round 0, scored by the coordinator before round 1).
        first = self.best_round == 0 and not self.select_on_coordinator
        is_best = first or improves(metric, self.best_metric, self.selection_metric)
        if is_best:
            self.best_round = server_round
            self.best_metric = metric if math.isfinite(metric) else self.best_metric
        row.update(is_best=is_best, **val_metrics)
        sites = sum(o.status == "ok" for o in eval_outcomes)
        step = Progress(
            server_round,
            self.num_rounds,
            replied=sites,
            metric_name=self.shown_metric,
            metric=metric,
            phase="validation",
            best_round=self.best_round,
        )
        announce(self.folder, step, logger)
        return [o.row(server_round, "evaluate") for o in eval_outcomes] + [row], is_best

    def _train_round(
        self, server_round: int, arrays: ArrayRecord, *, validate: bool
    ) -> tuple[ArrayRecord, dict[str, float], list[SiteOutcome], Validation | None]:
        """Train one round; with ``validate``, the sites also score ``arrays`` (the model they
        receive) and the last item is their validation (messages and outcomes), else None."""
        # Flower's node sampling waits for min-available-sites without a time limit.
        available = len(wait_for_sites(self.grid, self.strategy.min_available_nodes, self.site_wait_timeout))
        if available < self.strategy.min_available_nodes:
            raise RoundFailedError(
                f"round {server_round}: {available} site(s) connected after {self.site_wait_timeout:.0f} s, "
                f"the minimum is {self.strategy.min_available_nodes}. " + RESUME_ADVICE
            )
        _seed_sampling(self.seed, server_round, "train")
        config = ConfigRecord(
            {"phase": "teacher", "num-rounds": self.num_rounds, VALIDATE_INCOMING_KEY: validate}
        )
        messages = self.strategy.configure_train(server_round, arrays, config, self.grid)
        replies, destination = exchange(self.grid, messages, self.round_timeout)
        records = pop_validation(replies)
        replies, outcomes = describe(replies, destination, self.site_names)
        screened = screen_train_replies(replies, arrays)
        mark_dropped(outcomes, screened.dropped)
        validation = validation_outcomes(records, outcomes) if validate else None
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
        new_arrays, metrics = aggregate_train(self.strategy, server_round, screened)
        if new_arrays is None:
            raise RoundFailedError(f"round {server_round}: aggregation produced no model")
        return new_arrays, metrics, outcomes, validation

    def _pooled_batchnorm(
        self, server_round: int, arrays: ArrayRecord, outcomes: list[SiteOutcome]
    ) -> tuple[ArrayRecord, list[dict[str, Any]], dict[str, float]]:
        """The aggregate with BatchNorm statistics recomputed by the sites whose replies it
        averages (``batchnorm``, server/batchnorm.py), before anything validates or saves it;
        its rows and aggregate figures. As it was without ``batchnorm``."""
        if self.batchnorm is None:
            return arrays, [], {}
        counts = {
            o.node_id: o.metrics[WEIGHT_KEY] for o in outcomes if o.status == "ok" and WEIGHT_KEY in o.metrics
        }
        update = self.batchnorm(server_round, arrays, counts)
        return (
            update.arrays,
            [o.row(server_round, BN_STATISTICS_PHASE) for o in update.outcomes],
            update.metrics,
        )

    def _aggregate_validation(
        self, server_round: int, scores: dict[int, dict[str, float]], outcomes: list[SiteOutcome]
    ) -> tuple[dict[str, float], list[SiteOutcome]]:
        """Average the sites' validation scores of the model of ``server_round`` (per metric,
        over the sites that report it); scores without a usable example count are left out."""
        metrics, dropped = aggregate_evaluate(scores)
        mark_dropped(outcomes, dropped)
        for outcome in outcomes:
            if outcome.node_id in dropped:  # (a site whose train reply was dropped is logged already)
                logger.warning("Round %d validation: site %s: %s", server_round, outcome.site, outcome.reason)
        evaluated = sum(o.status == "ok" for o in outcomes)
        if evaluated < self.min_evaluate_sites:
            logger.warning(
                "Round %d: only %d site(s) evaluated (minimum %d); validation metrics are partial",
                server_round,
                evaluated,
                self.min_evaluate_sites,
            )
        return metrics, outcomes

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
        scores = {r.metadata.src_node_id: reply_metrics(r.content) for r in replies if not r.has_error()}
        return self._aggregate_validation(server_round, scores, outcomes)
