"""Sizes as people write them ('8GiB', '512MB', '300KB', or bytes): the grammar of
accelerate's `convert_file_size_to_int`, which max_memory follows, without importing
accelerate (and torch) into the serving process. tests/common/test_sizes.py checks it against
accelerate's own."""

from __future__ import annotations

_BINARY = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10}
_DECIMAL = {"GB": 10**9, "MB": 10**6, "KB": 10**3}


def parse_size(value: str | int) -> int:
    """Bytes; ValueError if `value` is not a size. A lowercase final 'b' means bits
    ('8Gb' is 1e9 bytes), as in accelerate."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value!r} is not a size; use e.g. '8GiB' or a number of bytes")
        return value
    text = str(value)
    if text.isdigit():
        return int(text)
    upper = text.upper()
    try:
        for suffix, unit in _BINARY.items():
            if upper.endswith(suffix):
                return _checked(int(float(text[:-3]) * unit), value)
        for suffix, unit in _DECIMAL.items():
            if upper.endswith(suffix):
                size = int(float(text[:-2]) * unit)
                return _checked(size // 8 if text.endswith("b") else size, value)
    except (ValueError, OverflowError):
        pass
    raise ValueError(f"{value!r} is not a size; use e.g. '8GiB' or a number of bytes")


def _checked(size: int, value: object) -> int:
    if size < 0:
        raise ValueError(f"{value!r} is not a size; use e.g. '8GiB' or a number of bytes")
    return size
