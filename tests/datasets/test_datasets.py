"""Sentinel composites and census regions on the tiny world of conftest.py."""

from __future__ import annotations

import logging
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
import torch
from conftest import (
    CRS_UTM,
    REGIONS,
    RES,
    X0,
    Y0,
    H,
    W,
    make_tiny_world,
    pixel_box,
    s1_array,
    s2_array,
    write_raster,
)
from rasterio.crs import CRS
from rasterio.transform import from_origin

from popcorn.datasets import (
    SEASON_DATES,
    SEASONS,
    CensusRegions,
    RasterGrid,
    Sentinel1Composite,
    Sentinel2Composite,
    check_same_grid,
    season_slice,
)
from popcorn.datasets.sentinel import open_imagery
from popcorn.errors import PopcornInputError


def grid() -> RasterGrid:
    return RasterGrid(CRS.from_string(CRS_UTM), from_origin(X0, Y0, RES, RES), H, W)


# ---------------------------------------------------------------------------- sentinel
def test_s2_bands_units_nodata_and_season(tiny_world: Path) -> None:
    s2 = Sentinel2Composite(str(tiny_world))
    assert s2.seasons == SEASONS
    assert s2.all_bands == ("B02", "B03", "B04", "B08")
    # every file is indexed with its season's compositing period
    for season, interval in zip(s2.index["season"], s2.index.index, strict=True):
        assert (interval.left, interval.right) == SEASON_DATES[season]
    x, y = s2.grid.window_to_slices((0, 0, 10, 12))
    for s, season in enumerate(SEASONS):
        sample = s2[x, y, season_slice(season)]
        img = sample["image"]
        assert sample["season"] == season
        assert img.dtype == torch.float32 and img.shape == (4, 10, 12)
        expected = torch.tensor([1000 + 100 * s + 10 * b for b in range(4)], dtype=torch.float32)
        if season == "spring":  # B03 nodata (0) at row 2, col 3 -> NaN in that band only
            assert torch.isnan(img[1, 2, 3])
            assert not torch.isnan(img[[0, 2, 3], 2, 3]).any()
            img = img.clone()
            img[1, 2, 3] = expected[1]
        assert torch.equal(img, expected.view(4, 1, 1).expand(4, 10, 12))
    # pixel-window access gives the same as the geographic query
    assert torch.equal(
        s2.read_window("winter", (0, 0, 10, 12)), s2[x, y, season_slice("winter")]["image"]
    )


def test_s2_band_subset_and_outside_grid_is_nan(tiny_world: Path) -> None:
    s2 = Sentinel2Composite(str(tiny_world), bands=["B08"])
    img = s2.read_window("summer", (-2, -3, 5, 6))
    assert img.shape == (1, 5, 6)
    assert torch.isnan(img[:, :2]).all() and torch.isnan(img[:, :, :3]).all()
    assert (img[0, 2:, 3:] == 1100 + 30).all()


def test_query_spanning_two_seasons_is_rejected(tiny_world: Path) -> None:
    s2 = Sentinel2Composite(str(tiny_world))
    x, y = s2.grid.window_to_slices((0, 0, 4, 4))
    t = slice(SEASON_DATES["spring"][0], SEASON_DATES["summer"][1])
    with pytest.raises(IndexError, match="several seasons"):
        s2[x, y, t]


