"""One tier kind as ``PrefixCache`` sees it: the arguments that configure it and how to build it.

A backend module ends with its ``TierKind``; ``registry.KINDS`` lists them fastest first. The generic
construction (``setup.make_tiers``) checks the arguments, resolves the MAC key and calls ``build``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..layout import LayerLayout
    from .base import Tier
    from .entry import TierKey


@dataclass(frozen=True)
class TierKind:
    name: str  # the tier's name in stats and messages ("disk")
    switch: str  # the PrefixCache argument that turns the tier on ("disk")
    takes: str  # what the switch is given, for messages ("a folder")
    # build(switch value, layouts=, key=, **options) -> the tier; checks its sizes against the machine
    build: Callable[..., Tier]
    options: Mapping[str, str] = field(default_factory=dict)  # further arguments -> build's parameters
    shared: bool = False  # entries leave the process (a folder, a server): the tier_secret's MAC covers them

    def make(self, value: Any, layouts: list[LayerLayout], key: TierKey | None, given: Mapping) -> Tier:
        options = {self.options[name]: given[name] for name in self.options if name in given}
        return self.build(value, layouts=layouts, key=key if self.shared else None, **options)

    @property
    def arguments(self) -> tuple[str, ...]:
        return (self.switch, *self.options)
