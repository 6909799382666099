"""The one generic registry: names double as config values; unknown names list the known ones."""

from __future__ import annotations

import pytest

from common.errors import UnknownNameError
from common.registry import Registry


def test_register_get_and_list() -> None:
    registry: Registry[int] = Registry("widget")

    @registry.register("two")
    def two() -> int:
        return 2

    registry.add("one", lambda: 1)  # type: ignore[arg-type]
    assert registry.get("two") is two
    assert registry.names() == ["one", "two"]
    assert list(registry) == ["one", "two"]
    assert "one" in registry
    assert len(registry) == 2


def test_unknown_names_list_the_known_ones() -> None:
    registry: Registry[int] = Registry("widget")
    registry.add("alpha", 1)
    registry.add("beta", 2)
    with pytest.raises(UnknownNameError, match="alpha, beta") as info:
        registry.get("gamma")
    assert info.value.kind == "widget"
    assert info.value.known == ["alpha", "beta"]


@pytest.mark.parametrize("name", ["Upper", "with space", " padded"])
def test_names_must_be_kebab_case(name: str) -> None:
    with pytest.raises(ValueError, match="kebab-case"):
        Registry[int]("widget").add(name, 1)


def test_a_name_is_registered_once() -> None:
    registry: Registry[int] = Registry("widget")
    registry.add("one", 1)
    with pytest.raises(ValueError, match="already registered"):
        registry.add("one", 2)
