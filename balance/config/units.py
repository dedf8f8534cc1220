"""
Durations and sizes as users write them: C{"250ms"}, C{"5s"}, C{"64KiB"}.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h|d)\s*$")
_DURATION_UNITS = {
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB|k|K)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "k": 1000,
    "K": 1024,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
}


def parse_duration(text: str) -> float:
    """
    Parse a duration with a unit (C{us}, C{ms}, C{s}, C{m}, C{h}, C{d}).

    @return: Seconds.
    @raise ValueError: If C{text} is not a number followed by a unit.
    """
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(text)
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(value) -> int:
    """
    Parse a size: an integer number of bytes, or a string with a unit
    (C{KiB}, C{MiB}, C{GiB}, or decimal C{KB}, C{MB}, C{GB}).

    @return: Bytes.
    @raise ValueError: If C{value} is neither.
    """
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(value)
        return value
    if not isinstance(value, str):
        raise ValueError(value)
    m = _SIZE.match(value)
    if m is None:
        raise ValueError(value)
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def format_duration(seconds: float) -> str:
    """
    Write C{seconds} back in the shortest exact unit, for messages and the
    effective-config view.
    """
    if seconds == 0:
        return "0s"
    for unit in ("d", "h", "m", "s", "ms"):
        n = seconds / _DURATION_UNITS[unit]
        if n >= 1 and abs(n - round(n)) < 1e-9:
            return f"{int(round(n))}{unit}"
    return f"{seconds * 1e6:g}us"
