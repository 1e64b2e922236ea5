"""Build the tiers a ``PrefixCache(host_memory=..., disk=..., disk_size=..., remote=...)`` asks for,
fastest first, after checking that the sizes fit the machine and resolving the ``tier_secret``."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

from ..layout import LayerLayout
from ..memory import available_bytes, format_bytes, parse_bytes
from .base import Tier
from .disk import DEFAULT_DISK_SIZE, DiskTier
from .entry import TierKey
from .host import HostTier

SECRET_ENV = "HF_PREFIX_CACHE_TIER_SECRET"


def make_tiers(
    layouts: list[LayerLayout],
    host_memory: int | str | None,
    disk: str | os.PathLike | None,
    disk_size: int | str | None,
    remote: str | None = None,
    tier_secret: str | bytes | None = None,
    **remote_options,
) -> list[Tier]:
    if disk_size is not None and disk is None:
        raise ValueError("disk_size= needs disk= (the folder of the disk tier)")
    key = tier_key(tier_secret, shared=disk is not None or remote is not None)
    tiers: list[Tier] = []
    if host_memory is not None:
        check_host_memory(host_memory)
        pinned = any(layout.device.type == "cuda" for layout in layouts)
        tiers.append(HostTier(host_memory, pin_memory=pinned))
    if disk is not None:
        check_disk_size(disk, disk_size)
        tiers.append(DiskTier(disk, layouts, size=disk_size, key=key))
    if remote is not None:
        from .remote import RemoteTier  # imports redis-py, an optional dependency

        tiers.append(RemoteTier(remote, layouts, key=key, **remote_options))
    return tiers


def tier_key(tier_secret: str | bytes | None, shared: bool) -> TierKey | None:
    """The MAC key of ``tier_secret`` or, without one, of ``$HF_PREFIX_CACHE_TIER_SECRET``; None when
    neither is set. Only the shared tiers (disk, remote) use it. Messages never include the secret."""
    if tier_secret is not None and not shared:
        raise ValueError(
            "tier_secret= authenticates the entries of the shared tiers: also pass disk= (a folder) or "
            "remote= (a redis:// URL), or drop tier_secret="
        )
    if tier_secret is None:
        tier_secret = os.environ.get(SECRET_ENV) or None
        if tier_secret is None or not shared:
            return None
        try:
            return TierKey(tier_secret)
        except ValueError as error:
            raise ValueError(f"${SECRET_ENV}: {error}") from None
    return TierKey(tier_secret)


def check_host_memory(host_memory: int | str) -> None:
    """Refuse, with the fix, a host tier larger than the RAM available now."""
    size = parse_bytes(host_memory, "host_memory")
    free = available_bytes(torch.device("cpu"))
    if free is not None and size > free:
        raise ValueError(
            f"host_memory={host_memory!r} ({format_bytes(size)}) is more than the {format_bytes(free)} of RAM "
            f"available; pass a smaller host_memory= (e.g. '{_suggest(free)}'), or drop it"
        )


def check_disk_size(disk: str | os.PathLike, disk_size: int | str | None) -> None:
    """Refuse, with the fix, a disk tier larger than its filesystem can hold: the free space plus the
    entries already in the folder (which the limit counts)."""
    size = parse_bytes(disk_size if disk_size is not None else DEFAULT_DISK_SIZE, "disk_size")
    if disk_size is None:
        return  # the default is capped by the filesystem in practice; only an explicit size is checked
    folder = Path(disk).expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return  # the disk tier reports an unusable folder itself
    if size <= free:
        return
    held = _entry_bytes(folder)
    if size > free + held:
        raise ValueError(
            f"disk_size={disk_size!r} ({format_bytes(size)}) is more than the {format_bytes(free + held)} the "
            f"filesystem of {folder} can hold (free space plus entries already there); pass a smaller "
            f"disk_size= (e.g. '{_suggest(free + held)}') or another disk= folder"
        )


def _entry_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).stat().st_size
    return total


def _suggest(available: int) -> str:
    """Half of ``available`` in whole GiB (or MiB), a size that leaves room for everything else."""
    half = available // 2
    return f"{half >> 30}GiB" if half >= 1 << 30 else f"{max(1, half >> 20)}MiB"


def remote_tier_options(remote: str | None, **options) -> dict:
    """The remote tier's options that were given; an error if any is given without ``remote=``."""
    given = {name: value for name, value in options.items() if value is not None}
    if given and remote is None:
        names = ", ".join(
            f"{'remote_' if name in ('min_tokens', 'ttl', 'timeout') else ''}{name}=" for name in given
        )
        raise ValueError(f"{names} configure the remote tier: also pass remote= (a redis:// URL)")
    return given
