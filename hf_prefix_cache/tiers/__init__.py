"""Storage tiers below the device pool: host RAM (``HostTier``) and a restart-proof folder (``DiskTier``).

``Tier`` is the boundary every tier implements (a remote one included); ``entry`` is the verified byte
format of one block; ``TierStack`` is the policy between the pool and the tiers.
"""

from .base import BlockData, BlockRequest, Tier, TierCounters, TierWarning
from .disk import DiskTier
from .entry import FORMAT_VERSION, EntryError, TierKey, decode, encode
from .host import HostTier
from .stack import TierStack

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
    "TierStack",
    "TierWarning",
    "decode",
    "encode",
]
