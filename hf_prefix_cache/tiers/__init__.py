"""Storage tier backends below the device pool: host RAM (``HostTier``), a restart-proof folder
(``DiskTier``) and a Redis/Valkey server (``RemoteTier``, imported lazily: redis-py is optional).

``Tier`` is the boundary every backend implements; ``entry`` is the verified byte format of one block;
``registry`` lists the kinds a ``PrefixCache`` can be given. The policy between the pool and the tiers
(write-back, write-through, promotion) is the store's: ``hf_prefix_cache.tiering``.
"""

from .base import BlockData, BlockRequest, Tier, TierCounters, TierWarning
from .disk import DiskTier
from .entry import FORMAT_VERSION, EntryError, TierKey, decode, encode
from .host import HostTier

__all__ = [
    "FORMAT_VERSION",
    "BlockData",
    "BlockRequest",
    "DiskTier",
    "EntryError",
    "HostTier",
    "Tier",
    "TierCounters",
    "TierKey",
    "TierWarning",
    "decode",
    "encode",
]
