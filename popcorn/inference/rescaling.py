"""Census matching of tiled maps: region sums over the finished tiles, the scale factors (CSV)
and the rescaled 1 ha product, made tile by tile during assembly (census regions are
rasterised per tile, never for the whole area at once)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from popcorn.datasets.grid import RasterGrid, Window
from popcorn.evaluation.dasymetric import region_sums
from popcorn.inference.tiles import FINE, Product, TileRun, block_sum_partial
from popcorn.io import atomic_path

log = logging.getLogger(__name__)

RESCALE_REST = ("uniform", "builtup")  # how the capped rescaling spreads the rest of a count


class CensusTiles:
    """Census regions rasterised tile by tile on the imagery grid (never the whole area)."""

    def __init__(self, regions: str, counts: str | None, grid: RasterGrid, id_column: str, count_column: str) -> None:
        from popcorn.datasets.census import read_regions
        from popcorn.evaluation.dasymetric import RegionRasterizer

        self.grid = grid
        self.raster = RegionRasterizer(read_regions(regions, counts, grid.crs, id_column, count_column), grid.crs)
        self.counts = self.raster.counts
        self.n = self.raster.n

    def ids_window(self, window: Window) -> np.ndarray:
        return self.raster.ids_window(self.grid.window_transform(window), window[2:])


def rescaled_product(census: CensusTiles, run: TileRun, cores: Sequence[Window], cap: float | None, rest: str,
                     combined: str, tags: dict[str, str], out: Path, prefix: str) -> tuple[Product, Path, Any]:
    """Sum the finished tiles per census region, write the scale factors, and return the rescaled
    1 ha product: the paper's dasymetric rescaling, or with ``cap`` the capped form
    (:func:`~popcorn.evaluation.dasymetric.capped_factors_from_sums`), the rest of each count
    spread by ``rest``. ``combined`` says how the map combines the checkpoints (units tag)."""
    by_score = cap is not None and rest == "builtup"
    keys = ["population_10m", "builtup_score"] if by_score else ["population_10m"]
    sums = np.zeros(census.n, np.float64)
    pixels = np.zeros(census.n, np.float64)
    prior_sums = np.zeros(census.n, np.float64)
    for core in cores:
        arrays = run.load(core, keys)
        pop = arrays["population_10m"]
        ids = census.ids_window(core)
        ok = np.isfinite(pop)
        sums += region_sums(pop[ok], ids[ok], census.n)[: census.n]
        pixels += np.bincount(ids[ok], minlength=census.n)[: census.n]
        if by_score:
            prior_sums += region_sums(np.nan_to_num(arrays["builtup_score"][ok]), ids[ok], census.n)[: census.n]
    if not by_score:
        prior_sums = pixels
    factors, prior_coef, uniform, scale_csv, percentiles = scale_factors(census, sums, prior_sums, pixels, cap,
                                                                         out / f"{prefix}scale_factors.csv")

    def rescaled(arrays: dict[str, np.ndarray], core: Window) -> np.ndarray:
        pop = arrays["population_10m"]
        ok = np.isfinite(pop)
        ids = census.ids_window(core)
        prior = np.nan_to_num(arrays["builtup_score"]) if by_score else 1.0
        adj = np.where(ok, pop * factors[ids] + prior * prior_coef[ids] + uniform[ids], 0.0)
        s, cnt = block_sum_partial(adj, ok)
        return np.where(cnt > 0, s, np.nan)

    if cap is None:
        method = f"{combined} rescaled to the census counts (dasymetric)"
    else:
        method = (f"{combined} rescaled to the census counts, scale factor at most {cap:g} x "
                  "census total / map total, "
                  f"the rest of each count spread {'by built-up score' if by_score else 'evenly'}")
    tags = dict(tags, units=f"people per 1 ha cell, {method}", product="population_1ha_rescaled")
    return (Product("population_1ha_rescaled", out / f"{prefix}population_1ha_rescaled.tif", "population", tags,
                    FINE, rescaled), scale_csv, percentiles)


def scale_factors(census: CensusTiles, sums: np.ndarray, prior_sums: np.ndarray, pixels: np.ndarray,
                  cap: float | None, path: Path):
    """Per-region factors of the (capped) rescaling, written with the paper's factors to ``path``."""
    import pandas as pd

    from popcorn.evaluation.dasymetric import capped_factors_from_sums, scale_factors_from_sums

    paper_factors, _, scale = scale_factors_from_sums(census.counts, sums, pixels)
    factors, prior_coef, uniform = capped_factors_from_sums(census.counts, sums, prior_sums, pixels,
                                                            math.inf if cap is None else cap)
    missing = [int(r) for r in census.counts if pixels[r] == 0]
    if missing:
        log.warning("census region(s) %s have no predicted pixel (outside the area); their counts "
                    "are not distributed", missing[:20])
    rows = []
    for r in sorted(census.counts):
        row = {"region_id": int(r), "count": census.counts[r], "predicted": float(sums[r]),
               "pixels": int(pixels[r]), "scale_factor": scale[r]}
        if cap is not None:
            row["applied_factor"] = float(factors[r])
            capped = pixels[r] > 0 and factors[r] < paper_factors[r]
            row["people_spread"] = float(census.counts[r] - factors[r] * sums[r]) if capped else 0.0
        rows.append(row)
    frame = pd.DataFrame(rows)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    finite = frame.scale_factor.to_numpy()
    finite = finite[np.isfinite(finite)]
    percentiles = tuple(float(v) for v in np.percentile(finite, [10, 50, 90])) if finite.size else None
    return factors, prior_coef, uniform, path, percentiles


__all__ = ["RESCALE_REST", "CensusTiles", "rescaled_product", "scale_factors"]
