"""Aggregation strategies by name, all Flower's own implementations, configured from run_config.

``fedavg`` (default), ``fedprox`` (proximal-mu), ``fedadam`` / ``fedyogi`` (server-lr),
``fedmedian`` and ``krum`` (robust aggregation). The names double as the ``strategy`` run
setting; its settings (:class:`common.config.StrategySettings`, names in ``STRATEGY_NAMES``) are
read and checked with every other run setting (common/run_settings.py). Metrics from sites are
averaged per key, ignoring non-finite values (a site whose validation split lacks a class
reports NaN for that class's AUROC; it must not poison the average), by server/aggregation.py,
which also leaves out replies that cannot be aggregated.

Strategy state that must survive a server restart (FedAdam/FedYogi moments) is exported with
:func:`strategy_state` and restored with :func:`load_strategy_state`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedYogi, Krum

from common.config import StrategySettings
from common.protocol import WEIGHT_KEY
from common.registry import Registry
from server.aggregation import reply_metrics, weighted_mean_per_key


def finite_weighted_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Flower's metric hook: every metric averaged over the replies that carry it, weighted by
    examples, skipping NaN/inf values; ``weight_key`` holds the total example count.

    The round loop hands a strategy replies whose metrics are their example counts only and
    averages the sites' metrics itself (server/aggregation.py); the hook gives the same
    average to anything else that calls the strategy."""
    if weight_key != WEIGHT_KEY:
        raise ValueError(f"weight_key={weight_key!r}: the sites weight their replies by {WEIGHT_KEY!r}")
    averaged = weighted_mean_per_key(reply_metrics(record) for record in records)
    return MetricRecord({**averaged, WEIGHT_KEY: int(averaged[WEIGHT_KEY])})


StrategyBuilder = Callable[[StrategySettings], FedAvg]
STRATEGIES: Registry[StrategyBuilder] = Registry("strategy")


def _common(settings: StrategySettings) -> dict[str, object]:
    return {
        "fraction_train": settings.fraction_train,
        "fraction_evaluate": settings.fraction_evaluate,
        "min_train_nodes": settings.min_train_sites,
        "min_evaluate_nodes": settings.min_evaluate_sites,
        "min_available_nodes": settings.min_available_sites,
        "weighted_by_key": WEIGHT_KEY,
        "train_metrics_aggr_fn": finite_weighted_mean,
        "evaluate_metrics_aggr_fn": finite_weighted_mean,
    }


STRATEGIES.add("fedavg", lambda s: FedAvg(**_common(s)))  # type: ignore[arg-type]
STRATEGIES.add("fedprox", lambda s: FedProx(**_common(s), proximal_mu=s.proximal_mu))  # type: ignore[arg-type]
STRATEGIES.add("fedadam", lambda s: FedAdam(**_common(s), eta=s.server_lr))  # type: ignore[arg-type]
STRATEGIES.add("fedyogi", lambda s: FedYogi(**_common(s), eta=s.server_lr))  # type: ignore[arg-type]
STRATEGIES.add("fedmedian", lambda s: FedMedian(**_common(s)))  # type: ignore[arg-type]
STRATEGIES.add("krum", lambda s: Krum(**_common(s), num_malicious_nodes=s.krum_malicious))  # type: ignore[arg-type]


def build_strategy(settings: StrategySettings) -> FedAvg:
    return STRATEGIES.get(settings.strategy)(settings)


_STATE_ATTRIBUTES = ("current_arrays", "m_t", "v_t")


def strategy_state(strategy: FedAvg) -> dict[str, np.ndarray]:
    """Flat ``{"m_t/<param>": array, ...}`` of the strategy's server-side optimiser state."""
    state: dict[str, np.ndarray] = {}
    for attribute in _STATE_ATTRIBUTES:
        arrays = getattr(strategy, attribute, None)
        if arrays:
            for key, value in arrays.items():
                state[f"{attribute}/{key}"] = np.asarray(value)
    return state


def load_strategy_state(strategy: FedAvg, state: dict[str, np.ndarray]) -> None:
    """Restore what :func:`strategy_state` exported (no-op for stateless strategies)."""
    for attribute in _STATE_ATTRIBUTES:
        prefix = f"{attribute}/"
        arrays = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if arrays and hasattr(strategy, attribute):
            setattr(strategy, attribute, arrays)
