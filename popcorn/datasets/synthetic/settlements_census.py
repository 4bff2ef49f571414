"""Census regions of the settlement worlds: irregular polygons of bounded area, and their counts.

Part of :mod:`popcorn.datasets.synthetic.settlements`. Regions are the cells of a jittered grid
of seeds (spacing from the requested mean area) in slightly warped coordinates, so their borders
are irregular, computed on the 10 m pixels. Cells cut by the map border or split by the
warping can be small, so the labels are then repaired until every region lies within
``[mean_ha / 3, 2 x mean_ha]`` (50-300 ha for the default 150 ha): the smallest region under the
minimum merges into its smallest neighbour, and a region over the maximum is cut in two equal
halves across its long axis. Polygons are polygonised from the labels, so rasterising them on
the imagery grid gives the labels back exactly. Counts are the true sums of the 10 m
population over each region, optionally with multiplicative lognormal noise, in whole people.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from popcorn.datasets.synthetic.constants import PIXEL_SIZE
from popcorn.datasets.synthetic.noise import _smooth_noise
from popcorn.io import atomic_path

PX_PER_HA = int(round(1e4 / PIXEL_SIZE**2))  # 100 pixels of 10 m per hectare


def area_bounds_ha(mean_region_ha: float) -> tuple[float, float]:
    """(min, max) region area in ha for a requested mean area."""
    return mean_region_ha / 3.0, 2.0 * mean_region_ha


def _seed_labels(n: int, mean_region_ha: float, rng: np.random.Generator) -> np.ndarray:
    """Nearest-seed labels (0..k-1) of a jittered seed grid in warped coordinates."""
    spacing = math.sqrt(mean_region_ha * PX_PER_HA)
    k = max(1, int(round(n / spacing)))
    step = n / k
    gy, gx = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    sy = (gy.ravel() + 0.5 + rng.uniform(-0.35, 0.35, k * k)) * step
    sx = (gx.ravel() + 0.5 + rng.uniform(-0.35, 0.35, k * k)) * step
    amp = 0.2 * step
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    qy = yy + amp * _smooth_noise(rng, (n, n), 0.7 * step)
    qx = xx + amp * _smooth_noise(rng, (n, n), 0.7 * step)
    _, lab = cKDTree(np.stack([sy, sx], 1)).query(np.stack([qy.ravel(), qx.ravel()], 1), workers=-1)
    return lab.astype(np.int32).reshape(n, n)


def _neighbours(labels: np.ndarray, k: int) -> np.ndarray:
    """(k, k) boolean adjacency of labels (4-connectivity)."""
    adj = np.zeros((k, k), dtype=bool)
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        diff = a != b
        adj[a[diff], b[diff]] = True
    return adj | adj.T


def _split(labels: np.ndarray, region: int, new: int) -> None:
    """Cut ``region`` into two halves of equal pixel count across its long axis (in place)."""
    rr, cc = np.nonzero(labels == region)
    pts = np.stack([rr, cc], 1).astype(np.float64)
    pts -= pts.mean(0)
    _, vecs = np.linalg.eigh(pts.T @ pts)
    proj = pts @ vecs[:, -1]
    upper = np.argsort(proj, kind="stable")[len(proj) // 2 :]
    labels[rr[upper], cc[upper]] = new


def census_labels(n: int, mean_region_ha: float, seed: int) -> np.ndarray:
    """Region labels 1..N on the n x n grid, every region within :func:`area_bounds_ha`."""
    rng = np.random.default_rng([seed, 2])
    labels = _seed_labels(n, mean_region_ha, rng)
    lo, hi = (b * PX_PER_HA for b in area_bounds_ha(mean_region_ha))
    for _ in range(10_000):
        ids, labels_c = np.unique(labels, return_inverse=True)
        labels = labels_c.reshape(n, n).astype(np.int32)
        k = len(ids)
        area = np.bincount(labels.ravel(), minlength=k)
        if k > 1 and area.min() < lo:
            small = int(np.argmin(area))
            nbrs = np.flatnonzero(_neighbours(labels, k)[small])
            target = int(nbrs[np.argmin(area[nbrs])])
            labels[labels == small] = target
        elif area.max() > hi:
            _split(labels, int(np.argmax(area)), k)
        else:
            return labels + 1
    raise RuntimeError("census regions: the area repair did not converge (this is a bug)")


def write_census(
    labels: np.ndarray, pop10: np.ndarray, count_noise: float, seed: int, paths: dict[str, Path],
    transform, crs: str,
) -> dict[str, Any]:
    """Write the regions (GeoPackage, column ``region_id``) and counts (CSV); return statistics."""
    import geopandas as gpd
    import rasterio.features
    from shapely.geometry import MultiPolygon, shape

    n_regions = int(labels.max())
    pieces: dict[int, list] = {}
    for geom, val in rasterio.features.shapes(labels, transform=transform, connectivity=4):
        pieces.setdefault(int(val), []).append(shape(geom))
    ids = sorted(pieces)
    if ids != list(range(1, n_regions + 1)):
        raise RuntimeError("census regions: some labels are empty (this is a bug)")
    geoms = [p[0] if len(p) == 1 else MultiPolygon(p) for p in (pieces[i] for i in ids)]
    gdf = gpd.GeoDataFrame({"region_id": np.array(ids, dtype=np.int64)}, geometry=geoms, crs=crs)
    with atomic_path(paths["census_regions"]) as tmp:
        gdf.to_file(tmp, driver="GPKG", layer="census_regions")
    sums = np.bincount(labels.ravel(), weights=pop10.ravel().astype(np.float64), minlength=n_regions + 1)[1:]
    counts = sums.copy()
    if count_noise > 0:
        rng = np.random.default_rng([seed, 3])
        sigma = math.sqrt(math.log1p(count_noise**2))
        counts = counts * np.exp(rng.normal(0.0, sigma, n_regions) - sigma**2 / 2)
    counts = np.rint(counts).astype(np.int64)
    with atomic_path(paths["census_counts"]) as tmp:
        with open(tmp, "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(["region_id", "count"])
            wr.writerows([i, int(c)] for i, c in zip(ids, counts))
    areas = np.bincount(labels.ravel(), minlength=n_regions + 1)[1:] / PX_PER_HA
    return {
        "n_regions": n_regions, "count_noise": count_noise, "total_count": int(counts.sum()),
        "true_total": float(sums.sum()), "empty_regions": int((counts == 0).sum()),
        "region_area_ha": {"min": float(areas.min()), "mean": float(areas.mean()),
                           "median": float(np.median(areas)), "max": float(areas.max())},
        "multipolygon_regions": int(sum(len(p) > 1 for p in pieces.values())),
    }
