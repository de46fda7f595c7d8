"""PEP 562 exports: a package names what it offers and imports each name on first use.

napari imports ``napari_crossd`` (and ``napari_crossd.io``) to open a NIfTI file: the reader
needs neither torch nor the networks, so the names that do are imported when first read.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """Module ``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps a public name to
    the (relative) module that defines it; a name read once is kept in the package."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
