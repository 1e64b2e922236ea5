"""Checks of the constructor arguments, each failing with the fix in its message: a wrong type or value
would otherwise surface as a raw error deep in tensor code, or silently become something else
(``block_size=0`` as 16, ``block_size=True`` as 1, ``extra_keys="lora"`` as four one-letter keys)."""

from __future__ import annotations

import numbers
from collections.abc import Hashable


def positive_int(name: str, value, example: str) -> int:
    """``value`` as an int >= 1; bools, floats and strings are refused rather than converted."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}; e.g. {name}={example}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}; e.g. {name}={example}")
    return int(value)


def extra_keys_tuple(value) -> tuple[Hashable, ...]:
    """``extra_keys`` as a tuple of hashable keys; a lone string is refused, not split into letters."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"extra_keys must be a tuple of keys, not a string; write extra_keys=({value!r},)")
    try:
        keys = tuple(value)
    except TypeError:
        raise TypeError(f"extra_keys must be a tuple of keys, e.g. extra_keys=({value!r},)") from None
    for key in keys:
        if not isinstance(key, Hashable):
            raise TypeError(f"extra_keys must hold hashable values (str, int, tuple), got {key!r}")
    return keys
