"""Census disaggregation baselines of the POPCORN paper, streamed window by window.

Each spreads every coarse census count over its region in proportion to a weight raster:

- **BuiltUp disaggregation**: weight = built-up score (e.g. ``builtup_score_10m.tif`` written by
  ``popcorn.cli.predict``);
- **building-count disaggregation**: weight = a building-count or footprint-area raster;
- **uniform areal weighting**: weight = 1 on every pixel of a template grid.

Regions whose weights sum to 0 get their count spread evenly over their pixels. The result is
people per pixel of the weight raster's grid (nodata -1); :mod:`popcorn.evaluation.compare` aggregates it
to the evaluation units.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window as RioWindow

from popcorn.evaluation.dasymetric import RegionRasterizer, scale_factors_from_sums
from popcorn.io import atomic_path, geotiff_profile, open_georeferenced

BLOCK = 2048
NODATA = -1.0


def _windows(height: int, width: int, block: int = BLOCK):
    for r in range(0, height, block):
        for c in range(0, width, block):
            yield RioWindow(c, r, min(block, width - c), min(block, height - r))


def _read_weights(src, window, uniform: bool) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    data = src.read(1, window=window).astype(np.float64)
    valid = np.isfinite(data)
    if src.nodata is not None:
        valid &= data != src.nodata
    if uniform:
        return valid.astype(np.float64), valid
    data = np.where(valid, np.maximum(data, 0.0), 0.0)
    return data, valid


def disaggregate(
    weights: str | os.PathLike[str],
    census: str | os.PathLike[str],
    counts: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    *,
    uniform: bool = False,
    id_column: str = "region_id",
    count_column: str = "count",
    name: str = "disaggregation",
) -> Path:
    """Write ``out``: census counts spread over each region by ``weights`` (or uniformly).

    ``weights`` is the weight raster (``uniform=True``: only its grid and valid mask are used).
    Two streamed passes: region sums of the weights, then the rescaled raster.
    """
    from popcorn.datasets.census import read_regions

    weights = Path(weights)
    with open_georeferenced(weights, "weight raster") as src:
        regions = RegionRasterizer(read_regions(census, counts, src.crs, id_column, count_column), src.crs)
        n = regions.n
        sums = np.zeros(n)
        pixels = np.zeros(n)
        for win in _windows(src.height, src.width):
            w, valid = _read_weights(src, win, uniform)
            ids = regions.ids_window(src.window_transform(win), (win.height, win.width))
            sums += np.bincount(ids[valid], weights=w[valid], minlength=n)[:n]
            pixels += np.bincount(ids[valid], minlength=n)[:n]
        factor, fill, _ = scale_factors_from_sums(regions.counts, sums, pixels)
        profile = geotiff_profile(src.height, src.width, crs=src.crs, transform=src.transform, nodata=NODATA,
                                  BIGTIFF="IF_SAFER")
        with atomic_path(out) as tmp, rasterio.open(tmp, "w", **profile) as dst:
            for win in _windows(src.height, src.width):
                w, valid = _read_weights(src, win, uniform)
                ids = regions.ids_window(src.window_transform(win), (win.height, win.width))
                people = np.where(valid & (ids > 0), w * factor[ids] + fill[ids], 0.0)
                people = np.where(valid, people, NODATA).astype(np.float32)
                dst.write(people[None], window=win)
            dst.update_tags(product=name, units="people per pixel", weights=str(weights), census=str(census),
                            counts=str(counts), method="uniform areal weighting" if uniform else "weighted disaggregation")
    return Path(out)


def builtup_disaggregation(builtup: str | os.PathLike[str], census, counts, out, **kw) -> Path:  # noqa: ANN001
    """BuiltUp disaggregation: counts spread by the built-up score."""
    return disaggregate(builtup, census, counts, out, name="BuiltUp disaggregation", **kw)


def building_disaggregation(buildings: str | os.PathLike[str], census, counts, out, **kw) -> Path:  # noqa: ANN001
    """Building-count disaggregation: counts spread by a building-count / footprint raster."""
    return disaggregate(buildings, census, counts, out, name="building-count disaggregation", **kw)


def uniform_disaggregation(template: str | os.PathLike[str], census, counts, out, **kw) -> Path:  # noqa: ANN001
    """Uniform areal weighting on the grid (and valid pixels) of ``template``."""
    return disaggregate(template, census, counts, out, uniform=True, name="uniform areal weighting", **kw)


__all__ = ["builtup_disaggregation", "building_disaggregation", "disaggregate", "uniform_disaggregation"]
