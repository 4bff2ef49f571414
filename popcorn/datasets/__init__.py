"""Datasets: Sentinel composites, census regions, covariates, the raster grid, training samples.

Names are imported lazily, so light users (the grid, the census and download tools) do not pay
for importing TorchGeo.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULE = {
    "CensusRegions": "census",
    "read_regions": "census",
    "RasterGrid": "grid",
    "SEASONS": "sentinel",
    "SEASON_DATES": "sentinel",
    "Sentinel1Composite": "sentinel",
    "Sentinel2Composite": "sentinel",
    "check_same_grid": "sentinel",
    "season_slice": "sentinel",
    "RegionSamples": "samples",
    "ImagePatches": "samples",
    "PatchSamples": "samples",
    "collate_patches": "samples",
    "collate_regions": "samples",
    "CovariateStack": "covariates",
    "Normalizer": "covariates",
    "PatchDataset": "covariates",
    "read_reference": "covariates",
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
