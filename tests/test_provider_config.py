"""Numbers from a provider row's connection_config: converted, or a clear config error."""

from __future__ import annotations

from typing import Any

import pytest

from common.provider import ProviderConfig, ProviderConfigError


def _row(**connection_config: Any) -> ProviderConfig:
    return ProviderConfig("id", "p", "polygon", connection_config=connection_config)


def test_numbers_are_converted_and_defaults_fill_in() -> None:
    row = _row(a="2.5", b=3, c=None)
    assert row.number("a", 1.0) == 2.5
    assert row.number("missing", 1.0) == 1.0
    assert row.integer("b", 0) == 3 and row.integer("missing", 7) == 7
    assert row.optional_number("a") == 2.5
    assert row.optional_number("c", 5.0) is None  # null in the row: turned off
    assert row.optional_number("missing") is None
    assert row.optional_number("missing", 5.0) == 5.0


@pytest.mark.parametrize(
    ("read", "message"),
    [
        (lambda r: r.number("bad", 1.0), "connection_config.bad must be a number"),
        (lambda r: r.optional_number("bad"), "connection_config.bad must be a number"),
        (lambda r: r.integer("bad", 1), "connection_config.bad must be an integer"),
        (lambda r: r.number("null", 1.0), "connection_config.null must be a number"),
    ],
)
def test_a_value_that_is_not_a_number_is_a_config_error(read: Any, message: str) -> None:
    with pytest.raises(ProviderConfigError) as info:
        read(_row(bad="ten", null=None))
    assert str(info.value) == message
