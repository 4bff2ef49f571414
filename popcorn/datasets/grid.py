"""The 10 m imagery grid every dataset of a study area is read on.

A :class:`RasterGrid` pins CRS, affine transform (north-up, square pixels) and shape. Pixel
windows are ``(row_off, col_off, height, width)`` tuples of ints in that grid; geographic
queries are TorchGeo slices ``[xmin:xmax:res, ymin:ymax:res]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS

from popcorn.errors import PopcornInputError

Window = tuple[int, int, int, int]
"""``(row_off, col_off, height, width)`` in pixels of a :class:`RasterGrid`."""


@dataclass(frozen=True)
class RasterGrid:
    """A north-up raster grid: ``crs``, ``transform`` (pixel -> CRS), ``height`` x ``width``."""

    crs: CRS
    transform: Affine
    height: int
    width: int

    @property
    def res(self) -> float:
        """Pixel size in CRS units (metres for UTM)."""
        return float(self.transform.a)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` in CRS units."""
        left, top = self.transform.c, self.transform.f
        return (left, top - self.height * self.res, left + self.width * self.res, top)

    @classmethod
    def from_bounds(
        cls, crs: CRS, res: float, left: float, bottom: float, right: float, top: float
    ) -> RasterGrid:
        width = int(round((right - left) / res))
        height = int(round((top - bottom) / res))
        return cls(CRS.from_user_input(crs), Affine(res, 0.0, left, 0.0, -res, top), height, width)

    def window_to_slices(self, window: Window) -> tuple[slice, slice]:
        """TorchGeo ``(x, y)`` slices (with ``step = res``) of a pixel window."""
        row, col, h, w = window
        res = self.res
        left = self.transform.c + col * res
        top = self.transform.f - row * res
        return slice(left, left + w * res, res), slice(top - h * res, top, res)

    def window_transform(self, window: Window, factor: int = 1) -> Affine:
        """Affine of a pixel window of the grid, at ``factor`` x the pixel size."""
        row, col, _, _ = window
        return self.transform @ Affine.translation(col, row) @ Affine.scale(factor, factor)

    def slices_to_window(self, x: slice, y: slice) -> Window:
        """Pixel window of TorchGeo ``(x, y)`` slices (coordinates rounded to whole pixels)."""
        res = self.res
        col = int(round((x.start - self.transform.c) / res))
        row = int(round((self.transform.f - y.stop) / res))
        w = int(round((x.stop - x.start) / res))
        h = int(round((y.stop - y.start) / res))
        return (row, col, h, w)

    def aligned_with(self, other_transform: Affine, *, tol: float = 1e-3) -> bool:
        """True if ``other_transform`` has the same pixel size and whole-pixel offsets."""
        if not math.isclose(other_transform.a, self.transform.a, rel_tol=1e-9, abs_tol=1e-9):
            return False
        if not math.isclose(other_transform.e, self.transform.e, rel_tol=1e-9, abs_tol=1e-9):
            return False
        if other_transform.b != 0 or other_transform.d != 0:
            return False
        dc = (other_transform.c - self.transform.c) / self.res
        dr = (self.transform.f - other_transform.f) / self.res
        return abs(dc - round(dc)) < tol and abs(dr - round(dr)) < tol

    def offset_of(self, other_transform: Affine) -> tuple[int, int]:
        """``(row, col)`` of the top-left pixel of an aligned raster in this grid."""
        return (
            int(round((self.transform.f - other_transform.f) / self.res)),
            int(round((other_transform.c - self.transform.c) / self.res)),
        )


def clip_window(window: Window, height: int, width: int) -> tuple[Window, tuple[int, int]] | None:
    """Intersect ``window`` with ``[0, height) x [0, width)``.

    Returns the clipped window and its ``(row, col)`` offset inside ``window``, or None if the
    two do not overlap.
    """
    row, col, h, w = window
    r0, c0 = max(row, 0), max(col, 0)
    r1, c1 = min(row + h, height), min(col + w, width)
    if r1 <= r0 or c1 <= c0:
        return None
    return (r0, c0, r1 - r0, c1 - c0), (r0 - row, c0 - col)


def check_aligned(grid: RasterGrid, path: str, crs: CRS, transform: Affine, what: str) -> None:
    """Raise :class:`PopcornInputError` unless a raster is on ``grid`` (CRS, res, pixel offsets)."""
    if CRS.from_user_input(crs) != grid.crs:
        raise PopcornInputError(
            f"{what} {path} is in CRS {crs}, but the imagery grid is in {grid.crs}. "
            f"Reproject it onto the imagery grid (e.g. gdalwarp -t_srs {grid.crs} -tr "
            f"{grid.res} {grid.res} -tap)."
        )
    if not grid.aligned_with(transform):
        raise PopcornInputError(
            f"{what} {path} has pixel size {transform.a} x {-transform.e} and origin "
            f"({transform.c}, {transform.f}), which is not aligned with the imagery grid "
            f"(pixel size {grid.res}, origin ({grid.transform.c}, {grid.transform.f})). "
            "Resample it onto the imagery grid."
        )


def burn_ids(geometries: Any, ids: Any, shape: tuple[int, int], transform: Affine) -> np.ndarray:
    """(h, w) int32 raster of ``ids`` burnt from ``geometries`` (pixel-centre rule, 0 elsewhere).

    The one rasteriser of census regions: training ids, census preparation and the tile-wise
    dasymetric rescaling all burn polygons this way, so a pixel belongs to the same region in all.
    """
    import rasterio.features

    pairs = list(zip(geometries, (int(i) for i in ids), strict=True))
    if not pairs:
        return np.zeros(shape, np.int32)
    return rasterio.features.rasterize(pairs, out_shape=shape, transform=transform, fill=0, all_touched=False,
                                       dtype="int32")
