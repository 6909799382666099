"""The site's record of privacy spent in a run, kept on the site's own disk.

Flower's ``context.state`` is lost when a run is resumed as a new Flower run, and is pushed
back under a short timer at exit; the budget must outlive both. So the plan (noise multiplier
etc.) and the accountant history live in ``<out-dir>/privacy/<run-key>.json``, rewritten
atomically after every round. The file holds only the DP plan and per-round accountant steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from common.privacy import AccountantHistory, DPPlan


def run_key(run_dir: str, run_id: int, seed: int) -> str:
    """A stable key of the run: its run folder when set (survives resume), else Flower's id."""
    identity = run_dir or f"flower-run-{run_id}"
    return hashlib.sha1(f"{identity}|{seed}".encode()).hexdigest()[:16]


@dataclass
class PrivacyLedger:
    path: Path
    plan: DPPlan | None = None
    history: AccountantHistory = field(default_factory=list)
    epsilon_by_round: dict[int, float] = field(default_factory=dict)

    @classmethod
    def open(cls, out_dir: Path, key: str) -> PrivacyLedger:
        path = out_dir / "privacy" / f"{key}.json"
        if not path.is_file():
            return cls(path)
        data = json.loads(path.read_text(encoding="utf-8"))
        plan = DPPlan.from_json(data["plan"]) if data.get("plan") else None
        history = [(float(s), float(q), int(n)) for s, q, n in data.get("history", [])]
        spent = {int(k): float(v) for k, v in data.get("epsilon_by_round", {}).items()}
        return cls(path, plan, history, spent)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "plan": self.plan.to_json() if self.plan else None,
            "history": [list(h) for h in self.history],
            "epsilon_by_round": {str(k): v for k, v in sorted(self.epsilon_by_round.items())},
        }
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
        os.replace(tmp, self.path)
