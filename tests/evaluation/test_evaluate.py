"""popcorn.evaluation.compare / popcorn.evaluation.baselines / popcorn.evaluation.metrics: hand-checked evaluations."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from rasterio.transform import from_origin

from popcorn.cli.evaluate import main
from popcorn.errors import PopcornInputError
from popcorn.evaluation.baselines import builtup_disaggregation, uniform_disaggregation
from popcorn.evaluation.compare import evaluate_against_raster, evaluate_against_units, map_on_grid
from popcorn.evaluation.metrics import mae, r2_score, regression_metrics, rmse

UTM = "EPSG:32632"
X0, Y0 = 500000.0, 5200000.0  # ~47 N, 9 E


def _write(path: Path, array: np.ndarray, transform, crs=UTM, nodata=-1.0) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[1], height=array.shape[0], count=1,
                       dtype="float32", crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(array.astype(np.float32)[None])
    return path


def test_metrics_hand_examples() -> None:
    true = np.array([0.0, 2.0, 4.0, 6.0])
    pred = np.array([1.0, 2.0, 3.0, 8.0])
    # residuals -1, 0, 1, -2: SSE 6; mean 3, SST 9+1+1+9 = 20
    assert r2_score(pred, true) == pytest.approx(1 - 6 / 20)
    assert mae(pred, true) == pytest.approx(1.0)
    assert rmse(pred, true) == pytest.approx(np.sqrt(6 / 4))
    m = regression_metrics(pred, true)
    assert (m["total_pred"], m["total_true"], m["units"]) == (14.0, 12.0, 4.0)


@pytest.fixture()
def truth(tmp_path: Path) -> Path:
    """A 1 ha truth grid of 6 x 8 cells in UTM with cell value = row * 10 + col."""
    values = np.add.outer(np.arange(6) * 10.0, np.arange(8))
    return _write(tmp_path / "truth.tif", values, from_origin(X0, Y0, 100, 100))


def test_same_grid_10m_map_is_block_summed(tmp_path: Path, truth: Path) -> None:
    fine = np.random.default_rng(0).random((60, 80))
    path = _write(tmp_path / "fine.tif", fine, from_origin(X0, Y0, 10, 10))
    ev = evaluate_against_raster({"fine": str(path)}, truth)
    expected = fine.reshape(6, 10, 8, 10).sum(axis=(1, 3)).ravel()
    assert np.allclose(ev.predictions["fine"], expected, atol=1e-4)


def test_coarser_map_is_spread_evenly(tmp_path: Path, truth: Path) -> None:
    coarse = np.array([[400.0, 800.0, 0.0, 40.0], [4.0, 8.0, 12.0, 16.0], [1.0, 2.0, 3.0, 4.0]])
    path = _write(tmp_path / "coarse.tif", coarse, from_origin(X0, Y0, 200, 200))
    ev = evaluate_against_raster({"coarse": str(path)}, truth)
    expected = np.kron(coarse / 4, np.ones((2, 2))).ravel()  # each 200 m pixel -> 4 cells of 1 ha
    assert np.allclose(ev.predictions["coarse"], expected, rtol=1e-6)
    assert ev.metrics["coarse"]["total_pred"] == pytest.approx(coarse.sum())


def test_geographic_map_other_crs_and_resolution(tmp_path: Path, truth: Path) -> None:
    """A WorldPop-like map in EPSG:4326: density d1 west of a meridian, d2 east of it."""
    from rasterio.warp import transform_bounds

    west, south, east, north = transform_bounds(UTM, "EPSG:4326", X0 - 500, Y0 - 1100, X0 + 1300, Y0 + 500)
    res = 0.0005  # ~ 38 x 55 m
    width, height = int(np.ceil((east - west) / res)), int(np.ceil((north - south) / res))
    transform = from_origin(west, north, res, res)
    lon = west + (np.arange(width) + 0.5) * res
    # split meridian: the UTM x of cell boundary X0 + 400 (4th column of cells) at mid latitude
    from pyproj import Transformer

    to_geo = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    split_lon, _ = to_geo.transform(X0 + 400, Y0 - 300)
    col_split = int(round((split_lon - west) / res))
    d1, d2 = 0.002, 0.01  # people per m2
    lats = north - (np.arange(height) + 0.5) * res
    r = 6371008.8
    area = r**2 * np.radians(res) * np.abs(np.sin(np.radians(lats + res / 2)) - np.sin(np.radians(lats - res / 2)))
    density = np.where(np.arange(width)[None, :] < col_split, d1, d2)
    counts = density * area[:, None]
    path = _write(tmp_path / "geo.tif", counts, transform, crs="EPSG:4326")
    ev = evaluate_against_raster({"geo": str(path)}, truth)
    cells = ev.predictions["geo"].reshape(6, 8)
    # cells well west / east of the split: density x 1 ha (1 % tolerance: meridian vs UTM grid
    # convergence and the sphere)
    assert np.allclose(cells[:, :2], d1 * 1e4, rtol=0.01)
    assert np.allclose(cells[:, 6:], d2 * 1e4, rtol=0.01)
    del lon


def test_units_zonal_sums(tmp_path: Path) -> None:
    fine = np.arange(40 * 60, dtype=float).reshape(40, 60) % 7
    path = _write(tmp_path / "map.tif", fine, from_origin(X0, Y0, 10, 10))
    boxes = {1: (0, 20, 0, 30), 2: (0, 20, 30, 60), 3: (20, 40, 0, 60)}  # rows, cols
    geoms = [shapely.box(X0 + c0 * 10, Y0 - r1 * 10, X0 + c1 * 10, Y0 - r0 * 10) for r0, r1, c0, c1 in boxes.values()]
    gdf = gpd.GeoDataFrame({"region_id": list(boxes), "count": [100.0, 200.0, 300.0]}, geometry=geoms, crs=UTM)
    gdf.to_crs("EPSG:4326").to_file(tmp_path / "units.gpkg")  # units in another CRS
    ev = evaluate_against_units({"m": str(path)}, tmp_path / "units.gpkg")
    expected = [fine[r0:r1, c0:c1].sum() for r0, r1, c0, c1 in boxes.values()]
    assert np.allclose(ev.predictions["m"], expected, rtol=2e-3)
    assert list(ev.truth) == [100.0, 200.0, 300.0]


def test_baselines_and_cli(tmp_path: Path, truth: Path) -> None:
    weights = np.zeros((60, 80))
    weights[:30, :40] = 1.0
    weights[5, 5] = 3.0
    wpath = _write(tmp_path / "builtup.tif", weights, from_origin(X0, Y0, 10, 10))
    geoms = [shapely.box(X0, Y0 - 600, X0 + 400, Y0), shapely.box(X0 + 400, Y0 - 600, X0 + 800, Y0)]
    gpd.GeoDataFrame({"region_id": [1, 2]}, geometry=geoms, crs=UTM).to_file(tmp_path / "census.gpkg")
    pd.DataFrame({"region_id": [1, 2], "count": [1000.0, 240.0]}).to_csv(tmp_path / "counts.csv", index=False)
    out = builtup_disaggregation(wpath, tmp_path / "census.gpkg", tmp_path / "counts.csv", tmp_path / "bu.tif")
    with rasterio.open(out) as src:
        people = src.read(1)
    assert people[:, :40].sum() == pytest.approx(1000.0, rel=1e-5)
    assert people[5, 5] == pytest.approx(3 * 1000.0 / (30 * 40 + 2), rel=1e-5)
    # region 2 has no built-up: its count is spread evenly
    assert np.allclose(people[:, 40:], 240.0 / (60 * 40), rtol=1e-5)
    out = uniform_disaggregation(wpath, tmp_path / "census.gpkg", tmp_path / "counts.csv", tmp_path / "uni.tif")
    with rasterio.open(out) as src:
        assert np.allclose(src.read(1)[:, :40], 1000.0 / 2400, rtol=1e-5)
    ev = main(["--truth", str(truth), "--map", f"ours={wpath}", "--census", str(tmp_path / "census.gpkg"),
               "--counts", str(tmp_path / "counts.csv"), "--builtup", str(wpath), "--uniform",
               "--out", str(tmp_path / "eval")])
    assert set(ev.metrics) == {"ours", "BuiltUp disaggregation", "Uniform areal weighting"}
    table = pd.read_csv(tmp_path / "eval" / "comparison.csv")
    assert list(table.method) == list(ev.metrics) and {"r2", "mae", "rmse", "total_pred"} <= set(table.columns)
    assert "| Uniform areal weighting |" in (tmp_path / "eval" / "comparison.md").read_text()


def test_map_without_overlap_is_rejected(tmp_path: Path, truth: Path) -> None:
    far = _write(tmp_path / "far.tif", np.ones((10, 10)), from_origin(100.0, 10.0, 0.01, 0.01), crs="EPSG:4326")
    with pytest.raises(PopcornInputError, match=r"far\.tif.*EPSG:4326.*does not overlap"):
        evaluate_against_raster({"far": str(far)}, truth)
    with pytest.raises(PopcornInputError, match="does not exist"):
        evaluate_against_raster({"x": str(tmp_path / "nope.tif")}, truth)
    assert np.isnan(map_on_grid(far, rasterio.crs.CRS.from_string(UTM), from_origin(X0, Y0, 100, 100), (2, 2))).all()
