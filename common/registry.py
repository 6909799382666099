"""One small generic registry for named builders.

Models, tasks, data sources, partitioners and strategies are all looked up by name, and those
names double as configuration values (``--teacher resnet18``, ``strategy = "fedprox"``). An
unknown name raises :class:`~common.errors.UnknownNameError` listing the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from common.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from kebab-case names to objects (usually builder functions or classes)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a name may be registered only once."""

        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        if name != name.strip().lower() or " " in name:
            raise ValueError(f"{self.kind} name '{name}' must be lower-case kebab-case")
        self._entries[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._entries) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
