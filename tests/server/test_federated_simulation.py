"""The federated teacher end to end in Flower's simulation runtime (Ray): rounds, checkpoints,
resume, and differential privacy at the sites. Two synthetic sites, tiny CNN at 32 px."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from common.checkpoint import load_metadata, load_model_state
from common.export import load_torch_model
from common.run_settings import run_settings_from_config
from server.app import initial_teacher
from server.run_folder import RunFolder
from simulation.runtime import FlowerSimulation, SimulationError
from tests.helpers import flower_run_config, two_site_partition

pytestmark = pytest.mark.slow  # make test-slow: three Flower simulations of two and three rounds


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("federation")


@pytest.fixture(scope="module")
def manifests(workspace: Path) -> Path:
    return two_site_partition(workspace / "partition", n_images=160, seed=3)


@pytest.fixture(scope="module")
def simulation(workspace: Path) -> Iterator[FlowerSimulation]:
    with FlowerSimulation(workspace / "flower") as sim:
        yield sim


def _config(run_dir: Path, manifests: Path, **overrides: object) -> dict[str, object]:
    settings: dict[str, object] = {
        "run_dir": str(run_dir),
        "cache_dir": str(run_dir.parent / "cache"),
        "simulation_manifest_dir": str(manifests),
        "teacher_name": "tiny-cnn",
        "image_size": 32,
        "batch_size": 16,
        "lr": 0.05,
        "kd_enabled": False,
        "round_timeout": 300.0,
        "central_eval_manifest": str(manifests / "site_01.csv"),
    }
    settings.update(overrides)
    return flower_run_config(**settings)


def _rows(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _steps(run_dir: Path) -> list[tuple[str, int]]:
    return [(str(e["phase"]), int(e["round"])) for e in RunFolder(run_dir).read_events()]


def test_two_rounds_checkpoint_and_resume_gives_the_straight_run(
    simulation: FlowerSimulation, manifests: Path, workspace: Path
) -> None:
    straight, resumed = workspace / "straight", workspace / "resumed"

    kd = {
        "kd_enabled": True,
        "kd_epochs": 1,
        "kd_width_mult": 0.35,
        "kd_no_kd_baseline": True,
        "kd_federated_student_rounds": 1,
    }
    simulation.run(_config(straight, manifests, num_rounds=2, **kd), num_sites=2)
    simulation.run(_config(resumed, manifests, num_rounds=1, **kd), num_sites=2)
    simulation.run(_config(resumed, manifests, num_rounds=2, **kd), num_sites=2)

    for run_dir in (straight, resumed):
        assert (run_dir / "checkpoints" / "last.pt").is_file()
        assert (run_dir / "checkpoints" / "best.pt").is_file()
        assert (run_dir / "summary.json").is_file()
        assert (run_dir / "learning_curves.png").stat().st_size > 0
        state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
        assert state["completed_round"] == 2
        rows = _rows(run_dir)
        trained = {(r["round"], r["site"]) for r in rows if r["phase"] == "train" and r["status"] == "ok"}
        assert trained == {(1, "site_00"), (1, "site_01"), (2, "site_00"), (2, "site_01")}
        assert [r["round"] for r in rows if r["phase"] == "aggregate"] == [1, 2]
        assert all("val_auroc_macro" in r for r in rows if r["phase"] == "aggregate")
        assert all("central_auroc_macro" in r for r in rows if r["phase"] == "aggregate")
    assert "Resuming run" in (resumed / "server.log").read_text()
    # the progress events continue like metrics.jsonl: the first start's later phases are gone
    straight_steps, resumed_steps = (_steps(run_dir) for run_dir in (straight, resumed))
    assert [step for step in resumed_steps if step[0] != "resume"] == straight_steps
    assert ("resume", 1) in resumed_steps
    assert ("distill", -1) in straight_steps

    initial = initial_teacher(run_settings_from_config(_config(straight, manifests))).to_torch_state_dict()
    final_straight = load_model_state(straight / "checkpoints" / "last.pt")
    final_resumed = load_model_state(resumed / "checkpoints" / "last.pt")
    assert any(not torch.equal(initial[k], final_straight[k]) for k in initial)
    for key, value in final_straight.items():
        torch.testing.assert_close(final_resumed[key], value, rtol=0, atol=1e-6, msg=key)


def test_distillation_round_leaves_a_checked_student_and_model_card_at_each_site(
    simulation: FlowerSimulation, manifests: Path, workspace: Path
) -> None:
    run_dir = workspace / "straight"  # written by the test above (same module, same order)
    if not (run_dir / "summary.json").is_file():
        pytest.skip("needs the two-round run of the previous test")
    distill = [r for r in _rows(run_dir) if r["phase"] == "distill"]
    assert {r["site"] for r in distill} == {"site_00", "site_01"}
    for row in distill:
        assert row["status"] == "ok"
        for key in ("teacher_auroc_macro", "student_auroc_macro", "nokd_auroc_macro", "student_onnx_ms"):
            assert key in row
        assert row["onnx_max_abs_diff"] <= 1e-4
        assert (run_dir / "sites" / str(row["site"]) / "nokd_student.pt").is_file()
        student = run_dir / "sites" / str(row["site"]) / "student"
        session = ort.InferenceSession(str(student / "student.onnx"), providers=["CPUExecutionProvider"])
        loaded = load_torch_model(student)
        images = np.random.default_rng(0).normal(size=(3, 1, 32, 32)).astype(np.float32)
        with torch.no_grad():
            expected = loaded.model.eval()(torch.from_numpy(images)).numpy()
        assert np.abs(session.run(None, {"image": images})[0] - expected).max() <= 1e-4
        card = json.loads((student / "model_card.json").read_text())
        for field in (
            "data_counts",
            "classes",
            "metrics",
            "teacher_dp_epsilon",
            "size_mb",
            "parameters",
            "flops",
            "latency",
            "files",
        ):
            assert field in card, field
        assert card["metrics"], "teacher vs student metrics"
        assert all(len(digest) == 64 for digest in card["files"].values())
        assert (student / "model_card.md").is_file()


def test_federated_student_is_averaged_saved_and_exported_at_each_site(workspace: Path) -> None:
    run_dir = workspace / "straight"
    if not (run_dir / "summary.json").is_file():
        pytest.skip("needs the two-round run of the first test")
    rows = _rows(run_dir)
    assert {(r["phase"], r["site"], r["status"]) for r in rows if r["phase"].startswith("student")} == {
        ("student", "site_00", "ok"),
        ("student", "site_01", "ok"),
        ("student-final", "site_00", "ok"),
        ("student-final", "site_01", "ok"),
    }
    assert (run_dir / "checkpoints" / "student.pt").is_file()
    for site in ("site_00", "site_01"):
        exported = run_dir / "sites" / site / "global_student"
        assert (exported / "student.onnx").is_file()
        assert (exported / "model_card.json").is_file()


def test_dp_epsilon_grows_per_round_within_target_and_a_spent_site_declines(
    simulation: FlowerSimulation, manifests: Path, workspace: Path
) -> None:
    run_dir = workspace / "dp"
    target = 4.0
    dp = {"dp_enabled": True, "dp_target_epsilon": target, "teacher_norm": "group", "min_train_sites": 2}

    simulation.run(_config(run_dir, manifests, num_rounds=2, **dp), num_sites=2)
    epsilons: dict[str, list[float]] = {}
    for row in _rows(run_dir):
        if row["phase"] == "train":
            epsilons.setdefault(str(row["site"]), []).append(float(row["dp_epsilon"]))
    assert set(epsilons) == {"site_00", "site_01"}
    for spent in epsilons.values():
        assert len(spent) == 2
        assert 0 < spent[0] < spent[1] <= target

    # The coordinator extends the run by a round: the sites' budgets were planned for two.
    with pytest.raises(SimulationError):
        simulation.run(_config(run_dir, manifests, num_rounds=3, **dp), num_sites=2)
    third = [r for r in _rows(run_dir) if r["round"] == 3]
    assert {r["site"] for r in third} == {"site_00", "site_01"}
    assert all(r["phase"] == "train" and r["status"] == "declined" for r in third)
    assert all("privacy budget spent" in str(r["reason"]) for r in third)
    log = (run_dir / "server.log").read_text()
    assert log.count("declined") >= 2
    assert "privacy budget spent" in log
    assert json.loads((run_dir / "checkpoints" / "state.json").read_text())["completed_round"] == 2


def _central_statistics(
    state: dict[str, torch.Tensor], manifests: Path, run_dir: Path
) -> dict[str, np.ndarray]:
    """One pass over both sites' train splits at one party, in the sites' batches: the
    running_var (and mean) of every BatchNorm layer for ``state``'s weights."""
    from client.app import data_request
    from client.site import site_from_node_config
    from common.batchnorm_stats import pooled_statistics, positions_per_image, site_moments
    from common.local import EVAL_BATCH_SIZE, build_loaded_model, load_site_data

    settings = run_settings_from_config(_config(run_dir, manifests))
    datasets = []
    for partition in (0, 1):
        site = site_from_node_config({"partition-id": partition, "num-partitions": 2}, settings)
        datasets.append(load_site_data(data_request(settings, site)).dataset("train"))
    union = torch.utils.data.ConcatDataset(datasets)
    offsets = np.cumsum([0, *(len(d) for d in datasets)])
    batches = [  # a batch never mixes sites, as at the sites
        list(range(start, min(start + EVAL_BATCH_SIZE, end)))
        for begin, end in itertools.pairwise(offsets)
        for start in range(begin, end, EVAL_BATCH_SIZE)
    ]
    model = build_loaded_model(settings.teacher, settings.task, state)
    moments = site_moments(model, torch.utils.data.DataLoader(union, batch_sampler=batches))
    positions = positions_per_image(model, settings.teacher.in_channels, settings.run.image_size)
    pooled = pooled_statistics([(moments.images, moments.arrays())], positions)
    out = {f"{layer}.running_mean": mean for layer, (mean, _) in pooled.items()}
    out.update({f"{layer}.running_var": var for layer, (_, var) in pooled.items()})
    return out


