"""Samplers: which windows of the imagery a data loader reads (regions, tiles, patches, pixels)."""

from popcorn.samplers.pixels import PixelBatchSampler, PixelSampler
from popcorn.samplers.tiles import TileGridSampler, tile_cores
from popcorn.samplers.windows import (
    FixedPatchSampler,
    MultiAreaPatchSampler,
    PatchQuery,
    RandomPatchSampler,
    RegionQuery,
    RegionSampler,
)

__all__ = [
    "FixedPatchSampler",
    "MultiAreaPatchSampler",
    "PatchQuery",
    "PixelBatchSampler",
    "PixelSampler",
    "RandomPatchSampler",
    "RegionQuery",
    "RegionSampler",
    "TileGridSampler",
    "tile_cores",
]
