"""Files of a synthetic world: census regions from the population, GeoTIFFs and JSON written atomically.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from popcorn.datasets.synthetic.constants import FINE_FACTOR, PIXEL_SIZE, SYNTHETIC_CRS, _transform
from popcorn.datasets.synthetic.noise import _smooth_noise
from popcorn.io import atomic_path, geotiff_profile


# ============================================================================================
# Census
def _census_labels(pop10: np.ndarray, n_regions: int, seed: int) -> np.ndarray:
    """Nearest-seed labels (1..N) in slightly warped coordinates, seeds denser where people live."""
    rng = np.random.default_rng([seed, 2, n_regions])
    n = pop10.shape[0]
    nc = n // FINE_FACTOR
    p1 = pop10.reshape(nc, FINE_FACTOR, nc, FINE_FACTOR).sum(axis=(1, 3))
    ps = ndimage.gaussian_filter(p1.astype(np.float64), 1.5)
    w = np.power(np.maximum(ps, 0.0), 0.65)
    w = w + 0.12 * max(float(w.mean()), 1e-6)
    cells = rng.choice(nc * nc, size=n_regions, replace=False, p=(w / w.sum()).ravel())
    cells.sort()
    sr = (cells // nc) * FINE_FACTOR + rng.integers(0, FINE_FACTOR, n_regions)
    sc = (cells % nc) * FINE_FACTOR + rng.integers(0, FINE_FACTOR, n_regions)
    spacing = n / math.sqrt(n_regions)
    amp = 0.18 * spacing
    wy = amp * _smooth_noise(rng, (n, n), 0.8 * spacing)
    wx = amp * _smooth_noise(rng, (n, n), 0.8 * spacing)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    qy = (yy + wy).ravel()
    qx = (xx + wx).ravel()
    seeds = np.stack([qy.reshape(n, n)[sr, sc], qx.reshape(n, n)[sr, sc]], axis=1)
    _, lab = cKDTree(seeds).query(np.stack([qy, qx], axis=1), workers=-1)
    labels = (lab + 1).astype(np.int32).reshape(n, n)
    return labels


def _write_census(
    world: Any, pop10: np.ndarray, n_regions: int, count_noise: float, seed: int
) -> dict[str, Any]:
    import geopandas as gpd
    import rasterio.features
    from shapely.geometry import MultiPolygon, shape

    labels = _census_labels(pop10, n_regions, seed)
    transform = _transform()
    pieces: dict[int, list] = {}
    for geom, val in rasterio.features.shapes(labels, transform=transform, connectivity=4):
        pieces.setdefault(int(val), []).append(shape(geom))
    ids = sorted(pieces)
    if ids != list(range(1, n_regions + 1)):  # every seed pixel keeps its own label
        raise RuntimeError("synthetic census: some regions are empty (this is a bug)")
    geoms = [p[0] if len(p) == 1 else MultiPolygon(p) for p in (pieces[i] for i in ids)]
    gdf = gpd.GeoDataFrame({"region_id": np.array(ids, dtype=np.int64)}, geometry=geoms, crs=SYNTHETIC_CRS)
    with atomic_path(world.census_regions) as tmp:
        gdf.to_file(tmp, driver="GPKG", layer="census_regions")
    sums = np.bincount(labels.ravel(), weights=pop10.ravel().astype(np.float64), minlength=n_regions + 1)[1:]
    counts = sums.copy()
    if count_noise > 0:
        rng = np.random.default_rng([seed, 3, n_regions])
        sigma = math.sqrt(math.log1p(count_noise**2))
        counts = counts * np.exp(rng.normal(0.0, sigma, n_regions) - sigma**2 / 2)
    counts = np.rint(counts).astype(np.int64)
    with atomic_path(world.census_counts) as tmp:
        with open(tmp, "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(["region_id", "count"])
            for i, c in zip(ids, counts):
                wr.writerow([i, int(c)])
    areas = np.bincount(labels.ravel(), minlength=n_regions + 1)[1:] * (PIXEL_SIZE**2) / 1e4
    return {
        "n_regions": n_regions,
        "count_noise": count_noise,
        "total_count": int(counts.sum()),
        "true_total": float(sums.sum()),
        "region_area_ha": {"min": float(areas.min()), "median": float(np.median(areas)), "max": float(areas.max())},
        "multipolygon_regions": int(sum(len(p) > 1 for p in pieces.values())),
    }


# ============================================================================================
# Writing
def _write_tif(
    path: Path,
    data: np.ndarray,
    *,
    nodata: float | None,
    descriptions: tuple[str, ...],
    tags: dict[str, Any],
    transform=None,
    band_tags: list[dict[str, Any]] | None = None,
) -> None:
    import rasterio

    if data.ndim == 2:
        data = data[None]
    count, h, w = data.shape

    # small worlds still get tiles: the largest block of 256..16 px that fits both sides
    block = next((b for b in (256, 128, 64, 32, 16) if h >= b and w >= b), 16)
    profile = geotiff_profile(
        h, w, count=count, dtype=data.dtype.name, crs=SYNTHETIC_CRS,
        transform=transform if transform is not None else _transform(), nodata=nodata,
        predictor=3 if data.dtype.kind == "f" else 2, block=block, zlevel=4, num_threads="ALL_CPUS",
        interleave="band",
    )
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as ds:
            ds.write(data)
            for i, d in enumerate(descriptions, start=1):
                ds.set_band_description(i, d)
                if band_tags is not None:
                    ds.update_tags(i, **{k: str(v) for k, v in band_tags[i - 1].items()})
            ds.update_tags(**{k: str(v) for k, v in tags.items()})


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
