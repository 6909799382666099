"""Strategies by name: settings checks, NaN-safe metric averaging, and server-side state."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedYogi, Krum

from common.errors import ConfigError, UnknownNameError
from common.protocol import WEIGHT_KEY
from common.run_settings import from_mapping
from server.strategies import (
    STRATEGIES,
    StrategySettings,
    build_strategy,
    finite_weighted_mean,
    load_strategy_state,
    strategy_state,
)


def _reply(weight: int, **metrics: float) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({WEIGHT_KEY: weight, **metrics})})


@pytest.mark.parametrize(
    ("name", "settings", "kind"),
    [
        ("fedavg", {}, FedAvg),
        ("fedprox", {"proximal_mu": 0.1}, FedProx),
        ("fedadam", {}, FedAdam),
        ("fedyogi", {}, FedYogi),
        ("fedmedian", {}, FedMedian),
        ("krum", {"krum_malicious": 1}, Krum),
    ],
)
def test_every_registered_name_builds_flowers_strategy(name: str, settings: dict, kind: type) -> None:
    strategy = build_strategy(StrategySettings(strategy=name, **settings))
    assert type(strategy) is kind
    assert strategy.min_available_nodes == 2
    assert strategy.weighted_by_key == WEIGHT_KEY


def test_registry_names_are_the_documented_strategies() -> None:
    assert STRATEGIES.names() == ["fedadam", "fedavg", "fedmedian", "fedprox", "fedyogi", "krum"]
    with pytest.raises(UnknownNameError, match="fedavg"):
        StrategySettings(strategy="fedbest")


@pytest.mark.parametrize(
    ("settings", "option"),
    [
        ({"fraction_train": 0.0}, "fraction-train"),
        ({"fraction_evaluate": 1.5}, "fraction-evaluate"),
        ({"min_train_sites": 0}, "min-train-sites"),
        ({"min_train_sites": 3, "min_available_sites": 2}, "min-available-sites"),
        ({"strategy": "fedprox"}, "proximal-mu"),
        ({"server_lr": 0.0}, "server-lr"),
        ({"krum_malicious": -1}, "krum-malicious"),
    ],
)
def test_bad_settings_name_the_option(settings: dict, option: str) -> None:
    with pytest.raises(ConfigError, match=option):
        StrategySettings(**settings)


def test_settings_come_from_the_run_config_keys() -> None:
    settings = from_mapping(StrategySettings, {"strategy": "fedprox", "proximal-mu": 0.5, "lr": 0.1})
    assert (settings.strategy, settings.proximal_mu) == ("fedprox", 0.5)


def test_metric_mean_is_weighted_and_skips_non_finite_values() -> None:
    mean = finite_weighted_mean(
        [_reply(1, auroc=0.5, loss=1.0), _reply(3, auroc=math.nan, loss=2.0)], WEIGHT_KEY
    )
    assert mean["auroc"] == pytest.approx(0.5)
    assert mean["loss"] == pytest.approx((1.0 + 3 * 2.0) / 4)
    assert mean[WEIGHT_KEY] == 4


def test_adaptive_strategy_state_round_trips() -> None:
    strategy = build_strategy(StrategySettings(strategy="fedadam"))
    assert isinstance(strategy, FedAdam)
    strategy.current_arrays = {"w": np.ones(3)}  # type: ignore[assignment]
    strategy.m_t = {"w": np.full(3, 0.5)}  # type: ignore[assignment]
    state = strategy_state(strategy)
    assert sorted(state) == ["current_arrays/w", "m_t/w"]
    fresh = build_strategy(StrategySettings(strategy="fedadam"))
    load_strategy_state(fresh, state)
    np.testing.assert_array_equal(fresh.m_t["w"], np.full(3, 0.5))  # type: ignore[index]
    assert strategy_state(build_strategy(StrategySettings())) == {}
