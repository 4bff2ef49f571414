"""Datasets, samplers and Lightning data modules (imagery, census regions, batches).

Names are imported lazily, so light users (``popcorn.datamodules.grid``, the census and download
CLIs) do not pay for importing Lightning, Kornia and TorchGeo.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULE = {
    "BatchAugmentation": "augmentation",
    "BuiltUpDataModule": "builtup_datamodule",
    "CensusRegions": "census",
    "read_regions": "census",
    "CensusDataModule": "census_datamodule",
    "SyntheticCensusDataModule": "census_datamodule",
    "open_imagery": "census_datamodule",
    "split_ids": "census_datamodule",
    "RasterGrid": "grid",
    "FixedPatchSampler": "samplers",
    "PatchKey": "samplers",
    "RandomPatchSampler": "samplers",
    "RegionKey": "samplers",
    "RegionSampler": "samplers",
    "TileKey": "samplers",
    "TileSampler": "samplers",
    "tile_windows": "samplers",
    "collate_patches": "samples",
    "collate_regions": "samples",
    "collate_tiles": "samples",
    "SEASONS": "sentinel",
    "SEASON_DATES": "sentinel",
    "Sentinel1Composite": "sentinel",
    "Sentinel2Composite": "sentinel",
    "check_same_grid": "sentinel",
    "season_slice": "sentinel",
    "CovariateStack": "covariates",
    "Normalizer": "covariates",
    "PixelDataModule": "covariates",
    "PixelSampler": "covariates",
    "SyntheticPixelDataModule": "covariates",
    "make_synthetic_covariates": "covariates",
    "SettlementWorld": "world_settlements",
    "make_settlement_world": "world_settlements",
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
