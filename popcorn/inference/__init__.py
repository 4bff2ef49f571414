"""Inference: the tiled, resumable map engine, POPCORN's fast forward (CPU kernels) and popVAE's runner.

Names are imported lazily: loading a checkpoint does not import the tile engine's I/O stack.
"""

from __future__ import annotations

from popcorn import lazy_exports

_SUBMODULE = {
    "DEFAULT_THRESHOLD": "fast",
    "FastPopcorn": "fast",
    "frozen_copy": "fast",
    "load_popcorn": "fast",
    "naive_forward": "fast",
    "PredictResult": "settings",
    "PredictSettings": "settings",
    "predict": "maps",
    "PopVAERunner": "popvae",
    "predict_map": "popvae",
}

__all__ = sorted(_SUBMODULE)


__getattr__, __dir__ = lazy_exports(__name__, _SUBMODULE)
