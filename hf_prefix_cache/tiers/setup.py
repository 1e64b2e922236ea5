"""Build the tiers a ``PrefixCache`` is given (``host_memory=``, ``disk=``, ``remote=``, ... see
``registry.KINDS``), fastest first, after checking the arguments and resolving the ``tier_secret``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..layout import LayerLayout
from . import registry
from .base import Tier
from .entry import TierKey

SECRET_ENV = "HF_PREFIX_CACHE_TIER_SECRET"


def given_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The tier arguments that were given (not None), checked: each is known, and each option comes
    with the argument that turns its tier on."""
    given = {name: value for name, value in arguments.items() if value is not None}
    known = registry.arguments()
    for name in arguments:
        if name not in known:
            raise TypeError(
                f"PrefixCache() got an unexpected keyword argument {name!r}; the tier arguments are "
                f"{', '.join(sorted(known))}"
            )
    for kind in registry.KINDS:
        stray = [name for name in kind.options if name in given]
        if stray and kind.switch not in given:
            names = ", ".join(f"{name}=" for name in stray)
            raise ValueError(
                f"{names} need{'s' if len(stray) == 1 else ''} {kind.switch}= ({kind.takes}): "
                f"{'it configures' if len(stray) == 1 else 'they configure'} the {kind.name} tier; "
                f"also pass {kind.switch}=, or drop {names}"
            )
    return given


def make_tiers(layouts: list[LayerLayout], arguments: Mapping[str, Any]) -> list[Tier]:
    """The tiers ``arguments`` turn on, in ``registry.KINDS`` order (fastest first)."""
    given = given_arguments(arguments)
    chosen = [kind for kind in registry.KINDS if kind.switch in given]
    key = tier_key(given.get(registry.SECRET_ARGUMENT), shared=any(kind.shared for kind in chosen))
    return [kind.make(given[kind.switch], layouts, key, given) for kind in chosen]


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
