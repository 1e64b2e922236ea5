"""Build the tiers a ``PrefixCache(host_memory=..., disk=..., disk_size=...)`` asks for, fastest first."""

from __future__ import annotations

import os

from ..layout import LayerLayout
from .base import Tier
from .disk import DiskTier
from .host import HostTier


def make_tiers(
    layouts: list[LayerLayout],
    host_memory: int | str | None,
    disk: str | os.PathLike | None,
    disk_size: int | str | None,
) -> list[Tier]:
    if disk_size is not None and disk is None:
        raise ValueError("disk_size= needs disk= (the folder of the disk tier)")
    tiers: list[Tier] = []
    if host_memory is not None:
        pinned = any(layout.device.type == "cuda" for layout in layouts)
        tiers.append(HostTier(host_memory, pin_memory=pinned))
    if disk is not None:
        tiers.append(DiskTier(disk, layouts, size=disk_size))
    return tiers
