"""Population rasters brought onto another grid, sum-preservingly (people per pixel stay people).

A map on the same grid family (same CRS, aligned, the target pixel a whole multiple of its pixel)
is block-summed exactly; otherwise its counts become densities (people per m2, geodesic pixel
areas for geographic CRSs), are averaged onto the target grid with area weights (GDAL
``average``) and multiplied by the target pixel area. Used by evaluation and by popVAE (a
reference population on the covariate grid).
"""

from __future__ import annotations

import math
import os

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window as RioWindow
from rasterio.windows import from_bounds

from popcorn.errors import PopcornInputError
from popcorn.io import open_georeferenced

EARTH_RADIUS = 6371008.8


# ----------------------------------------------------------------------------- resampling
def pixel_areas(crs: CRS, transform: Affine, rows: np.ndarray) -> np.ndarray:
    """Area in m2 of one pixel of each row (geodesic on a sphere for geographic CRSs)."""
    if crs.is_geographic:
        top = np.radians(transform.f + transform.e * rows)
        bottom = np.radians(transform.f + transform.e * (rows + 1))
        return EARTH_RADIUS**2 * abs(math.radians(transform.a)) * np.abs(np.sin(top) - np.sin(bottom))
    factor = crs.linear_units_factor[1] if crs.is_projected else 1.0
    return np.full(rows.shape, abs(transform.a * transform.e) * factor**2)


def _read_valid(src, window: RioWindow, band: int = 1) -> np.ndarray:  # noqa: ANN001
    data = src.read(band, window=window, boundless=True, fill_value=np.nan if src.nodata is None else src.nodata,
                    out_dtype="float64")
    if src.nodata is not None and not np.isnan(src.nodata):
        data[data == src.nodata] = np.nan
    data[~np.isfinite(data)] = np.nan
    return data


def _integer_factor(src_t: Affine, dst_t: Affine) -> int | None:
    """k if dst pixels are k x k src pixels on the same aligned grid, else None."""
    if src_t.b or src_t.d or dst_t.b or dst_t.d:
        return None
    k = dst_t.a / src_t.a
    if k < 1 or abs(k - round(k)) > 1e-6 or abs(dst_t.e / src_t.e - k) > 1e-6:
        return None
    k = int(round(k))
    dc = (dst_t.c - src_t.c) / src_t.a
    dr = (dst_t.f - src_t.f) / src_t.e
    if abs(dc - round(dc)) > 1e-6 or abs(dr - round(dr)) > 1e-6:
        return None
    return k


def check_overlap(path: str | os.PathLike[str], crs: CRS, bounds: tuple[float, float, float, float], what: str) -> None:
    """Raise :class:`PopcornInputError` unless raster ``path`` overlaps ``bounds`` (in ``crs``)."""
    with open_georeferenced(path, "map") as src:
        try:
            left, bottom, right, top = transform_bounds(src.crs, crs, *src.bounds)
        except Exception as err:  # noqa: BLE001 - projection failures
            raise PopcornInputError(f"map {path} ({src.crs}) cannot be projected to {crs}: {err}") from err
        if not (left < bounds[2] and right > bounds[0] and bottom < bounds[3] and top > bounds[1]):
            raise PopcornInputError(
                f"map {path} (CRS {src.crs}, bounds {tuple(round(v, 4) for v in src.bounds)}) does not "
                f"overlap the {what} (CRS {crs}, bounds {tuple(round(v, 1) for v in bounds)}); check the "
                "map's CRS and extent"
            )


def map_on_grid(path: str | os.PathLike[str], crs: CRS, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
    """People per pixel of a target grid window from a population raster (sum-preserving).

    NaN where the map has no data for the whole target pixel.
    """
    h, w = shape
    with rasterio.open(path) as src:
        same_crs = src.crs is not None and CRS.from_user_input(src.crs) == CRS.from_user_input(crs)
        k = _integer_factor(src.transform, transform) if same_crs else None
        if k is not None:
            col = int(round((transform.c - src.transform.c) / src.transform.a))
            row = int(round((transform.f - src.transform.f) / src.transform.e))
            data = _read_valid(src, RioWindow(col, row, w * k, h * k))
            blocks = data.reshape(h, k, w, k)
            sums = np.nansum(blocks, axis=(1, 3))
            return np.where(np.isnan(blocks).all(axis=(1, 3)), np.nan, sums)
        # general case: densities, area-weighted average, times the target pixel area
        left, top = transform.c, transform.f
        right, bottom = left + w * transform.a, top + h * transform.e
        sl, sb, sr, st = transform_bounds(crs, src.crs, left, bottom, right, top, densify_pts=21)
        win = from_bounds(sl, sb, sr, st, transform=src.transform)
        col0 = max(int(math.floor(win.col_off)) - 2, 0)
        row0 = max(int(math.floor(win.row_off)) - 2, 0)
        col1 = min(int(math.ceil(win.col_off + win.width)) + 2, src.width)
        row1 = min(int(math.ceil(win.row_off + win.height)) + 2, src.height)
        out = np.full((h, w), np.nan)
        if col1 <= col0 or row1 <= row0:
            return out
        window = RioWindow(col0, row0, col1 - col0, row1 - row0)
        data = _read_valid(src, window)
        src_t = src.window_transform(window)
        density = data / pixel_areas(src.crs, src_t, np.arange(data.shape[0]))[:, None]
        reproject(density, out, src_transform=src_t, src_crs=src.crs, dst_transform=transform, dst_crs=crs,
                  src_nodata=np.nan, dst_nodata=np.nan, resampling=Resampling.average)
        return out * pixel_areas(CRS.from_user_input(crs), transform, np.arange(h))[:, None]
