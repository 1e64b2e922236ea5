"""Mutants of issue 21's tier registry: a new tier is one module plus one line in ``registry.KINDS``
(tests/test_tier_registry.py)."""

from __future__ import annotations

from mutants.base import mutant

REGISTRY = "tests/test_tier_registry.py"


@mutant(
    "registry_frozen_at_import",
    breaks="a tier kind added to registry.KINDS is built from PrefixCache's arguments",
    tests=(
        f"{REGISTRY}::test_a_registered_tier_is_built_from_its_arguments_and_serves_exact_hits",
        f"{REGISTRY}::test_a_registered_tiers_arguments_are_checked",
    ),
)
def registry_frozen_at_import() -> None:
    """Construction reads a copy of the tier kinds taken at import: a kind added later is unknown."""
    from hf_prefix_cache.tiers import registry, setup

    frozen = list(registry.KINDS)

    class Frozen:
        KINDS = frozen
        SECRET_ARGUMENT = registry.SECRET_ARGUMENT

        @staticmethod
        def arguments():
            return {registry.SECRET_ARGUMENT, *(name for kind in frozen for name in kind.arguments)}

    setup.registry = Frozen


@mutant(
    "tier_options_dropped",
    breaks="a tier kind's options (disk_size=, remote_min_tokens=, ...) reach its builder",
    tests=(f"{REGISTRY}::test_a_registered_tier_is_built_from_its_arguments_and_serves_exact_hits",),
)
def tier_options_dropped() -> None:
    """A tier kind is built from its switch alone: its further options never reach it."""
    from hf_prefix_cache.tiers.kind import TierKind

    make = TierKind.make
    TierKind.make = lambda self, value, layouts, key, given: make(self, value, layouts, key, {})
