"""The pooled teacher trained beside the federation (simulation/pooled_background.py)."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch

from common.local import derive_seed
from common.run_settings import run_settings_from_config
from simulation.baselines import PooledData, load_sites, train_baseline
from simulation.experiment import Experiment, ExperimentConfig, PartitionSpec
from simulation.pooled_background import (
    POOLED_TEACHER_THREADS,
    PooledTeacherError,
    PooledTeacherJob,
    lowest_cpu_priority,
)
from tests.simulation.helpers import SITES, TINY_RUN


def _prepared(tmp_path: Path) -> tuple[Path, dict[str, object], int]:
    out = tmp_path / "exp"
    config = ExperimentConfig(
        out=out, sources=SITES, partition=PartitionSpec(name="iid", sites=2), run_config=dict(TINY_RUN)
    )
    run_config, num_sites = Experiment(config).prepare()
    return out, run_config, num_sites


def test_the_background_pooled_teacher_is_the_one_trained_here_on_one_thread(tmp_path: Path) -> None:
    out, run_config, num_sites = _prepared(tmp_path)
    with PooledTeacherJob(out, run_config, num_sites) as job:
        background = job.result()

    settings = run_settings_from_config(run_config)
    sites = load_sites(out, settings, num_sites)
    here = train_baseline(
        PooledData(list(sites.values())),
        settings,
        seed=derive_seed(settings.train.seed, "pooled"),
        threads=POOLED_TEACHER_THREADS,
    )
    assert background.keys() == here.keys()
    assert all(torch.equal(background[k], here[k]) for k in here)
    assert not job.running()


def test_leaving_the_block_stops_a_running_job_and_its_result_is_an_error(tmp_path: Path) -> None:
    out, run_config, num_sites = _prepared(tmp_path)
    with PooledTeacherJob(out, run_config, num_sites) as job:
        pid = job.process.pid
        assert job.running()
    assert not job.running()
    assert job.process.exitcode == -signal.SIGTERM
    assert pid is not None
    assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(PooledTeacherError, match="exit code -15"):
        job.result()
    assert not (out / "baselines" / "pooled_teacher.pt").exists()


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux's idle scheduling class")
def test_the_child_runs_in_the_idle_class_in_a_session_of_its_own_at_autogroup_nice_19() -> None:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        priority, policy, own_session, autogroup = pool.apply(_priority_in_child)
    assert priority == "SCHED_IDLE"
    assert policy == os.SCHED_IDLE
    assert own_session  # so the kernel's autogroups do not share the CPU with it as with an equal
    if Path("/proc/self/autogroup").exists():
        assert autogroup.endswith("nice 19")


def _priority_in_child() -> tuple[str, int, bool, str]:
    priority = lowest_cpu_priority()
    autogroup = Path("/proc/self/autogroup")
    text = autogroup.read_text().strip() if autogroup.exists() else ""
    return priority, os.sched_getscheduler(0), os.getsid(0) == os.getpid(), text
