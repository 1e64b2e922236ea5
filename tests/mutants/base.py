"""What a mutant is, how one is declared (``@mutant`` right above its patch), and ``replace_function``.

``area_*.py`` modules import from here (or, as before, ``Mutant`` and ``replace_function`` from
``mutants.catalog``); ``mutants.catalog`` collects every area's mutants.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

PACKAGES = ("hf_prefix_cache", "hf_prefix_cache_eval")


@dataclass(frozen=True)
class Mutant:
    name: str
    breaks: str  # the feature it breaks, in words
    patch: Callable[[], None]  # applied once, before the test modules are imported
    tests: tuple[str, ...]  # every one of these must fail under the mutant


DECLARED: dict[str, list[Mutant]] = {}  # module name -> its @mutant declarations, in order


def mutant(
    name: str, breaks: str, tests: Iterable[str]
) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Declare the decorated patch a mutant of its module's area: ``breaks`` says which feature it breaks,
    ``tests`` are the pytest node ids (from the repository root) that must each fail under it. It also
    goes into the module's ``MUTANTS`` list, so an area may still append plain ``Mutant(...)`` entries."""

    def declare(patch: Callable[[], None]) -> Callable[[], None]:
        declared = Mutant(name, breaks, patch, tuple(tests))
        DECLARED.setdefault(patch.__module__, []).append(declared)
        sys.modules[patch.__module__].__dict__.setdefault("MUTANTS", []).append(declared)
        return patch

    return declare


def area_mutants(module) -> list[Mutant]:
    """The mutants of one area module: its ``@mutant`` declarations, then what else its ``MUTANTS`` lists
    (a module written before the decorator keeps a plain ``MUTANTS = [Mutant(...), ...]``)."""
    declared = DECLARED.get(module.__name__, [])
    return declared + [m for m in getattr(module, "MUTANTS", []) if not any(m is d for d in declared)]


def replace_function(module_name: str, name: str, make: Callable[[Callable], Callable]) -> None:
    """Replace function ``module_name.name`` by ``make(original)`` everywhere the library bound it
    (``from .x import name`` copies the reference into other modules)."""
    for package in PACKAGES:
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
    original = getattr(importlib.import_module(module_name), name)
    replacement = make(original)
    for module_key, module in list(sys.modules.items()):
        if module_key.split(".")[0] in PACKAGES:
            for attr, value in list(vars(module).items()):
                if value is original:
                    setattr(module, attr, replacement)
