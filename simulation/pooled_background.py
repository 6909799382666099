"""The pooled teacher trained in a background process while the federation runs.

The federation leaves part of the machine idle (Ray runs three sites on two cores, so one waits;
the coordinator's MobileNetV2 distillation keeps two threads only about three-quarters busy): on
the demo's 2-core machine a quarter of the CPU time of the federated run went unused. The pooled
teacher needs nothing from the federation (the partition and the teacher's start exist before
round 1), so :class:`PooledTeacherJob` trains it in a child process that only gets CPU time the
federation leaves: a session of its own whose autogroup is at nice 19 (Linux shares the CPU
between sessions before it looks at a process's priority) and Linux's ``SCHED_IDLE`` class (nice
19 elsewhere), on one thread. It runs the same code as before
(:func:`simulation.baselines.train_baseline`) with one thread always, so the pooled teacher of a
seed is the same whether it finished during the federation or after it.

The child is a ``spawn``ed ``multiprocessing`` process: it ignores Ctrl-C (the parent stops it
when the run stops, by its PID: SIGTERM, then SIGKILL) and writes its weights atomically
(:func:`common.checkpoint.save_model`); the parent reads them once the federation is over.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from common.errors import CxrFlError

logger = logging.getLogger(__name__)

POOLED_TEACHER_FILE = "pooled_teacher.pt"
POOLED_TEACHER_THREADS = 1
"""The pooled teacher's threads in the background (and so always: one seed, one pooled teacher)."""
_STOP_WAIT_S = 10.0


class PooledTeacherError(CxrFlError):
    """The background process training the pooled teacher failed."""


def lowest_cpu_priority() -> str:
    """Put this process in the idle scheduling class (Linux) or at nice 19; returns which.

    Linux's autogroups share the CPU between sessions first and only then between the processes
    of a session, so a low priority alone would still compete with the Ray workers (another
    session) as an equal: the process first starts a session of its own and sets that session's
    autogroup to nice 19 (where the kernel has autogroups)."""
    with contextlib.suppress(OSError):
        os.setsid()
        Path("/proc/self/autogroup").write_text("19", encoding="ascii")
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "SCHED_IDLE"
        except OSError:
            pass
    os.nice(19 - os.nice(0))
    return "nice 19"


def train_pooled_teacher_file(out: Path, run_config: dict[str, Any], num_sites: int, target: Path) -> None:
    """The child's work: the pooled teacher of the experiment in ``out``, saved to ``target``."""
    from common.checkpoint import save_model
    from common.local import derive_seed
    from common.run_settings import run_settings_from_config
    from simulation.baselines import PooledData, load_sites, train_baseline

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops this process when the run stops
    priority = lowest_cpu_priority()
    settings = run_settings_from_config(run_config)
    sites = load_sites(out, settings, num_sites)
    logger.info("Baseline: pooled teacher on %d sites' training splits (%s)", len(sites), priority)
    state = train_baseline(
        PooledData(list(sites.values())),
        settings,
        seed=derive_seed(settings.train.seed, "pooled"),
        threads=POOLED_TEACHER_THREADS,
    )
    save_model(state, target, metadata={"role": "pooled teacher (simulation baseline)"})


class PooledTeacherJob:
    """``with PooledTeacherJob(out, run_config, num_sites) as job: ...; state = job.result()``.

    Starts the child on entry; :meth:`result` waits for it and returns the weights; leaving the
    block stops a child still running (an error or Ctrl-C in the federation)."""

    def __init__(self, out: Path, run_config: dict[str, Any], num_sites: int) -> None:
        self.target = Path(out) / "baselines" / POOLED_TEACHER_FILE
        context = multiprocessing.get_context("spawn")
        self.process = context.Process(
            target=train_pooled_teacher_file,
            args=(Path(out), run_config, num_sites, self.target),
            name="cxr-fl pooled teacher",
            daemon=True,
        )

    def __enter__(self) -> PooledTeacherJob:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.target.unlink(missing_ok=True)
        self.process.start()
        logger.info("Pooled teacher training in the background (PID %s)", self.process.pid)
        return self

    def running(self) -> bool:
        return self.process.is_alive()

    def result(self) -> dict[str, torch.Tensor]:
        """Wait for the child; its weights, or PooledTeacherError naming its exit code."""
        from common.checkpoint import load_model_state

        self.process.join()
        if self.process.exitcode != 0 or not self.target.is_file():
            raise PooledTeacherError(
                f"the pooled teacher's background process (PID {self.process.pid}) ended with exit code "
                f"{self.process.exitcode}; its error is in the output above. Re-run the experiment "
                "into a new --out folder."
            )
        return load_model_state(self.target)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, to a child still running (by its PID)."""
        if self.process.pid is None or not self.process.is_alive():
            return
        self.process.terminate()
        self.process.join(_STOP_WAIT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
