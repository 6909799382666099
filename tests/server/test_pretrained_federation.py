"""A federation started from a pretrained file, end to end in Flower's simulation runtime: the run
carries the initial teacher's hash, DP sites fine-tune it with frozen blocks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.checkpoint import load_model_state, save_model
from common.config import ModelConfig
from common.initial_teacher import build_initial_teacher
from common.models import build_model
from common.tasks import get_task
from simulation.runtime import FlowerSimulation
from tests.helpers import flower_run_config, two_site_partition


def test_dp_sites_fine_tune_a_pretrained_nih_backbone_with_frozen_blocks(tmp_path: Path) -> None:
    task = get_task("normal-pneumonia-covid")
    manifests = two_site_partition(tmp_path / "partition", n_images=96, seed=5)
    torch.manual_seed(11)
    pretrained = tmp_path / "nih.pt"  # a 14-finding teacher: its backbone, a new 3-class head
    save_model(build_model(ModelConfig(name="tiny-cnn", norm="group"), 14).state_dict(), pretrained)
    teacher = build_initial_teacher(ModelConfig(name="tiny-cnn", norm="group", weights=pretrained), task, 0)
    run_dir = tmp_path / "run"
    config = flower_run_config(
        run_dir=str(run_dir),
        cache_dir=str(tmp_path / "cache"),
        simulation_manifest_dir=str(manifests),
        teacher_name="tiny-cnn",
        teacher_norm="group",
        teacher_weights=str(pretrained),
        initial_teacher_sha256=teacher.sha256,
        freeze_blocks=2,
        dp_enabled=True,
        dp_target_epsilon=20.0,
        image_size=32,
        batch_size=16,
        num_rounds=1,
        kd_enabled=False,
    )

    with FlowerSimulation(tmp_path / "flower") as simulation:
        simulation.run(config, num_sites=2)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["phase"] == "train"]
    assert {(r["site"], r["status"]) for r in trained} == {("site_00", "ok"), ("site_01", "ok")}
    assert all(r["dp_epsilon"] > 0 for r in trained)
    final = load_model_state(run_dir / "checkpoints" / "last.pt")
    for key, start in teacher.state.items():
        if key.startswith(("features.0.", "features.1.")):  # frozen: the pretrained backbone, as loaded
            torch.testing.assert_close(final[key], start, rtol=0, atol=1e-6, msg=key)  # FedAvg's rounding
    assert not torch.equal(final["head.1.weight"], teacher.state["head.1.weight"])
    assert "2 re-initialised for this task" in (run_dir / "server.log").read_text(encoding="utf-8")
