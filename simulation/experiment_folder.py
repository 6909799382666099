"""Where an experiment folder (simulation/experiment.py describes it) keeps the coordinator's
run folder: ``OUT/run/``, whose own layout server/run_folder.py owns."""

from __future__ import annotations

from pathlib import Path

from server.run_folder import RunFolder


def experiment_run(out: Path) -> RunFolder:
    """The run folder of the experiment in ``out``."""
    return RunFolder(Path(out) / "run")
