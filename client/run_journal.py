"""What a deployed site has seen of each Flower run it took part in: one small JSON file per run.

Kept under ``OUT/runs/run_<run id>.json``, keyed by Flower's run id (``context.run_id``): a
resumed federation (``cxr-fl-server start --resume``) is a new Flower run with a new id, so
nothing a site recorded in one run vouches for another. The site's teacher pin
(client/teacher_pin.py) records here what the run started from at this site's first message;
the site policy (client/site_policy.py) counts the messages of each kind the run has sent.

A journal that cannot be read is refused (IntegrityError), never taken for a fresh run: a
fresh journal would let a run start over at a site that already counted or checked it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import IntegrityError
from common.jsonio import write_json

JOURNAL_DIR = "runs"


@dataclass
class RunJournal:
    """This site's record of one run: what it started from, and what it was asked to do."""

    path: Path
    run_id: int
    # kind of message (Flower message type) -> number this site accepted in the run
    messages: dict[str, int] = field(default_factory=dict)
    # the pinned teacher the run started from at this site's first message ("" = no pin then)
    started_from: str | None = None
    # message types this site completed in the run (e.g. the distillation round)
    completed: list[str] = field(default_factory=list)

    @property
    def is_new(self) -> bool:
        """No message of this run was accepted at this site yet."""
        return not self.messages

    @classmethod
    def open(cls, out_dir: Path, run_id: int) -> RunJournal:
        path = out_dir / JOURNAL_DIR / f"run_{int(run_id)}.json"
        if not path.exists():
            return cls(path, int(run_id))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                path,
                int(run_id),
                messages={str(k): int(v) for k, v in data["messages"].items()},
                started_from=_optional_str(data.get("started_from")),
                completed=[str(kind) for kind in data.get("completed", [])],
            )
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(
                f"this site's journal of run {run_id} ({path}) cannot be read ({exc}); the site cannot "
                "tell what the run has done here and takes no further part in it"
            ) from None

    def count(self, kind: str) -> int:
        """Record one more accepted message of ``kind``; the number so far, this one included."""
        self.messages[kind] = self.messages.get(kind, 0) + 1
        self.save()
        return self.messages[kind]

    def mark_completed(self, kind: str) -> None:
        if kind not in self.completed:
            self.completed.append(kind)
            self.save()

    def save(self) -> None:
        record: dict[str, Any] = {
            "run_id": self.run_id,
            "messages": self.messages,
            "started_from": self.started_from,
            "completed": self.completed,
        }
        write_json(self.path, record)


def _optional_str(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"started_from is {type(value).__name__}, not a string")
