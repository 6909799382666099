"""Typed errors for cxr-fl.

Every error a user can cause (a bad option, a missing file, a model that does not fit) is a
subclass of :class:`CxrFlError`, so command-line front ends can catch that one type and print
its message without a traceback. Messages name the offending value and say what to do instead.
"""

from __future__ import annotations

from collections.abc import Iterable


class CxrFlError(Exception):
    """Base class of every error caused by a user's input or settings."""


class ConfigError(CxrFlError, ValueError):
    """A setting has a value that is not allowed."""

    def __init__(self, option: str, value: object, allowed: str) -> None:
        self.option = option
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid value for '{option}': {value!r}. Allowed: {allowed}.")


class UnknownNameError(ConfigError):
    """A name (model, task, data source, partitioner, strategy) that no registry knows."""

    def __init__(self, kind: str, name: object, known: Iterable[str]) -> None:
        self.kind = kind
        self.known = sorted(known)
        super().__init__(kind, name, "one of " + ", ".join(self.known))


class ModelError(CxrFlError):
    """A model cannot be built or a weights file does not fit the model."""


class DataError(CxrFlError):
    """Input data is missing, unreadable, or inconsistent with the task."""


class PrivacyError(CxrFlError):
    """A differential-privacy setting cannot be honoured (budget, model, sampling)."""


class IntegrityError(CxrFlError):
    """A file's content does not match the checksum recorded beside it."""
