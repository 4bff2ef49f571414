"""Datasets, samplers and Lightning data modules (imagery, census regions, batches)."""

from .augmentation import BatchAugmentation
from .builtup_datamodule import BuiltUpDataModule
from .census import CensusRegions, read_regions
from .census_datamodule import (
    CensusDataModule,
    SyntheticCensusDataModule,
    open_imagery,
    split_ids,
)
from .grid import RasterGrid
from .samplers import (
    FixedPatchSampler,
    PatchKey,
    RandomPatchSampler,
    RegionKey,
    RegionSampler,
    TileKey,
    TileSampler,
    tile_windows,
)
from .samples import collate_patches, collate_regions, collate_tiles
from .sentinel import (
    SEASON_DATES,
    SEASONS,
    Sentinel1Composite,
    Sentinel2Composite,
    check_same_grid,
    season_slice,
)

__all__ = [
    "SEASONS",
    "SEASON_DATES",
    "BatchAugmentation",
    "BuiltUpDataModule",
    "CensusDataModule",
    "CensusRegions",
    "FixedPatchSampler",
    "PatchKey",
    "RandomPatchSampler",
    "RasterGrid",
    "RegionKey",
    "RegionSampler",
    "Sentinel1Composite",
    "Sentinel2Composite",
    "SyntheticCensusDataModule",
    "TileKey",
    "TileSampler",
    "check_same_grid",
    "collate_patches",
    "collate_regions",
    "collate_tiles",
    "open_imagery",
    "read_regions",
    "season_slice",
    "split_ids",
    "tile_windows",
]
