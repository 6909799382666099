"""The run folder: everything a coordinator keeps about one federated run.

Its layout (every path, drawn there) is :class:`common.run_layout.RunLayout`'s, which
:class:`RunFolder` extends with reading and writing.

The coordinator's own files beside them (server/deploy.py describes them) are named by
:class:`CoordinatorFolder`; a folder that ``cxr-fl-server serve`` serves holds each submitted run
as ``RUN_DIR/runs/NAME/``, a run folder of this layout. Every other module asks these two types
for a path; none spells the file names (tests/server/test_run_folder_layout.py checks).

Checkpoints, state.json and the JSON files are written atomically (temporary file, then rename),
and state.json last, so a server killed at any moment leaves the previous consistent state
behind, which is what resume relies on; metrics.jsonl and events.jsonl are appended and
trimmed on resume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import ConfigError
from common.jsonio import json_safe, write_json, write_text_atomic
from common.run_layout import RunLayout

if TYPE_CHECKING:  # torch and numpy load only where checkpoints are read or written
    import numpy as np
    import torch

logger = logging.getLogger(__name__)

TEACHER_PHASES = frozenset({"train", "evaluate", "aggregate"})
BN_STATISTICS_PHASE = "bn-statistics"
"""The sites' rows of a teacher round's federated BatchNorm statistics (server/batchnorm.py)."""

# Settings that may differ between the first start and a resume of the same run folder.
RESUMABLE_CHANGES = frozenset({"num-rounds", "round-timeout", "track"})


@dataclass(frozen=True)
class ResumeState:
    """What a restarted server needs to continue where it stopped."""

    completed_round: int
    best_round: int
    best_metric: float
    seed: int
    pending_row: dict[str, Any] | None = None
    """The aggregate row of the last completed round while its model awaits validation."""

    @property
    def validated_round(self) -> int:
        """The last round whose federated validation is in metrics.jsonl."""
        return self.completed_round - 1 if self.pending_row is not None else self.completed_round


class RunFolder(RunLayout):
    """Reads and writes one run folder; its layout (every path) is :class:`RunLayout`'s."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._listeners: list[Callable[[list[dict[str, Any]]], None]] = []

    def on_metrics(self, listener: Callable[[list[dict[str, Any]]], None]) -> None:
        """Call ``listener(rows)`` after each append to metrics.jsonl (an experiment tracker)."""
        self._listeners.append(listener)

    # -- events (the run's progress, server/progress_events.py) --------------------------------
    def append_event(self, event: Mapping[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with self.events_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(json_safe(dict(event)), sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_events(self) -> list[dict[str, Any]]:
        """The events so far (a line being written is skipped until complete)."""
        return _read_jsonl(self.events_path)

    def drop_events_after(self, completed_round: int, validated_round: int) -> None:
        """Before a resume: keep the events of what the resumed run does not do again."""
        if not self.events_path.is_file():
            return
        kept = [e for e in self.read_events() if _event_kept_on_resume(e, completed_round, validated_round)]
        write_text_atomic(self.events_path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in kept))

    def prepare(self, run_config: Mapping[str, Any]) -> ResumeState | None:
        """Create the folder, or check a previous start's settings and return its resume state.

        A folder holding a run with other settings (apart from the number of rounds and the
        round timeout, which may grow) is refused: results of two different runs must not mix.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        config_path = self.config_path
        current = {k: json_safe(v) for k, v in sorted(run_config.items())}
        if config_path.is_file():
            previous = json.loads(config_path.read_text(encoding="utf-8"))
            changed = sorted(
                k
                for k in set(previous) | set(current)
                if k not in RESUMABLE_CHANGES and previous.get(k) != current.get(k)
            )
            if changed:
                key = changed[0]
                raise ConfigError(
                    "run-dir",
                    str(self.root),
                    f"a fresh folder, or the settings of the run already in it (setting '{key}' "
                    f"was {previous.get(key)!r}, now {current.get(key)!r})",
                )
        write_json(config_path, current)
        return self.resume_state()

    def resume_state(self) -> ResumeState | None:
        state_path = self.state_path
        if not state_path.is_file():
            return None
        state = json.loads(state_path.read_text(encoding="utf-8"))
        best = state.get("best_metric")
        return ResumeState(
            completed_round=int(state["completed_round"]),
            best_round=int(state["best_round"]),
            best_metric=float("nan") if best is None else float(best),
            seed=int(state["seed"]),
            pending_row=state.get("pending_row"),
        )

    def append_metrics(self, rows: list[dict[str, Any]]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(json_safe(row), sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for listener in self._listeners:
            listener(rows)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line))
        return rows

    def read_metrics_while_written(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl for a reader beside the running server (the console): a
        line being written is skipped until complete, a folder without the file has none."""
        return _read_jsonl(self.metrics_path)

    def drop_metrics_after(self, completed_round: int, validated_round: int | None = None) -> None:
        """Before a resume: forget rows of a teacher round that never completed, and of every
        later phase (distillation, federated student), which the resumed run does again.

        Validation rows (evaluate, aggregate) are kept up to ``validated_round`` (default: the
        completed round): a round validated in the next round's messages is validated again."""
        validated = completed_round if validated_round is None else validated_round

        def keep(row: dict[str, Any]) -> bool:
            phase, server_round = row.get("phase"), int(row.get("round", 0))
            if phase in ("train", BN_STATISTICS_PHASE):
                return server_round <= completed_round
            return phase in TEACHER_PHASES and server_round <= validated

        rows = [r for r in self.read_metrics() if keep(r)]
        write_text_atomic(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def save_round(
        self,
        *,
        server_round: int,
        state_dict: Mapping[str, torch.Tensor],
        strategy_state: Mapping[str, np.ndarray],
        is_best: bool,
        best_round: int,
        best_metric: float,
        seed: int,
        pending_row: Mapping[str, Any] | None = None,
    ) -> None:
        """Checkpoint a completed round; state.json is written last, so it never points ahead.

        ``pending_row`` is the round's aggregate row when its model is validated later (in the
        next round's train messages, or the final evaluation): see server/rounds.py."""
        import numpy as np

        from common.checkpoint import save_model

        metadata = {"round": server_round, "seed": seed}
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        save_model(dict(state_dict), self.checkpoint("last"), metadata=metadata)
        if is_best:
            save_model(dict(state_dict), self.checkpoint("best"), metadata=metadata)
        strategy_file = self.checkpoints / "strategy.npz"
        if strategy_state:
            fd, tmp = tempfile.mkstemp(dir=self.checkpoints, suffix=".npz")
            os.close(fd)
            np.savez(tmp, **dict(strategy_state))
            os.replace(tmp, strategy_file)
        write_json(
            self.state_path,
            {
                "completed_round": server_round,
                "best_round": best_round,
                "best_metric": best_metric if math.isfinite(best_metric) else None,
                "seed": seed,
                "strategy_file": strategy_file.name if strategy_state else None,
                "pending_row": json_safe(dict(pending_row)) if pending_row is not None else None,
            },
        )

    def save_best(self, server_round: int, state_dict: Mapping[str, torch.Tensor], *, seed: int) -> None:
        """Keep the global teacher of ``server_round`` as best.pt (before state.json names it)."""
        from common.checkpoint import save_model

        self.checkpoints.mkdir(parents=True, exist_ok=True)
        save_model(dict(state_dict), self.checkpoint("best"), metadata={"round": server_round, "seed": seed})

    def record_validation(self, *, best_round: int, best_metric: float) -> None:
        """The last completed round is validated now: no pending row, best round/metric updated."""
        path = self.state_path
        state = json.loads(path.read_text(encoding="utf-8"))
        state.update(
            best_round=best_round,
            best_metric=best_metric if math.isfinite(best_metric) else None,
            pending_row=None,
        )
        write_json(path, state)

    def load_model(self, which: str = "last") -> dict[str, torch.Tensor]:
        from common.checkpoint import load_model_state

        return load_model_state(self.checkpoint(which))

    def load_strategy_state(self) -> dict[str, np.ndarray]:
        import numpy as np

        path = self.checkpoints / "strategy.npz"
        if not path.is_file():
            return {}
        with np.load(path) as data:
            return {k: data[k] for k in data.files}


class CoordinatorFolder:
    """The coordinator's own files in its folder (server/deploy.py describes them), and the runs
    of a folder that ``cxr-fl-server serve`` serves: ``RUN_DIR/runs/NAME/``, each a run folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.runs_dir = self.root / "runs"
        self.deploy_state_path = self.root / "deploy.json"
        self.sites_path = self.root / "sites.json"
        self.revoked_path = self.root / "revoked.json"
        self.superlink_log = self.root / "superlink.log"
        self.superlink_database = self.root / "superlink.db"
        self.gateway_log = self.root / "gateway.log"
        self.flower_log = self.root / "flower.log"
        self.flwr_home = self.root / "flwr-home"
        self.loopback_tls = self.root / "loopback-tls"

    def run(self, name: str) -> RunFolder:
        return RunFolder(self.runs_dir / name)

    def started_runs(self) -> list[RunFolder]:
        """Every submitted run (one whose settings are written)."""
        name = RunFolder(self.runs_dir).config_path.name
        return [RunFolder(p.parent) for p in self.runs_dir.glob(f"*/{name}")]

    def newest_run(self) -> RunFolder | None:
        """The run submitted last, None before the first."""
        runs = self.started_runs()
        return max(runs, key=lambda r: r.config_path.stat().st_mtime) if runs else None

    def evaluation_dir(self, flower_run_id: int) -> Path:
        """Where the cross-site table of Flower run ``flower_run_id`` is written."""
        return self.root / "evaluations" / f"run-{flower_run_id}"


def finished_runs(root: Path) -> list[RunFolder]:
    """Run folders beside ``root`` and inside it (its served runs included) with a summary."""
    name = RunFolder(root).summary_path.name
    found = [p.parent for p in root.parent.glob(f"*/{name}") if p.parent != root]
    found += [p.parent for p in root.glob(f"*/{name}")]
    found += [p.parent for p in CoordinatorFolder(root).runs_dir.glob(f"*/{name}")]
    return [RunFolder(p) for p in found]


def _event_kept_on_resume(event: Mapping[str, Any], completed_round: int, validated_round: int) -> bool:
    """Does a resumed run keep this progress event of an earlier start? Like metrics.jsonl's rows:
    the completed teacher rounds and their validations (and earlier resumes) stay, later phases go."""
    server_round = event.get("round")
    if isinstance(server_round, bool) or not isinstance(server_round, int):
        return False
    phase = event.get("phase")
    if phase in ("teacher", "resume"):
        return server_round <= completed_round
    return phase == "validation" and server_round <= validated_round


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a file appended to line by line (a half-written line is skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
