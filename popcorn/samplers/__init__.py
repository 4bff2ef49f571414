"""Samplers: which windows of the imagery a data loader reads (regions, tiles, patches, pixels)."""

from popcorn.samplers.pixels import PixelBatchSampler, PixelSampler
from popcorn.samplers.windows import (
    FixedPatchSampler,
    PatchKey,
    RandomPatchSampler,
    RegionQuery,
    RegionSampler,
    tile_windows,
)

__all__ = [
    "FixedPatchSampler",
    "PatchKey",
    "PixelBatchSampler",
    "PixelSampler",
    "RandomPatchSampler",
    "RegionQuery",
    "RegionSampler",
    "tile_windows",
]
