"""``cxr-fl-client`` with a trace of its training steps, for the stopped-run test.

``python -m tests.e2e.step_trace_site TRACE ARGS...`` runs ``cxr-fl-client ARGS...`` in this
process after wrapping two functions: every finished batch of any loop (``Reporter.step``)
appends ``step PHASE`` (``step train`` for local training) to TRACE, and the moment a stop
reaches the site (``StopSignal.stop``) appends ``stop``. Both writes go through one lock, so
the file's order is the order in which they happened in the site's process. Every batch also
takes :data:`STEP_PAUSE` longer, so that the stop reaches the site while it trains even on a fast
machine.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

STEP_PAUSE = 0.005
"""Seconds added to every batch: a long training lasts long on any machine (10,000 batches: 50 s+)."""


def install_trace(trace: Path) -> None:
    from common.progress import Reporter

    lock = threading.Lock()
    original_step = Reporter.step

    def note(word: str) -> None:
        with lock, trace.open("a", encoding="utf-8") as handle:
            handle.write(word + "\n")

    def step(self: Reporter, *args: Any, **kwargs: Any) -> None:
        note(f"step {self._phase}")
        time.sleep(STEP_PAUSE)
        original_step(self, *args, **kwargs)

    Reporter.step = step  # type: ignore[method-assign]
    try:
        from common.cancellation import StopSignal
    except ImportError:  # a site without stop signals (to show that the test fails there)
        return
    original_stop = StopSignal.stop

    def stop(self: StopSignal, reason: str) -> bool:
        first = original_stop(self, reason)
        if first:
            note("stop")
        return first

    StopSignal.stop = stop  # type: ignore[method-assign]


def main() -> None:
    trace = Path(sys.argv[1])
    install_trace(trace)
    sys.argv = ["cxr-fl-client", *sys.argv[2:]]
    from client.cli import main as client_main

    client_main()


if __name__ == "__main__":
    main()
