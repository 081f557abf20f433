"""Packages whose names load on first use (PEP 562), so that importing one module of a package
does not import all of its siblings (the API process imports no torch)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, where: dict[str, str], namespace: dict) -> Callable:
    """A module ``__getattr__`` for ``package`` that imports ``where[name]`` (a submodule's
    name) when ``name`` is first asked for, and keeps it in ``namespace`` (the package's
    globals) for later lookups."""

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        namespace[name] = value
        return value

    return __getattr__
