"""The layout of a coordinator's run folder: where each of its files lives, and nothing else.

Layout::

    RUN_DIR/
      run_config.json        resolved settings (written at the first start, checked on resume)
      metrics.jsonl          one line per round, phase and site (+ one aggregate line per round)
      events.jsonl           the run's progress, one event per step (server/progress_events.py)
      server.log             the ServerApp's log (for people: no code reads its wording)
      checkpoints/
        last.pt (+ .sha256)  global teacher after the last completed round
        best.pt (+ .sha256)  global teacher with the best federated-validation metric so far
        state.json           last completed round, best round/metric, seeds
        strategy.npz         server-side optimiser state (FedAdam / FedYogi), when any
        student.pt           the federated student (kd-federated-student-rounds > 0)
      summary.json / .md     written when the run ends
      learning_curves.png    aggregate loss and validation metric per round
      distillation.json      per-site teacher vs student metrics (distillation phase)
      federated_student.json per-site metrics of the federated student, when any
      public_student.json    the students' start distilled at the coordinator, when any
      sites/<site>/          in simulations: each site's output folder

:class:`RunLayout` names every one of these paths; server/run_folder.py's
:class:`~server.run_folder.RunFolder` extends it with reading and writing them. It lives in
``common`` because a site's and a simulation's code find paths in a run folder too (a simulated
site's output folder, a coordinator checkpoint's settings beside it) and may not import
``server``. No other module spells these names (tests/server/test_run_folder_layout.py).
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = "checkpoints"
RUN_CONFIG = "run_config.json"


class RunLayout:
    """The paths of the run folder at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / CHECKPOINTS

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def events_path(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def config_path(self) -> Path:
        """The run's resolved settings (``run_config.json``)."""
        return self.root / RUN_CONFIG

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    @property
    def state_path(self) -> Path:
        return self.checkpoints / "state.json"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    @property
    def summary_markdown_path(self) -> Path:
        return self.root / "summary.md"

    @property
    def learning_curves_path(self) -> Path:
        return self.root / "learning_curves.png"

    @property
    def distillation_path(self) -> Path:
        return self.root / "distillation.json"

    @property
    def federated_student_path(self) -> Path:
        return self.root / "federated_student.json"

    @property
    def public_student_path(self) -> Path:
        return self.root / "public_student.json"

    @property
    def overrides_path(self) -> Path:
        """The settings submitted with ``flwr run`` (``run_overrides.toml``, read by ``--resume``)."""
        return self.root / "run_overrides.toml"

    @property
    def default_cache_dir(self) -> Path:
        """The image cache when the run setting ``cache-dir`` names none."""
        return self.root / "cache"

    @property
    def sites_dir(self) -> Path:
        """Each simulated site's output folder: ``sites/<site>/``."""
        return self.root / "sites"

    def site_dir(self, site: str) -> Path:
        return self.sites_dir / site

    def checkpoint(self, which: str) -> Path:
        """``checkpoints/<which>.pt``: last, best, student, or the students' start."""
        return self.checkpoints / f"{which}.pt"

    def holds_run(self) -> bool:
        """Has a run already started (a checkpointed round) or finished here?"""
        return self.state_path.is_file() or self.summary_path.is_file()

    def summary_written_since(self, started: float) -> bool:
        """Did a run that started at ``started`` (wall clock) write its summary?"""
        return self.summary_path.is_file() and self.summary_path.stat().st_mtime >= started


def checkpoint_run_config(weights: Path) -> Path | None:
    """The settings (``run_config.json``) of the run whose ``checkpoints/`` holds ``weights``;
    None when ``weights`` is not in a run folder's checkpoints or the settings are missing."""
    if weights.parent.name != CHECKPOINTS:
        return None
    run_config = RunLayout(weights.parent.parent).config_path
    return run_config if run_config.is_file() else None
