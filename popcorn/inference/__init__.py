"""Inference: the tiled, resumable map engine, POPCORN's fast forward (CPU kernels) and popVAE's runner.

Names are imported lazily: loading a checkpoint does not import the tile engine's I/O stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULE = {
    "DEFAULT_THRESHOLD": "fast",
    "FastPopcorn": "fast",
    "frozen_copy": "fast",
    "load_popcorn": "fast",
    "naive_forward": "fast",
    "PredictResult": "maps",
    "PredictSettings": "maps",
    "predict": "maps",
    "PopVAERunner": "popvae",
    "predict_map": "popvae",
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