def test_federated_batchnorm_statistics_are_those_of_one_pass_over_both_sites(
    simulation: FlowerSimulation, manifests: Path, workspace: Path
) -> None:
    # Execute: one round each (bn-statistics = "federated" pools the delivered teacher, best.pt);
    # the same training, only the statistics differ
    federated, averaged = workspace / "bn_federated", workspace / "bn_averaged"
    simulation.run(_config(federated, manifests, num_rounds=1), num_sites=2)
    simulation.run(_config(averaged, manifests, num_rounds=1, bn_statistics="averaged"), num_sites=2)

    # Assert
    with_pooled = load_model_state(federated / "checkpoints" / "best.pt")
    with_average = load_model_state(averaged / "checkpoints" / "best.pt")
    central = _central_statistics(with_average, manifests, federated)  # the aggregate's weights
    assert central, "tiny-cnn has BatchNorm layers"
    for key, value in with_pooled.items():
        if key in central:
            np.testing.assert_allclose(value.numpy(), central[key], rtol=1e-4, atol=1e-5, err_msg=key)
        else:  # weights and num_batches_tracked: the aggregate's
            torch.testing.assert_close(value, with_average[key], rtol=0, atol=1e-6, msg=key)
    assert any(not np.allclose(with_average[k].numpy(), v, rtol=1e-2, atol=1e-3) for k, v in central.items())
    rows = _rows(federated)
    assert {(r["site"], r["status"]) for r in rows if r["phase"] == "bn-statistics"} == {
        ("site_00", "ok"),
        ("site_01", "ok"),
    }
    assert load_metadata(federated / "checkpoints" / "best.pt")["bn_statistics"] == "pooled"
    assert "bn_statistics" not in load_metadata(
        federated / "checkpoints" / "last.pt"
    )  # training goes on from it
    assert not [r for r in _rows(averaged) if r["phase"] == "bn-statistics"]
