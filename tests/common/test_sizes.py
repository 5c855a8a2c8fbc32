"""service.common.sizes parses sizes exactly as accelerate's convert_file_size_to_int."""

from __future__ import annotations

import pytest
from accelerate.utils import convert_file_size_to_int
from hypothesis import given
from hypothesis import strategies as st

from service.common.sizes import parse_size

UNITS = ["GiB", "MiB", "KiB", "GB", "MB", "KB", "Gb", "Mb", "Kb", "gib", "mb", "kB", "B", ""]


def _theirs(value: str | int) -> int | None:
    try:
        return int(convert_file_size_to_int(value))
    except (ValueError, OverflowError):
        return None


def _ours(value: str | int) -> int | None:
    try:
        return parse_size(value)
    except ValueError:
        return None


@given(
    number=st.one_of(
        st.integers(min_value=-5, max_value=10**6).map(str),
        st.floats(min_value=-10, max_value=10**4, allow_nan=False).map(lambda f: f"{f:.3f}"),
        st.text(alphabet="0123456789.e-x ", max_size=6),
    ),
    unit=st.sampled_from(UNITS),
)
def test_same_as_accelerate(number: str, unit: str) -> None:
    value = number + unit
    if value.isdigit():
        assert _ours(value) == int(value)
    elif unit:
        assert _ours(value) == _theirs(value), value


@pytest.mark.parametrize("value", [0, 1, 2**40, -1])
def test_integers(value: int) -> None:
    assert _ours(value) == _theirs(value)


def test_examples() -> None:
    assert parse_size("8GiB") == 8 * 2**30
    assert parse_size("300KB") == 300_000
    assert parse_size("8Gb") == 10**9
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
