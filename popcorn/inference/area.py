"""The area a prediction covers: a bounding box or a vector file, snapped to whole 1 ha cells of
the imagery grid (the tiles that touch it: :class:`popcorn.samplers.tiles.TileGridSampler`)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import shapely

from popcorn.datasets.grid import RasterGrid, Window, clip_window
from popcorn.errors import PopcornInputError
from popcorn.inference.tiles import ALIGN
from popcorn.io import read_georeferenced_vector

__all__ = ["resolve_area"]


def _snap_window(grid: RasterGrid, left: float, bottom: float, right: float, top: float, what: str) -> Window:
    res = grid.res
    x0, y0 = grid.transform.c, grid.transform.f
    c0 = math.floor((left - x0) / res / ALIGN) * ALIGN
    r0 = math.floor((y0 - top) / res / ALIGN) * ALIGN
    c1 = math.ceil((right - x0) / res / ALIGN) * ALIGN
    r1 = math.ceil((y0 - bottom) / res / ALIGN) * ALIGN
    clipped = clip_window((r0, c0, r1 - r0, c1 - c0), grid.height, grid.width)
    if clipped is None or right <= left or top <= bottom:
        raise PopcornInputError(
            f"{what} (bounds {left:.1f}, {bottom:.1f}, {right:.1f}, {top:.1f} in {grid.crs}) does "
            f"not overlap the imagery (bounds {tuple(round(v, 1) for v in grid.bounds)}); give an "
            "area inside the imagery"
        )
    return clipped[0]


def resolve_area(
    grid: RasterGrid, bbox: Sequence[float] | None = None, bbox_crs: str | None = None,
    area: str | os.PathLike[str] | None = None,
) -> tuple[Window, Any]:
    """Pixel window of the area to predict and its geometry in the grid CRS (None = the window).

    ``bbox`` is ``(left, bottom, right, top)`` in ``bbox_crs`` (default: the imagery CRS);
    ``area`` a vector file (any CRS) whose polygons bound the prediction.
    """
    if bbox is not None and area is not None:
        raise PopcornInputError("give either --bbox or --area, not both")
    if bbox is not None:
        if len(bbox) != 4:
            raise PopcornInputError(f"--bbox needs 4 numbers left bottom right top, got {list(bbox)}")
        left, bottom, right, top = (float(v) for v in bbox)
        if bbox_crs:
            from rasterio.warp import transform_bounds

            left, bottom, right, top = transform_bounds(bbox_crs, grid.crs, left, bottom, right, top)
        return _snap_window(grid, left, bottom, right, top, f"bounding box {list(bbox)}"), None
    if area is not None:
        path = Path(area)
        frame = read_georeferenced_vector(path, "area file")
        frame = frame[~(frame.geometry.isna() | frame.geometry.is_empty)]
        if frame.empty:
            raise PopcornInputError(f"area file {path} has no geometry")
        geom = shapely.union_all(frame.to_crs(grid.crs).geometry.to_numpy())
        return _snap_window(grid, *geom.bounds, f"area {path}"), geom
    return (0, 0, grid.height, grid.width), None
