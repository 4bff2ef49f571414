"""popVAE's demo covariates at 100 m, derived from a synthetic world, and a noisy reference."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LAND_COVER_GROUPS", "make_synthetic_covariates"]


def _block_reduce(a: np.ndarray, k: int, how: str = "mean") -> np.ndarray:
    """(..., H, W) -> (..., H/k, W/k) nan-aware mean or sum of k x k blocks."""
    *lead, h, w = a.shape
    b = a.reshape(*lead, h // k, k, w // k, k)
    if how == "sum":
        return np.nansum(b, axis=(-3, -1))
    with np.errstate(invalid="ignore"), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore", RuntimeWarning)
        return np.nanmean(b, axis=(-3, -1))


LAND_COVER_GROUPS = {  # synthetic land-cover codes -> share bands
    "lc_residential": (1, 2, 3, 4),
    "lc_industrial": (5,),
    "lc_road": (6,),
    "lc_green": (7, 8, 10),
    "lc_farmland": (9,),
    "lc_water": (11,),
}


def make_synthetic_covariates(world: Any, out: str | os.PathLike[str], reference_noise: float = 0.2,
                              seed: int = 0, factor: int = 10, overwrite: bool = False) -> dict[str, Path]:
    """Covariates at 100 m derived from a synthetic world, and a noisy reference population.

    Writes (GeoTIFFs on the world's 1 ha grid, CRS and transform of ``population_1ha.tif``):
    ``s2_100m.tif`` (annual mean B02 B03 B04 B08 + summer/winter NDVI), ``s1_100m.tif`` (annual
    mean VV, VH in dB of the mean power), ``builtup_100m.tif`` (sum of built-up fractions),
    ``land_cover_100m.tif`` (shares of 6 land-cover groups) and ``reference_population.tif``
    (population_1ha x lognormal noise of sigma ``reference_noise``, mimicking a third-party
    product, nodata -999). ``covariates.json`` is written last (marks a complete set).
    """
    import rasterio

    from popcorn.io import atomic_path, write_geotiff

    out = Path(out)
    paths = {"s2": out / "s2_100m.tif", "s1": out / "s1_100m.tif", "builtup": out / "builtup_100m.tif",
             "land_cover": out / "land_cover_100m.tif", "reference": out / "reference_population.tif"}
    marker = out / "covariates.json"
    params = {"reference_noise": reference_noise, "seed": seed, "factor": factor, "world": str(world.directory)}
    if marker.exists() and not overwrite and json.loads(marker.read_text()).get("params") == params:
        return paths
    with rasterio.open(world.population_1ha) as src:
        pop = src.read(1).astype(np.float64)
        crs, transform = src.crs, src.transform
    imagery = Path(world.imagery_dir)
    seasons = ("spring", "summer", "autumn", "winter")
    s2_means, ndvi = [], {}
    for season in seasons:
        with rasterio.open(next(iter(sorted(imagery.glob(f"S2_{season}*.tif"))))) as src:
            a = src.read().astype(np.float32)
        a[a == 0] = np.nan
        m = _block_reduce(a, factor)
        s2_means.append(m)
        ndvi[season] = (m[3] - m[2]) / (m[3] + m[2])
    s2 = np.concatenate([np.nanmean(np.stack(s2_means), axis=0), ndvi["summer"][None], ndvi["winter"][None]])
    s1_lin = []
    for season in seasons:
        with rasterio.open(next(iter(sorted(imagery.glob(f"S1_{season}*.tif"))))) as src:
            s1_lin.append(_block_reduce(10 ** (src.read().astype(np.float32) / 10), factor))
    s1 = 10 * np.log10(np.nanmean(np.stack(s1_lin), axis=0))
    with rasterio.open(world.builtup_fraction) as src:
        bu = _block_reduce(src.read(1).astype(np.float32), factor, "sum")
    with rasterio.open(world.land_cover) as src:
        lc = src.read(1)
    shares = np.stack([_block_reduce(np.isin(lc, codes).astype(np.float32), factor) for codes in LAND_COVER_GROUPS.values()])
    tags = {"source": f"popcorn.datasets.synthetic.covariates.make_synthetic_covariates({world.directory})"}
    f32 = lambda a: np.nan_to_num(a, nan=-3.4e38).astype(np.float32)  # noqa: E731 - paper-style nodata
    write_geotiff(paths["s2"], f32(s2), transform=transform, crs=crs, nodata=-3.4e38, tags=tags,
                  band_names=["B02_mean", "B03_mean", "B04_mean", "B08_mean", "NDVI_summer", "NDVI_winter"])
    write_geotiff(paths["s1"], f32(s1), transform=transform, crs=crs, nodata=-3.4e38, tags=tags,
                  band_names=["VV_mean_dB", "VH_mean_dB"])
    write_geotiff(paths["builtup"], f32(bu), transform=transform, crs=crs, nodata=None, tags=tags,
                  band_names=["builtup_sum"])
    write_geotiff(paths["land_cover"], f32(shares), transform=transform, crs=crs, nodata=None, tags=tags,
                  band_names=list(LAND_COVER_GROUPS))
    rng = np.random.default_rng(seed)
    ref = pop * np.exp(reference_noise * rng.standard_normal(pop.shape) - reference_noise**2 / 2)
    write_geotiff(paths["reference"], ref.astype(np.float32), transform=transform, crs=crs, nodata=-999.0,
                  band_names=["population"], tags={**tags, "reference_noise_sigma": str(reference_noise)})
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps({"params": params, "files": {k: v.name for k, v in paths.items()}}, indent=2))
    return paths
