"""Progress reporting for long loops, without printing from library code.

Training, evaluation and distillation loops accept ``progress=``, which may be

* ``None`` (nothing is reported),
* a callable taking a :class:`ProgressEvent` (called after every batch), or
* a ``rich.progress.Progress`` handle (anything with ``add_task``/``update``/``remove_task``):
  the loop adds one task for its own batches, advances it, and removes it when done, so a CLI
  can keep its own outer bar (epochs, rounds) on the same Progress display.

Loops talk to a :class:`Reporter` built by :func:`reporter_for`; they never import rich.

The reporter is also each loop's stop check point (:mod:`common.cancellation`): building it
(before the first batch) and every :meth:`Reporter.step` (before the next batch) raise
``RunStoppedError`` once the work's run was stopped, so no loop starts a batch after that.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from common.cancellation import check_point


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a loop: ``step`` batches of ``total`` (None when unknown) are done."""

    phase: str
    step: int
    total: int | None
    examples: int
    loss: float = math.nan


@runtime_checkable
class RichProgressLike(Protocol):
    """The part of ``rich.progress.Progress`` the loops use."""

    def add_task(self, description: str, *args: Any, **kwargs: Any) -> Any: ...

    def update(self, task_id: Any, *args: Any, **kwargs: Any) -> None: ...

    def remove_task(self, task_id: Any) -> None: ...


ProgressCallback = Callable[[ProgressEvent], None]
ProgressArg = ProgressCallback | RichProgressLike | None


class Reporter:
    """What a loop calls: :meth:`step` after each batch and :meth:`close` at the end."""

    def __init__(self, progress: ProgressArg, phase: str, total: int | None) -> None:
        check_point()  # before the loop's first batch
        self._phase = phase
        self._total = total
        self._callback: ProgressCallback | None = None
        self._rich: RichProgressLike | None = None
        self._task_id: Any = None
        if isinstance(progress, RichProgressLike):
            self._rich = progress
            self._task_id = progress.add_task(phase, total=total)
        elif progress is not None:
            if not callable(progress):
                raise TypeError(f"progress must be None, a callable or a rich Progress, not {progress!r}")
            self._callback = progress

    def step(self, step: int, examples: int, loss: float = math.nan) -> None:
        """Report one finished batch; then the check point before the next one."""
        if self._callback is not None:
            self._callback(ProgressEvent(self._phase, step, self._total, examples, loss))
        elif self._rich is not None:
            description = self._phase if math.isnan(loss) else f"{self._phase} loss {loss:.4f}"
            self._rich.update(self._task_id, completed=step, description=description)
        check_point()

    def close(self) -> None:
        if self._rich is not None:
            self._rich.remove_task(self._task_id)
            self._rich = None


def reporter_for(progress: ProgressArg, phase: str, total: int | None) -> Reporter:
    """A :class:`Reporter` for ``progress`` (see the module docstring for what it may be)."""
    return Reporter(progress, phase, total)
