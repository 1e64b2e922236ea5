"""Every curated mutant, collected from the ``area_*.py`` modules beside this file (``MUTANTS``, ``by_name``).

Each area module declares its mutants with ``@mutant`` right above their patches (see README.md in this
folder); a module with a plain ``MUTANTS = [Mutant(...), ...]`` list is collected too. ``Mutant`` and
``replace_function`` are importable from here as well as from ``mutants.base``.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from mutants.base import Mutant, area_mutants, mutant, replace_function

__all__ = ["MUTANTS", "Mutant", "by_name", "mutant", "replace_function"]


def _collect() -> list[Mutant]:
    """The mutants of every ``area_<name>.py`` beside this file, area by area (sorted by file name);
    a name declared twice is an error, since ``by_name`` could only ever run the first."""
    found: list[Mutant] = []
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda i: i.name):
        if info.name.startswith("area_"):
            found.extend(area_mutants(importlib.import_module(f"mutants.{info.name}")))
    names = [m.name for m in found]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"mutant names declared twice: {twice}")
    return found


MUTANTS: list[Mutant] = _collect()


def by_name(name: str) -> Mutant:
    for mutant_ in MUTANTS:
        if mutant_.name == name:
            return mutant_
    raise KeyError(f"no mutant {name!r}; known: {[m.name for m in MUTANTS]}")
