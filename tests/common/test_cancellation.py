"""Work under a stop signal stops at its next check point (common/cancellation.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from common.cancellation import RunStoppedError, StopSignal, check_point, stoppable
from common.progress import ProgressEvent
from common.tasks import get_task
from common.training import train_one_epoch


def _loader(batches: int) -> DataLoader[tuple[torch.Tensor, ...]]:
    images = torch.randn(batches, 1, 8, 8)
    targets = torch.nn.functional.one_hot(torch.arange(batches) % 3, 3).float()
    return DataLoader(TensorDataset(images, targets), batch_size=1)


def test_training_starts_no_batch_after_the_stop() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    signal = StopSignal()
    seen: list[int] = []

    def progress(event: ProgressEvent) -> None:
        seen.append(event.step)
        if event.step == 3:  # the stop reaches the site while batch 3 ends
            signal.stop("the coordinator stopped run 7")

    with stoppable(signal), pytest.raises(RunStoppedError, match="run 7"):
        train_one_epoch(model, _loader(50), get_task("normal-pneumonia-covid"), optimizer, progress=progress)

    assert seen == [1, 2, 3]
    assert signal.steps_after_stop == 0


def test_a_stop_is_not_swallowed_by_handlers_of_ordinary_errors() -> None:
    signal = StopSignal()
    signal.stop("run over")

    def handler() -> str:
        try:
            check_point()
        except Exception:  # what a ClientApp does with ordinary failures
            return "carried on"
        return "not stopped"

    with stoppable(signal), pytest.raises(RunStoppedError):
        handler()


def test_without_a_signal_nothing_stops() -> None:
    check_point()  # a CLI or a simulation: no task, no stop
    signal = StopSignal()
    assert signal.stop("first")
    assert not signal.stop("second")
    assert signal.reason == "first"
    with stoppable(StopSignal()):
        check_point()
    check_point()  # the signal is gone with its block
