"""Construction: the model's K/V layout, then a sized or shared store, then its tiers from a small config."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .eviction import DEFAULT_POLICY, POLICIES
from .layers import PrefixFullLayer, PrefixSlidingLayer
from .layout import LayerLayout, known_layout, predict_layout, probe_layout
from .memory import parse_bytes
from .state_layers import PrefixEmptyLayer, PrefixHybridLayer, PrefixStateLayer
from .store import BlockStore
from .tiers.setup import given_arguments, make_tiers
from .validation import positive_int


@dataclass(frozen=True)
class TierConfig:
    """The lower tiers a store is given: ``PrefixCache``'s tier arguments by name (``registry.KINDS``),
    checked when made; none given: no tiers."""

    arguments: dict = field(default_factory=dict)

    @classmethod
    def checked(cls, **arguments) -> TierConfig:
        return cls(given_arguments(arguments))

    @property
    def wanted(self) -> bool:
        return bool(self.arguments)


@dataclass(frozen=True)
class StoreConfig:
    """A store to make (``block_size``, a budget) or to share (``store``), checked when made."""

    store: BlockStore | None = None
    block_size: int | None = None
    max_memory: int | str | None = None
    num_blocks: int | None = None
    snapshot_memory: int | str | None = None  # hybrid models: the budget's share for state snapshots
    policy: str | None = None  # eviction policy (eviction.py); None: the default

    @classmethod
    def checked(
        cls, store, block_size, max_memory, num_blocks, snapshot_memory=None, policy=None
    ) -> StoreConfig:
        if block_size is not None:
            block_size = positive_int("block_size", block_size, "16")
        if num_blocks is not None:
            num_blocks = positive_int("num_blocks", num_blocks, "1024")
        if policy is not None and policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if store is not None:
            store = shared_store(store, num_blocks, max_memory)
            if snapshot_memory is not None:
                raise ValueError("the shared store's snapshot_memory is fixed; drop snapshot_memory=")
            if policy is not None and policy != store.policy:
                raise ValueError(
                    f"the shared store evicts by {store.policy!r}; drop policy= or make a new store"
                )
        if snapshot_memory is not None:
            parse_bytes(snapshot_memory)  # a clear error now for a malformed size
        return cls(store, block_size, max_memory, num_blocks, snapshot_memory, policy)


def model_layouts(model: torch.nn.Module, probe: bool) -> tuple[list[LayerLayout], bool]:
    """The model's K/V layout and whether a forward pass confirmed it. Without tiers a prediction
    from the config will do (the first call confirms it), sparing the probe forward."""
    known = known_layout(model)
    if known is not None:
        return known, True
    predicted = None if probe else predict_layout(model)
    if predicted is not None:
        return predicted, False
    return probe_layout(model), True


def build_store(
    layouts: list[LayerLayout], confirmed: bool, config: StoreConfig, tiers: TierConfig
) -> BlockStore:
    """A store sized for ``layouts`` (or the shared one, checked against them), with its tiers attached."""
    store = _resolve_store(layouts, confirmed, config)
    if tiers.wanted:
        if config.store is not None:
            raise ValueError(
                "tiers belong to the store: pass host_memory=/disk=/remote= to the first "
                "PrefixCache, and store=cache.store to the others"
            )
        store.attach_tiers(make_tiers(layouts, tiers.arguments))
    return store


def prefix_layers(layouts: list[LayerLayout]) -> list:
    """One cache layer per model layer: sliding-window or full attention, recurrent state (with or without
    full-attention K/V beside it), or nothing."""
    return [_prefix_layer(layout) for layout in layouts]


def _prefix_layer(layout: LayerLayout):
    if layout.states:
        if layout.holds_kv:
            return PrefixHybridLayer(number_of_states=layout.states)
        return PrefixStateLayer(number_of_states=layout.states)
    if not layout.holds_kv:
        return PrefixEmptyLayer()
    return PrefixSlidingLayer(layout.sliding_window) if layout.sliding_window else PrefixFullLayer()


def _resolve_store(layouts: list[LayerLayout], confirmed: bool, config: StoreConfig) -> BlockStore:
    store, block_size = config.store, config.block_size
    if store is None:
        return BlockStore.sized(
            layouts,
            block_size=16 if block_size is None else block_size,
            max_memory=config.max_memory,
            num_blocks=config.num_blocks,
            confirmed=confirmed,
            snapshot_memory=config.snapshot_memory,
            policy=config.policy or DEFAULT_POLICY,
        )
    if not store.compatible_with(layouts):
        raise ValueError("this store was built for a model with other K/V shapes or dtypes; make a new one")
    if block_size is not None and block_size != store.block_size:
        raise ValueError(f"block_size={block_size} differs from the shared store's {store.block_size}")
    return store


def shared_store(store, num_blocks, max_memory):
    """The ``store=`` argument: a ``BlockStore`` whose size is fixed, so no size may be given with it."""
    if not isinstance(store, BlockStore):
        hint = " (pass its .store)" if hasattr(store, "store") else ""
        raise TypeError(
            f"store= takes the BlockStore of another PrefixCache, e.g. store=cache.store; got "
            f"{type(store).__name__}{hint}"
        )
    if num_blocks is not None or max_memory is not None:
        raise ValueError(
            f"the shared store's size is fixed ({store.pool.num_blocks} blocks); drop num_blocks=/max_memory= "
            "or make a separate store without store="
        )
    return store
