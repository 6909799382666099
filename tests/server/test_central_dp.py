"""Central DP (Flower's client-side fixed clipping): sites clip, the server adds calibrated noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.checkpoint import load_model_state
from common.errors import ConfigError
from common.protocol import WEIGHT_KEY
from common.run_settings import run_settings_from_config
from flower_adapter.central_dp import KEY_CLIPPING_NORM, clip_update
from server.app import initial_teacher
from server.central_dp import CentralDP, CentralDPSettings, check_central_dp, site_level_epsilon
from server.strategies import StrategySettings, build_strategy
from simulation.runtime import FlowerSimulation
from tests.helpers import flower_run_config, two_site_partition


def _norm(state: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in state.values())))


def test_a_site_clips_its_update_to_the_norm_and_keeps_its_direction() -> None:
    start = {"w": torch.zeros(4, 4), "b": torch.ones(3)}
    trained = {"w": torch.full((4, 4), 2.0), "b": torch.ones(3) + 2.0}

    clipped = clip_update(start, trained, 0.5)

    update = {k: clipped[k] - start[k] for k in start}
    assert _norm(update) == pytest.approx(0.5, rel=1e-5)
    full = {k: trained[k] - start[k] for k in start}
    for key in start:  # the same direction, shorter
        torch.testing.assert_close(update[key] / 0.5, full[key] / _norm(full))
    small = {"w": torch.full((4, 4), 0.01), "b": torch.ones(3)}
    torch.testing.assert_close(clip_update(start, small, 0.5)["w"], small["w"])  # within the norm: as is
    for bad in (0.0, -1.0, float("nan"), "1.0", True):
        with pytest.raises(ConfigError, match=KEY_CLIPPING_NORM):
            clip_update(start, trained, bad)


@pytest.mark.usefixtures("flower_task_identity")
def test_the_server_adds_noise_of_z_c_over_n_and_accounts_site_level_epsilon() -> None:
    settings = CentralDPSettings(noise_multiplier=2.0, clipping_norm=0.5)
    strategy = CentralDP(build_strategy(StrategySettings()), settings, num_sampled_sites=2)
    assert strategy.min_available_nodes == 2  # the round loop reads the wrapped strategy's settings
    weights = torch.zeros(20_000)

    def reply() -> Message:
        sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train")
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": weights.clone()}),
                "metrics": MetricRecord({WEIGHT_KEY: 100, "loss": 1.0}),
            }
        )
        return Message(content, reply_to=sent)

    epsilons = []
    for server_round in (1, 2):
        arrays, metrics = strategy.aggregate_train(server_round, [reply(), reply()])
        assert arrays is not None
        assert metrics is not None
        noise = arrays["w"].numpy()
        assert noise.std() == pytest.approx(2.0 * 0.5 / 2, rel=0.05)  # z * C / n
        epsilons.append(metrics["central_dp_epsilon"])
    assert epsilons[0] < epsilons[1]
    assert epsilons[1] == pytest.approx(site_level_epsilon(2.0, 2, 1e-5))


def test_central_dp_rules_are_checked_before_a_run() -> None:
    on = CentralDPSettings(noise_multiplier=1.0)
    check_central_dp(on, "fedavg", "group")
    check_central_dp(CentralDPSettings(), "krum", "batch")  # off: nothing to check
    with pytest.raises(ConfigError, match="strategy"):
        check_central_dp(on, "krum", "group")
    with pytest.raises(ConfigError, match="teacher-norm"):
        check_central_dp(on, "fedavg", "batch")
    with pytest.raises(ConfigError, match="central-dp-clipping-norm"):
        CentralDPSettings(noise_multiplier=1.0, clipping_norm=0.0)
    assert site_level_epsilon(1.0, 0, 1e-5) == 0.0


def test_a_federation_under_central_dp_releases_noised_rounds(tmp_path: Path) -> None:
    manifests = two_site_partition(tmp_path / "partition", n_images=96, seed=5)
    run_dir = tmp_path / "run"
    config = flower_run_config(
        run_dir=str(run_dir),
        cache_dir=str(tmp_path / "cache"),
        simulation_manifest_dir=str(manifests),
        teacher_name="tiny-cnn",
        teacher_norm="group",
        central_dp_noise_multiplier=1e-3,  # tiny noise: the clipping shows in the released models
        central_dp_clipping_norm=0.01,
        image_size=32,
        batch_size=16,
        lr=0.1,
        num_rounds=2,
        kd_enabled=False,
    )

    with FlowerSimulation(tmp_path / "flower") as simulation:
        simulation.run(config, num_sites=2)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {(r["round"], r["status"]) for r in rows if r["phase"] == "train"} == {(1, "ok"), (2, "ok")}
    log = (run_dir / "server.log").read_text(encoding="utf-8")
    assert "central DP: round 2 released" in log
    assert f"epsilon {site_level_epsilon(1e-3, 2, 1e-5):.3f}" in log
    start = initial_teacher(run_settings_from_config(config)).to_torch_state_dict()
    final = load_model_state(run_dir / "checkpoints" / "last.pt")
    moved = _norm({k: final[k] - start[k] for k in start})
    assert 0 < moved <= 2 * 0.01 + 0.002  # two rounds of updates clipped at the sites to 0.01 each