def test_s1_db_small_gap_filled_large_gap_kept_and_warned(
    tiny_world: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s1 = Sentinel1Composite(str(tiny_world))
    assert s1.all_bands == ("VV", "VH")
    x, y = s1.grid.window_to_slices((0, 0, H, W))
    spring = s1[x, y, season_slice("spring")]["image"]
    assert spring.dtype == torch.float32
    assert (spring[0] == -10).all() and (spring[1] == -20).all()
    summer = s1.read_window("summer", (0, 0, 20, 20))  # 3x3 gap: filled from neighbours
    assert not torch.isnan(summer).any()
    assert (summer[0] == -11).all() and (summer[1] == -21).all()
    # a window cutting the gap in its middle is filled too (gap size measured with context)
    assert not torch.isnan(s1.read_window("summer", (6, 6, 4, 4))).any()
    with caplog.at_level(logging.WARNING):
        autumn = s1.read_window("autumn", (25, 45, 20, 20))  # 12x12 = 144 px gap: kept
    assert torch.isnan(autumn[:, 5:17, 5:17]).all()
    assert torch.isnan(autumn).sum() == 2 * 144
    assert "S1_autumn.tif" in caplog.text and "autumn" in caplog.text
    assert "--season-gap-fill" in caplog.text  # the warning says what to do
    # a small window inside the big gap stays NaN (not mistaken for a small gap)
    assert torch.isnan(s1.read_window("autumn", (33, 53, 2, 2))).all()


def test_season_gap_fill_takes_the_other_seasons_mean_and_is_off_by_default(
    fresh_world: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A value a season misses becomes the mean of the other seasons at that pixel (before the
    small-gap rule); what no season observes stays NaN; without the option nothing changes."""
    vv = [-10.0, -11.0, -12.0, -13.0]  # spring .. winter (s1_array)
    s1, s2, _ = open_imagery(fresh_world, ["summer", "autumn"], season_gap_fill=True)
    assert s1.season_gap_fill and s2.season_gap_fill
    with caplog.at_level(logging.WARNING):
        autumn = s1.read_window("autumn", (25, 45, 20, 20)).numpy()  # the 12 x 12 px gap
    assert np.isfinite(autumn).all() and "NaN gap larger" not in caplog.text
    assert np.allclose(autumn[0, 5:17, 5:17], np.mean([vv[0], vv[1], vv[3]]))
    assert np.allclose(autumn[1, 5:17, 5:17], np.mean([-20.0, -21.0, -23.0]))
    assert np.all(autumn[0, :5] == -12.0)  # observed values untouched
    summer = s1.read_window("summer", (0, 0, 20, 20)).numpy()  # the 3 x 3 gap: other seasons, not neighbours
    assert np.allclose(summer[0, 5:8, 5:8], np.mean([vv[0], vv[2], vv[3]])) and np.all(summer[0, 0] == -11.0)
    spring_s2 = s2.read_window("spring", (0, 0, 5, 5)).numpy()  # band B03 missing at (2, 3) in spring
    assert spring_s2[1, 2, 3] == pytest.approx(1010 + 100 * np.mean([1, 2, 3]))
    assert spring_s2[0, 2, 3] == 1000 and spring_s2[1, 0, 0] == 1010
    plain = Sentinel1Composite(str(fresh_world))
    assert not plain.season_gap_fill and torch.isnan(plain.read_window("autumn", (25, 45, 20, 20))).sum() == 2 * 144
    for season in ("spring", "summer", "winter"):  # now every season misses the autumn gap
        _rewrite(fresh_world / f"S1_{season}.tif", np.where(np.isnan(s1_array(2)), np.nan, s1_array(0)),
                 nodata=float("nan"), descriptions=["VV", "VH"])
    nobody = Sentinel1Composite(str(fresh_world), season_gap_fill=True).read_window("autumn", (25, 45, 20, 20))
    assert torch.isnan(nobody).sum() == 2 * 144


def test_intersection_with_census_returns_id_mask(tiny_world: Path) -> None:
    s2 = Sentinel2Composite(str(tiny_world))
    regions = CensusRegions(
        tiny_world / "census_regions.gpkg", tiny_world / "census_counts.csv", s2.grid
    )
    both = s2 & regions
    x, y = s2.grid.window_to_slices((15, 25, 10, 10))
    sample = both[x, y, season_slice("autumn")]
    assert sample["image"].shape == (4, 10, 10)
    assert sample["mask"].shape == (10, 10)
    assert torch.equal(sample["mask"], torch.from_numpy(regions.id_raster[15:25, 25:35]).long())


def _rewrite(path: Path, data: np.ndarray, **kw) -> None:
    path.unlink()
    write_raster(path, data, **kw)


def test_missing_band_by_count_names_file_and_band(fresh_world: Path) -> None:
    _rewrite(fresh_world / "S1_summer.tif", s1_array(1)[:1], nodata=float("nan"))
    with pytest.raises(PopcornInputError, match=r"S1_summer\.tif.*VH"):
        Sentinel1Composite(str(fresh_world))


def test_wrong_band_description_names_file_and_band(fresh_world: Path) -> None:
    _rewrite(fresh_world / "S2_autumn.tif", s2_array(2), nodata=0,
             descriptions=["B02", "B03", "B04", "B05"])
    with pytest.raises(PopcornInputError, match=r"S2_autumn\.tif.*B08"):
        Sentinel2Composite(str(fresh_world))


def test_unreadable_geotiff_is_named(fresh_world: Path) -> None:
    (fresh_world / "S2_winter.tif").write_bytes(b"this is not a GeoTIFF")
    with pytest.raises(PopcornInputError, match=r"S2_winter\.tif"):
        Sentinel2Composite(str(fresh_world))


def test_s1_s2_crs_mismatch_names_both_files(fresh_world: Path) -> None:
    for s, season in enumerate(SEASONS):
        _rewrite(fresh_world / f"S1_{season}.tif", s1_array(s), nodata=float("nan"),
                 crs="EPSG:32633", descriptions=["VV", "VH"])
    with pytest.raises(PopcornInputError, match=r"S1_spring\.tif.*S2_spring\.tif"):
        open_imagery(fresh_world, SEASONS)


def test_s1_s2_resolution_mismatch_names_both_files(fresh_world: Path) -> None:
    for s, season in enumerate(SEASONS):
        _rewrite(fresh_world / f"S1_{season}.tif", s1_array(s)[:, ::2, ::2].copy(),
                 nodata=float("nan"), transform=from_origin(X0, Y0, 20, 20),
                 descriptions=["VV", "VH"])
    s1, s2 = Sentinel1Composite(str(fresh_world)), Sentinel2Composite(str(fresh_world))
    with pytest.raises(PopcornInputError, match=r"S1_spring\.tif.*S2_spring\.tif"):
        check_same_grid(s1, s2)


def test_mixed_resolution_within_one_sensor_names_both(fresh_world: Path) -> None:
    _rewrite(fresh_world / "S2_winter.tif", s2_array(3)[:, ::2, ::2].copy(), nodata=0,
             transform=from_origin(X0, Y0, 20, 20), descriptions=["B02", "B03", "B04", "B08"])
    with pytest.raises(PopcornInputError, match=r"S2_.*\.tif.*S2_winter\.tif"):
        Sentinel2Composite(str(fresh_world))


def test_missing_season_is_named(fresh_world: Path) -> None:
    (fresh_world / "S2_winter.tif").unlink()
    with pytest.raises(PopcornInputError, match="winter"):
        open_imagery(fresh_world, SEASONS)


def test_tiles_of_one_season_are_mosaicked(tmp_path: Path) -> None:
    root = make_tiny_world(tmp_path / "w")
    full = s2_array(1)
    (root / "S2_summer.tif").unlink()
    write_raster(root / "S2_summer_a.tif", full[:, :, :40].copy(), nodata=0,
                 descriptions=["B02", "B03", "B04", "B08"])
    write_raster(root / "S2_summer_b.tif", full[:, :, 40:].copy(), nodata=0,
                 transform=from_origin(X0 + 40 * RES, Y0, RES, RES),
                 descriptions=["B02", "B03", "B04", "B08"])
    s2 = Sentinel2Composite(str(root))
    assert len(s2.files_of("summer")) == 2
    img = s2.read_window("summer", (0, 30, 10, 20))
    assert torch.equal(img, torch.from_numpy(full[:, :10, 30:50].astype(np.float32)))


# ---------------------------------------------------------------------------- census
def test_rasterised_regions_and_counts(tiny_world: Path) -> None:
    regions = CensusRegions(
        tiny_world / "census_regions.gpkg", tiny_world / "census_counts.csv", grid()
    )
    assert regions.ids == [1, 2, 3, 4, 5]
    assert regions.counts == {k: 100.0 * k for k in REGIONS}
    assert regions.id_raster.dtype == np.int32 and regions.id_raster.shape == (H, W)
    expected = np.zeros((H, W), np.int32)
    for rid, (r0, r1, c0, c1) in REGIONS.items():
        expected[r0:r1, c0:c1] = rid
        assert regions.windows[rid] == (r0, c0, r1 - r0, c1 - c0)
        assert regions.pixel_counts[rid] == (r1 - r0) * (c1 - c0)
    np.testing.assert_array_equal(regions.id_raster, expected)
    assert regions.area_ha(1) == 20 * 30 / 100
    assert regions.transform == grid().transform and regions.crs == grid().crs
    assert len(regions) == 5


def test_regions_in_other_crs_and_pixel_centre_rule(tmp_path: Path) -> None:
    # region 1 spans 1.4 px in x (0..14 m): only pixel 0 has its centre inside (all_touched=False)
    polys = {1: shapely.box(X0, Y0 - 20, X0 + 14, Y0), 2: pixel_box(10, 30, 10, 40)}
    gdf = gpd.GeoDataFrame({"region_id": [1, 2], "pop": [5.0, 7.5]},
                           geometry=list(polys.values()), crs=CRS_UTM).to_crs("EPSG:4326")
    path = tmp_path / "regions.geojson"
    gdf.to_file(path, driver="GeoJSON")
    regions = CensusRegions(path, None, grid(), count_column="pop")  # counts from the vector
    assert regions.counts == {1: 5.0, 2: 7.5}
    assert regions.windows[1] == (0, 0, 2, 1) and regions.pixel_counts[1] == 2
    assert regions.windows[2] == (10, 10, 20, 30) and regions.pixel_counts[2] == 600


def _write_regions(path: Path, ids: list[int], boxes: list[tuple[int, int, int, int]],
                   **cols) -> Path:
    gpd.GeoDataFrame({"region_id": ids, **cols}, geometry=[pixel_box(*b) for b in boxes],
                     crs=CRS_UTM).to_file(path, driver="GPKG")
    return path


def _write_counts(path: Path, ids: list, counts: list, id_col: str = "region_id",
                  count_col: str = "count") -> Path:
    pd.DataFrame({id_col: ids, count_col: counts}).to_csv(path, index=False)
    return path


BOXES = [REGIONS[1], REGIONS[2], REGIONS[3]]


@pytest.mark.parametrize(
    ("ids", "counts", "vector_ids", "pattern"),
    [
        ([1, 2, 3, 9], [1, 2, 3, 4], [1, 2, 3], r"without a polygon.*\b9\b"),
        ([1, 2], [1, 2], [1, 2, 3], r"without a count.*\b3\b"),
        ([1, 2, 3, 3], [1, 2, 3, 4], [1, 2, 3], r"duplicate.*\b3\b"),
        ([1, 2, 3], [1, -5, 3], [1, 2, 3], r"negative.*region 2.*-5"),
        ([1, 2, 3], [1, "many", 3], [1, 2, 3], r"non-numeric.*region 2.*many"),
        ([1, 2, 3], [1, 2, 3], [1, 2, 2], r"duplicate.*\b2\b"),
    ],
)
def test_bad_census_inputs_name_the_culprit(
    tmp_path: Path, ids: list, counts: list, vector_ids: list[int], pattern: str
) -> None:
    regions = _write_regions(tmp_path / "r.gpkg", vector_ids, BOXES)
    table = _write_counts(tmp_path / "c.csv", ids, counts)
    with pytest.raises(PopcornInputError, match=pattern):
        CensusRegions(regions, table, grid())


def test_region_outside_imagery_is_named(tmp_path: Path) -> None:
    regions = _write_regions(tmp_path / "r.gpkg", [1, 2, 77], [*BOXES[:2], (100, 120, 0, 10)])
    table = _write_counts(tmp_path / "c.csv", [1, 2, 77], [1, 2, 3])
    with pytest.raises(PopcornInputError, match=r"outside the imagery.*\b77\b"):
        CensusRegions(regions, table, grid())


def test_missing_columns_are_named_with_columns_present(tmp_path: Path) -> None:
    regions = _write_regions(tmp_path / "r.gpkg", [1, 2, 3], BOXES, people=[1.0, 2.0, 3.0])
    table = _write_counts(tmp_path / "c.csv", [1, 2, 3], [1, 2, 3], count_col="population")
    with pytest.raises(PopcornInputError, match=r"'count'.*population"):
        CensusRegions(regions, table, grid())
    with pytest.raises(PopcornInputError, match=r"'gid'.*region_id"):
        CensusRegions(regions, table, grid(), id_column="gid")
    with pytest.raises(PopcornInputError, match=r"'count'.*people"):  # count from the vector
        CensusRegions(regions, None, grid())
    ok = CensusRegions(regions, None, grid(), count_column="people")
    assert ok.counts == {1: 1.0, 2: 2.0, 3: 3.0}
