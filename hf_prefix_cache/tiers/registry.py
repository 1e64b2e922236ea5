"""The tier kinds a ``PrefixCache`` can be given, fastest first (the order a lookup goes down).

A new tier is one module (a ``Tier`` subclass and its ``TierKind``) plus one line in ``KINDS``; its
arguments then reach it through ``PrefixCache(model, <switch>=..., <option>=...)``.
"""

from __future__ import annotations

from .disk import DISK
from .host import HOST
from .kind import TierKind
from .remote import REMOTE

KINDS: list[TierKind] = [HOST, DISK, REMOTE]
SECRET_ARGUMENT = "tier_secret"  # authenticates the entries of every shared tier (see ``setup.tier_key``)


def arguments() -> set[str]:
    """Every ``PrefixCache`` argument that configures a tier."""
    return {SECRET_ARGUMENT, *(name for kind in KINDS for name in kind.arguments)}
