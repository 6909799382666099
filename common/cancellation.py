"""Stopping work that belongs to a run the coordinator has stopped, between two steps.

A site runs the ClientApp in its own warm process (flower_adapter/app_runner.py), so a stopped run
cannot be ended by killing a throw-away process: the work itself has to stop. Whoever learns
that the run is over (the site's run watch, or the runner when its SuperNode goes away) calls
:meth:`StopSignal.stop`; every training, distillation and evaluation loop passes a check point
before each batch (through its progress :class:`~common.progress.Reporter`), and once the signal
is set the next check point raises :class:`RunStoppedError`: no further batch starts.

:class:`RunStoppedError` is a ``BaseException``, like ``asyncio.CancelledError`` and for the
same reason: handlers that turn ordinary failures into error replies (``except Exception``)
must not swallow it and carry on with the next phase of the work. Only the code that installed
the signal (:func:`stoppable`) catches it.

The signal in force is per thread (a context variable): the warm runner runs one task at a
time in its own thread, and code outside any task (a CLI, a simulation) never stops this way.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class RunStoppedError(BaseException):
    """The run this work belongs to was stopped; raised at the next check point."""


class StopSignal:
    """A stop request for the work of one task, and the count of steps that passed its check."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reason: str | None = None
        self.steps_started = 0
        """Check points passed: each one lets a step (a batch) start."""
        self.steps_at_stop: int | None = None
        """:attr:`steps_started` when the stop arrived (None while the work may go on)."""

    @property
    def reason(self) -> str | None:
        return self._reason

    @property
    def stopped(self) -> bool:
        return self._reason is not None

    def stop(self, reason: str) -> bool:
        """Ask the work to stop at its next check point; False when it was asked before."""
        with self._lock:
            if self._reason is not None:
                return False
            self._reason = reason
            self.steps_at_stop = self.steps_started
            return True

    def step_may_start(self) -> None:
        """A check point: raise RunStoppedError once stopped, else count one more step."""
        with self._lock:
            if self._reason is not None:
                raise RunStoppedError(self._reason)
            self.steps_started += 1

    @property
    def steps_after_stop(self) -> int:
        """Steps that started after the stop arrived (0 by design; reported by the site)."""
        with self._lock:
            return 0 if self.steps_at_stop is None else self.steps_started - self.steps_at_stop


_ACTIVE: ContextVar[StopSignal | None] = ContextVar("cxr_fl_stop_signal", default=None)


@contextmanager
def stoppable(signal: StopSignal) -> Iterator[StopSignal]:
    """Run the body with ``signal`` in force for this thread's loops."""
    token = _ACTIVE.set(signal)
    try:
        yield signal
    finally:
        _ACTIVE.reset(token)


def check_point() -> None:
    """Called by every loop before a step: raises RunStoppedError once the work was stopped."""
    signal = _ACTIVE.get()
    if signal is not None:
        signal.step_may_start()
