"""Lightning data modules: census weak supervision, built-up training and adaptation, popVAE.

Names are imported lazily, so that naming one data module in a config does not import the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULE = {
    "BuiltUpDataModule": "builtup",
    "SyntheticBuiltUpDataModule": "builtup",
    "CensusDataModule": "census",
    "SyntheticCensusDataModule": "census",
    "open_imagery": "census",
    "split_ids": "census",
    "PixelDataModule": "pixel",
    "SyntheticPixelDataModule": "pixel",
}

__all__ = sorted(_SUBMODULE)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULE:
        value = getattr(importlib.import_module(f".{_SUBMODULE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULE))
