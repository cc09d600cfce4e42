"""Byte sizes: parse "512MB" / "1.5GiB" and print them back."""

from __future__ import annotations

import re

from hermes_ort.core.errors import OptionError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str | None) -> int | None:
    """`None` -> None (no limit); ints are bytes; strings take a unit: "200MB", "1.5GiB", "300M".

    MB/GB are decimal (10**6); MiB/GiB and the bare letters M/G are binary (2**20)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise OptionError(f"not a byte size: {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise OptionError(f"byte size must be positive, got {value!r}")
        return int(value)
    match = _PATTERN.match(str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise OptionError(f"not a byte size: {value!r} (examples: 200MB, 1.5GiB, 300000000)")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise OptionError(f"byte size must be positive, got {value!r}")
    return size


def format_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
