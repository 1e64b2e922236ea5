"""Byte sizes written the way people write them ("512MiB", "2GB", 1 << 30)."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(size: int | float | str) -> int:
    """Return ``size`` in bytes; accepts numbers and strings like ``"512MiB"`` or ``"1.5 GB"``."""
    if isinstance(size, bool):
        raise TypeError("max_memory must be a number of bytes or a string like '512MiB', not a bool")
    if isinstance(size, (int, float)):
        value = int(size)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"cannot read {size!r} as a size; write e.g. 512MiB, 2GiB, 1.5GB or a number of bytes"
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"max_memory must be positive, got {size!r}")
    return value


def format_bytes(size: int) -> str:
    """Human-readable binary size, e.g. ``'1.5 GiB'``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
