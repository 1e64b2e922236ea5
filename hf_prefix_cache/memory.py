"""Byte sizes written the way people write them ("512MiB", "2GB", 1 << 30), and how much memory a
device has free, so a store too big for the machine is refused before it is zero-filled."""

from __future__ import annotations

import math
import numbers
import os
import re

import torch

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


def parse_bytes(size: int | float | str, name: str = "max_memory") -> int:
    """Return ``size`` in bytes; accepts numbers and strings like ``"512MiB"``, ``"1.5 GB"`` or ``"1.5e3"``.
    ``name`` is the argument named in errors."""
    if isinstance(size, bool) or not isinstance(size, (numbers.Real, str)):
        raise TypeError(
            f"{name} must be a number of bytes or a string like '512MiB', not {type(size).__name__}"
        )
    if isinstance(size, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", size)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"cannot read {name}={size!r} as a size; write e.g. 512MiB, 2GiB, 1.5GB or a number of bytes"
            )
        number = float(match.group(1)) * _UNITS[unit]
    else:
        number = float(size)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite size like '512MiB', got {size!r}")
    value = int(number)
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return value


def available_bytes(device: torch.device) -> int | None:
    """Memory that can still be allocated on ``device`` (None when it cannot be told)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:  # MemAvailable counts reclaimable page cache, which free pages alone (sysconf) do not
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(needed: dict[torch.device, int]) -> None:
    """Refuse, with the fix, a store whose tensors need more memory than a device has free."""
    for device, size in needed.items():
        free = available_bytes(device)
        if free is not None and size > free:
            raise ValueError(
                f"the block store needs {format_bytes(size)} on {device}, but only {format_bytes(free)} is "
                "available; pass a smaller max_memory= (e.g. '1GiB') or num_blocks="
            )


def format_bytes(size: int) -> str:
    """Human-readable binary size, e.g. ``'1.5 GiB'``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def suggested_size(available: int) -> str:
    """Half of ``available`` in whole GiB (or MiB), a size that leaves room for everything else."""
    half = available // 2
    return f"{half >> 30}GiB" if half >= 1 << 30 else f"{max(1, half >> 20)}MiB"
