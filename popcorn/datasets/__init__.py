"""Datasets: Sentinel composites, census regions, covariates, the raster grid, training samples.

Names are imported lazily, so light users (the grid, the census and download tools) do not pay
for importing TorchGeo.
"""

from __future__ import annotations

from popcorn import lazy_exports

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
    "RegionQuery": "samples",
    "RegionSamples": "samples",
    "SentinelPairs": "samples",
    "PatchQuery": "samples",
    "TileQuery": "samples",
    "PatchSamples": "samples",
    "collate_patches": "samples",
    "collate_regions": "samples",
    "CovariateStack": "covariates",
    "Normalizer": "covariates",
    "PatchDataset": "covariates",
    "read_reference": "covariates",
}

__all__ = sorted(_SUBMODULE)


__getattr__, __dir__ = lazy_exports(__name__, _SUBMODULE)
