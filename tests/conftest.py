"""A tiny hand-checkable world of files for the datamodule tests.

Grid: 60 x 80 px at 10 m in EPSG:32632, top-left corner (500000, 5200000).
- ``S1_<season>.tif``: VV = -10 - s, VH = -20 - s (s = season index 0..3), float32, nodata NaN.
  summer: a 3x3 NaN gap at rows 5..7, cols 5..7 (filled); autumn: a 12x12 NaN gap at rows
  30..41, cols 50..61 (kept, warned).
- ``S2_<season>.tif``: band b (0..3) = 1000 + 100 * s + 10 * b, uint16, nodata 0; spring: B03 = 0 at
  row 2, col 3 (-> NaN).
- ``census_regions.gpkg`` (EPSG:32632): five rectangles in pixel coordinates (rows, cols):
  1: [0,20) x [0,30); 2: [0,20) x [30,80); 3: [20,40) x [0,80); 4: [40,60) x [0,40);
  5: [40,60) x [40,80). ``census_counts.csv``: count = 100 * id.
"""

from __future__ import annotations

import csv
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import rasterio.features
import shapely
from rasterio.transform import from_origin

H, W = 60, 80
RES = 10.0
X0, Y0 = 500000.0, 5200000.0
CRS_UTM = "EPSG:32632"
TRANSFORM = from_origin(X0, Y0, RES, RES)
SEASON_LIST = ("spring", "summer", "autumn", "winter")
REGIONS = {  # id: (row0, row1, col0, col1)
    1: (0, 20, 0, 30),
    2: (0, 20, 30, 80),
    3: (20, 40, 0, 80),
    4: (40, 60, 0, 40),
    5: (40, 60, 40, 80),
}


def pixel_box(r0: int, r1: int, c0: int, c1: int) -> shapely.Polygon:
    return shapely.box(X0 + c0 * RES, Y0 - r1 * RES, X0 + c1 * RES, Y0 - r0 * RES)


def write_raster(path: Path, data: np.ndarray, *, nodata, descriptions=None, transform=TRANSFORM,
                 crs=CRS_UTM) -> None:
    profile = dict(driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                   dtype=data.dtype, crs=crs, transform=transform, nodata=nodata)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if descriptions:
            for i, d in enumerate(descriptions, start=1):
                dst.set_band_description(i, d)


def s1_array(s: int) -> np.ndarray:
    a = np.empty((2, H, W), np.float32)
    a[0] = -10.0 - s
    a[1] = -20.0 - s
    if s == 1:
        a[:, 5:8, 5:8] = np.nan
    if s == 2:
        a[:, 30:42, 50:62] = np.nan
    return a


def s2_array(s: int) -> np.ndarray:
    a = np.empty((4, H, W), np.uint16)
    for b in range(4):
        a[b] = 1000 + 100 * s + 10 * b
    if s == 0:
        a[1, 2, 3] = 0
    return a


def make_tiny_world(root: Path, *, regions: dict | None = None, counts: dict | None = None,
                    regions_crs: str = CRS_UTM) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s, season in enumerate(SEASON_LIST):
        write_raster(root / f"S1_{season}.tif", s1_array(s), nodata=float("nan"),
                     descriptions=["VV", "VH"])
        write_raster(root / f"S2_{season}.tif", s2_array(s), nodata=0,
                     descriptions=["B02", "B03", "B04", "B08"])
    regions = REGIONS if regions is None else regions
    gdf = gpd.GeoDataFrame(
        {"region_id": list(regions)}, geometry=[pixel_box(*v) for v in regions.values()],
        crs=CRS_UTM,
    ).to_crs(regions_crs)
    gdf.to_file(root / "census_regions.gpkg", driver="GPKG")
    counts = {k: 100.0 * k for k in regions} if counts is None else counts
    pd.DataFrame({"region_id": list(counts), "count": list(counts.values())}).to_csv(
        root / "census_counts.csv", index=False
    )
    builtup = np.zeros((1, H, W), np.float32)
    builtup[0, 10:20, 10:20] = 1.0
    builtup[0, 0, 0] = 0.5
    write_raster(root / "builtup_fraction.tif", builtup, nodata=None)
    return root


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_world(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture(scope="session")
def tiny_settlement_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 250 px settlement world of the first tuning seed with 40 ha census regions (read only)."""
    from popcorn.datasets.synthetic.settlements import TUNING_SEEDS, make_settlement_world

    return make_settlement_world(tmp_path_factory.mktemp("settlements"), size_px=250, seed=TUNING_SEEDS[0],
                                 mean_region_ha=40.0).directory


@pytest.fixture()
def fresh_world(tmp_path: Path) -> Path:
    """A modifiable copy of the tiny world."""
    return make_tiny_world(tmp_path / "world")


def read_raster(path: Path) -> np.ndarray:
    """All bands of a raster file."""
    with rasterio.open(path) as ds:
        return ds.read()


def read_counts(path: Path) -> dict[int, int]:
    """``region_id,count`` CSV of a generated world (checks the header)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0].keys()) == ["region_id", "count"]
    return {int(r["region_id"]): int(r["count"]) for r in rows}


def region_raster(world) -> np.ndarray:  # noqa: ANN001 - SyntheticWorld or SettlementWorld
    """The world's census polygons burnt onto its land-cover grid (pixel centres)."""
    gdf = gpd.read_file(world.census_regions)
    with rasterio.open(world.land_cover) as ds:
        transform, shape, crs = ds.transform, ds.shape, ds.crs
    gdf = gdf.to_crs(crs)
    return rasterio.features.rasterize(
        zip(gdf.geometry, gdf["region_id"].astype(int)), out_shape=shape, transform=transform, fill=0,
        dtype="int32",
    )
