"""Build the tiers a ``PrefixCache(host_memory=..., disk=..., disk_size=..., remote=...)`` asks for,
fastest first."""

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
    remote: str | None = None,
    **remote_options,
) -> list[Tier]:
    if disk_size is not None and disk is None:
        raise ValueError("disk_size= needs disk= (the folder of the disk tier)")
    tiers: list[Tier] = []
    if host_memory is not None:
        pinned = any(layout.device.type == "cuda" for layout in layouts)
        tiers.append(HostTier(host_memory, pin_memory=pinned))
    if disk is not None:
        tiers.append(DiskTier(disk, layouts, size=disk_size))
    if remote is not None:
        from .remote import RemoteTier  # imports redis-py, an optional dependency

        tiers.append(RemoteTier(remote, layouts, **remote_options))
    return tiers


def remote_tier_options(remote: str | None, **options) -> dict:
    """The remote tier's options that were given; an error if any is given without ``remote=``."""
    given = {name: value for name, value in options.items() if value is not None}
    if given and remote is None:
        names = ", ".join(
            f"{'remote_' if name in ('min_tokens', 'ttl', 'timeout') else ''}{name}=" for name in given
        )
        raise ValueError(f"{names} configure the remote tier: also pass remote= (a redis:// URL)")
    return given
