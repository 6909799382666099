"""Classification tasks: what a model predicts and how its outputs are read.

A task is either *multi-class* (one label per image, softmax over classes, e.g. normal /
pneumonia / COVID-19) or *multi-label* (any number of findings per image, one sigmoid per
finding, unknown labels stored as NaN and masked out of loss and metrics, as in ChestX-ray14).

Label vectors follow one convention everywhere: a float32 vector of length ``num_classes``;
one-hot for multi-class, 1 / 0 / NaN per finding for multi-label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.errors import ConfigError
from common.registry import Registry

TaskKind = Literal["multiclass", "multilabel"]

NIH14_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)

CHEXPERT_COMPETITION_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
)


@dataclass(frozen=True)
class Task:
    """A named task: its kind and its ordered class (or finding) names."""

    name: str
    kind: TaskKind
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in ("multiclass", "multilabel"):
            raise ConfigError("task kind", self.kind, "'multiclass' or 'multilabel'")
        if len(self.classes) < 2 and self.kind == "multiclass":
            raise ConfigError("task classes", self.classes, "at least two classes")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError("task classes", self.classes, "distinct class names")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_multilabel(self) -> bool:
        return self.kind == "multilabel"

    def index(self, class_name: str) -> int:
        try:
            return self.classes.index(class_name)
        except ValueError:
            raise ConfigError(f"class of task '{self.name}'", class_name, ", ".join(self.classes)) from None


TASKS: Registry[Task] = Registry("task")

for _task in (
    Task("normal-pneumonia-covid", "multiclass", ("normal", "pneumonia", "covid-19")),
    Task("normal-pneumonia", "multiclass", ("normal", "pneumonia")),
    Task("normal-covid", "multiclass", ("normal", "covid-19")),
    Task("nih14", "multilabel", NIH14_FINDINGS),
    Task("chexpert-competition", "multilabel", CHEXPERT_COMPETITION_FINDINGS),
):
    TASKS.add(_task.name, _task)


def get_task(name: str) -> Task:
    """The registered task called ``name`` (raises UnknownNameError listing the valid ones)."""
    return TASKS.get(name)
