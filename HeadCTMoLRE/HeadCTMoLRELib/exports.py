"""Lazy re-exports for the sub-packages' ``__init__`` files.

A sub-package names its public entry points (``HeadCTMoLRELib.ct.load_ct``) without importing the
modules that define them until one is used, so ``import HeadCTMoLRELib.model`` costs nothing (no torch)
and a light module of a package never pulls in its heavy siblings.
"""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, names: dict[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` for ``package``: ``names`` maps exported name -> defining module
    (relative to the package). Names must not be those of the package's own modules."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{names[name]}"), name)

    return __getattr__
