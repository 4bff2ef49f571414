"""Tests of the embedded synthetic world (popcorn/datasets/synthetic/world.py), on tiny worlds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
from conftest import read_counts, read_raster, region_raster
from paths import PUBLISHED_CHECKPOINT

from popcorn.datasets.synthetic.constants import LAND_COVER_CLASSES, SEASONS
from popcorn.datasets.synthetic.files import _census_labels
from popcorn.datasets.synthetic.world import SyntheticWorld, make_synthetic_world, world_dir
from popcorn.errors import PopcornInputError

SIZE = 200  # 2 km x 2 km
N_REGIONS = 15
CHECKPOINT = PUBLISHED_CHECKPOINT
CODE = {name: code for code, name in LAND_COVER_CLASSES.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SyntheticWorld:
    return make_synthetic_world(tmp_path_factory.mktemp("synthetic"), size_px=SIZE, seed=3, n_regions=N_REGIONS)


def test_world_dir_and_paths(world: SyntheticWorld) -> None:
    assert world.directory == world_dir(world.directory.parent, SIZE, 3)
    assert world.directory.name == f"world_{SIZE}px_seed3"
    assert (world.size_px, world.seed, world.crs) == (SIZE, 3, "EPSG:32632")
    for p in world.files() + [world.directory / "world.json"]:
        assert p.is_file(), p
    assert not list(world.directory.rglob("*.tmp-*")), "temporary files left behind"


def test_imagery_files(world: SyntheticWorld) -> None:
    for season in SEASONS:
        with rasterio.open(world.imagery_dir / f"S2_{season}.tif") as ds:
            assert ds.count == 4 and ds.dtypes == ("uint16",) * 4
            assert ds.descriptions == ("B02", "B03", "B04", "B08")
            assert ds.nodata == 0
            assert ds.crs.to_epsg() == 32632 and ds.res == (10.0, 10.0) and ds.shape == (SIZE, SIZE)
            assert ds.profile["tiled"] and ds.compression.name.lower() == "deflate"
            tags = ds.tags()
            assert tags["generator"] == "popcorn.datasets.synthetic.world" and tags["seed"] == "3"
            assert tags["size_px"] == str(SIZE) and "popcorn_version" in tags and tags["season"] == season
        with rasterio.open(world.imagery_dir / f"S1_{season}.tif") as ds:
            assert ds.count == 2 and ds.dtypes == ("float32",) * 2
            assert ds.descriptions == ("VV", "VH")
            assert math.isnan(ds.nodata)
            assert ds.crs.to_epsg() == 32632 and ds.shape == (SIZE, SIZE)
            s1 = ds.read()
        nan = np.isnan(s1)
        assert 0 < nan.mean() < 0.002, "S1 should have a few very small NaN gaps"
        assert -35 < np.nanmin(s1) and np.nanmax(s1) < 15


def test_truth_files(world: SyntheticWorld) -> None:
    with rasterio.open(world.builtup_fraction) as ds:
        assert ds.dtypes == ("float32",) and ds.crs.to_epsg() == 32632 and ds.shape == (SIZE, SIZE)
        bf = ds.read(1)
        t10 = ds.transform
    assert bf.min() >= 0 and bf.max() <= 1 and 0 < bf.mean() < 0.5
    with rasterio.open(world.population_10m) as ds:
        assert ds.dtypes == ("float32",) and ds.transform == t10
    with rasterio.open(world.population_1ha) as ds:
        assert ds.dtypes == ("float32",) and ds.shape == (SIZE // 10, SIZE // 10)
        assert ds.res == (100.0, 100.0)
        assert (ds.transform.c, ds.transform.f) == (t10.c, t10.f)  # exactly aligned corners
    with rasterio.open(world.land_cover) as ds:
        assert ds.dtypes == ("uint8",)
        tags = ds.tags()
        lc = ds.read(1)
    for code, name in LAND_COVER_CLASSES.items():
        assert tags[f"class_{code}"] == name
    assert set(np.unique(lc)) <= set(LAND_COVER_CLASSES)
    for name in ("urban_centre", "suburb", "industrial_commercial", "forest", "farmland", "water", "road"):
        assert (lc == CODE[name]).any(), name

    meta = json.loads((world.directory / "world.json").read_text())
    assert meta["seed"] == 3 and meta["size_px"] == SIZE and meta["crs"] == "EPSG:32632"
    assert meta["transform"] == list(t10)[:6]
    assert meta["land_cover_classes"] == {str(k): v for k, v in LAND_COVER_CLASSES.items()}
    assert meta["n_regions"] == N_REGIONS
    occ = meta["occupancy_people_per_built_pixel"]
    assert occ["urban_centre"] > occ["inner_town"] > occ["suburb"] > occ["village"] > 0
    assert occ["industrial_commercial"] == 0
    pop = read_raster(world.population_10m)[0]
    assert meta["total_population"] == pytest.approx(float(pop.sum(dtype=np.float64)), rel=1e-6)
    assert meta["creation_parameters"]["count_noise"] == 0.0


def test_population_1ha_is_block_sum(world: SyntheticWorld) -> None:
    pop10 = read_raster(world.population_10m)[0].astype(np.float64)
    pop1ha = read_raster(world.population_1ha)[0]
    n = SIZE // 10
    sums = pop10.reshape(n, 10, n, 10).sum(axis=(1, 3))
    np.testing.assert_allclose(pop1ha, sums, rtol=1e-5, atol=1e-4)
    assert pop10.min() >= 0


def test_population_by_zone(world: SyntheticWorld) -> None:
    lc = read_raster(world.land_cover)[0]
    bf = read_raster(world.builtup_fraction)[0]
    pop = read_raster(world.population_10m)[0]
    ind = lc == CODE["industrial_commercial"]
    assert bf[ind].max() > 0.5 and bf[ind].mean() > 0.1, "industrial zones are built up"
    assert np.all(pop[ind] == 0), "industrial zones have no residents"
    for name in ("park", "road", "forest", "farmland", "grassland", "water"):
        assert np.all(pop[lc == CODE[name]] == 0), name
    # people per ha in the zones: dense centre > inner town > suburbs
    density = {name: pop[lc == CODE[name]].mean() * 100 for name in ("urban_centre", "inner_town", "suburb")}
    assert density["urban_centre"] > density["inner_town"] > density["suburb"] > 5
    assert 80 < density["urban_centre"] < 400
    # occupancy is not piecewise constant inside a zone
    occ = pop[(lc == CODE["suburb"]) & (bf > 0.9)] / bf[(lc == CODE["suburb"]) & (bf > 0.9)]
    assert occ.std() / occ.mean() > 0.1


def test_census(world: SyntheticWorld) -> None:
    gdf = gpd.read_file(world.census_regions)
    assert "region_id" in gdf.columns and gdf["region_id"].dtype.kind == "i"
    assert sorted(gdf["region_id"]) == list(range(1, N_REGIONS + 1)), "one row per region, ids 1..N"
    assert set(gdf.geom_type) <= {"Polygon", "MultiPolygon"} and gdf.is_valid.all()
    raster = region_raster(world)
    pop = read_raster(world.population_10m)[0]
    labels = _census_labels(pop, N_REGIONS, world.seed)
    np.testing.assert_array_equal(raster, labels)
    assert raster.min() >= 1, "every pixel belongs to a region"
    counts = read_counts(world.census_counts)
    assert sorted(counts) == list(range(1, N_REGIONS + 1))
    sums = np.bincount(raster.ravel(), weights=pop.ravel().astype(np.float64), minlength=N_REGIONS + 1)
    for rid, c in counts.items():
        assert abs(c - sums[rid]) <= 0.5 + 1e-6, rid
    # smaller regions where people live
    areas = np.bincount(raster.ravel(), minlength=N_REGIONS + 1)[1:]
    dens = sums[1:] / areas
    assert np.corrcoef(np.log(areas), np.log1p(dens))[0, 1] < 0


def test_count_noise_and_census_regeneration(world: SyntheticWorld, tmp_path: Path) -> None:
    a = make_synthetic_world(tmp_path, size_px=SIZE, seed=3, n_regions=N_REGIONS, count_noise=0.2)
    s2_mtime = a.imagery_dir.joinpath("S2_summer.tif").stat().st_mtime_ns
    exact = read_counts(world.census_counts)
    noisy = read_counts(a.census_counts)
    assert sorted(noisy) == sorted(exact)
    assert any(noisy[k] != exact[k] for k in exact)
    assert sum(noisy.values()) == pytest.approx(sum(exact.values()), rel=0.5)
    # other census parameters on the cached world: census regenerated, imagery untouched
    b = make_synthetic_world(tmp_path, size_px=SIZE, seed=3, n_regions=8, count_noise=0.0)
    assert b.directory == a.directory
    assert a.imagery_dir.joinpath("S2_summer.tif").stat().st_mtime_ns == s2_mtime
    assert sorted(read_counts(b.census_counts)) == list(range(1, 9))
    assert len(gpd.read_file(b.census_regions)) == 8
    assert json.loads((b.directory / "world.json").read_text())["n_regions"] == 8


def test_seasons(world: SyntheticWorld) -> None:
    lc = read_raster(world.land_cover)[0]

    def ndvi(season: str) -> np.ndarray:
        s2 = read_raster(world.imagery_dir / f"S2_{season}.tif").astype(np.float64)
        s2[s2 == 0] = np.nan
        return (s2[3] - s2[2]) / (s2[3] + s2[2])

    summer, winter = ndvi("summer"), ndvi("winter")
    for name in ("farmland", "forest"):
        m = lc == CODE[name]
        assert np.nanmean(summer[m]) - np.nanmean(winter[m]) > 0.1, name
    assert np.nanmean(summer[lc == CODE["farmland"]]) > 0.4


def test_reflectance_and_backscatter_levels(world: SyntheticWorld) -> None:
    lc = read_raster(world.land_cover)[0]
    bf = read_raster(world.builtup_fraction)[0]
    s2 = read_raster(world.imagery_dir / "S2_summer.tif").astype(np.float64)
    s2[s2 == 0] = np.nan
    s1 = read_raster(world.imagery_dir / "S1_summer.tif")
    dense = (bf > 0.8) & np.isin(lc, [CODE["urban_centre"], CODE["inner_town"], CODE["suburb"]])
    roof = np.nanmean(s2[:, dense], axis=1)
    assert np.all((roof > 800) & (roof < 2400)), roof
    forest = lc == CODE["forest"]
    assert 200 < np.nanmean(s2[2, forest]) < 600 and 2000 < np.nanmean(s2[3, forest]) < 4000
    water = (lc == CODE["water"]) & (bf == 0)
    water = water & ~(np.roll(lc, 2, 0) != CODE["water"]) & ~(np.roll(lc, -2, 0) != CODE["water"])
    if water.sum() > 20:
        assert np.nanmean(s2[3, water]) < 400
        assert np.nanmean(s1[0, water]) < -15
    veg_vv = np.nanmean(s1[0, lc == CODE["farmland"]])
    assert -14 < veg_vv < -8
    assert np.nanmean(s1[0, dense]) > veg_vv + 3, "double bounce makes towns bright in VV"


def test_s2_has_nodata(world: SyntheticWorld) -> None:
    total = 0
    for season in SEASONS:
        s2 = read_raster(world.imagery_dir / f"S2_{season}.tif")
        gap = s2 == 0
        assert np.array_equal(gap[0], gap.all(axis=0)), "cloud gaps cover every band"
        total += int(gap[0].sum())
    assert total > 0
    assert total < 0.1 * 4 * SIZE * SIZE


def test_cache_and_determinism(world: SyntheticWorld, tmp_path: Path) -> None:
    files = world.files() + [world.directory / "world.json"]
    before = {p: p.stat().st_mtime_ns for p in files}
    again = make_synthetic_world(world.directory.parent, size_px=SIZE, seed=3, n_regions=N_REGIONS)
    assert again == world
    assert {p: p.stat().st_mtime_ns for p in files} == before, "a cached world must not be rewritten"

    same = make_synthetic_world(tmp_path / "a", size_px=SIZE, seed=3, n_regions=N_REGIONS)
    other = make_synthetic_world(tmp_path / "b", size_px=SIZE, seed=4, n_regions=N_REGIONS)
    for name in ("S2_spring.tif", "S1_winter.tif", "population_10m.tif", "land_cover.tif"):
        a = read_raster(world.imagery_dir / name if name.startswith("S") else world.directory / name)
        b = read_raster(same.imagery_dir / name if name.startswith("S") else same.directory / name)
        c = read_raster(other.imagery_dir / name if name.startswith("S") else other.directory / name)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c, equal_nan=True), name
    assert read_counts(same.census_counts) == read_counts(world.census_counts)


def test_incomplete_world_is_regenerated(tmp_path: Path) -> None:
    w = make_synthetic_world(tmp_path, size_px=100, seed=1, n_regions=5)
    ref = read_raster(w.population_10m)
    (w.directory / "world.json").unlink()
    w.land_cover.unlink()
    w2 = make_synthetic_world(tmp_path, size_px=100, seed=1, n_regions=5)
    assert (w2.directory / "world.json").is_file() and w2.land_cover.is_file()
    np.testing.assert_array_equal(read_raster(w2.population_10m), ref)
    mtime = w2.land_cover.stat().st_mtime_ns
    make_synthetic_world(tmp_path, size_px=100, seed=1, n_regions=5, overwrite=True)
    assert w2.land_cover.stat().st_mtime_ns != mtime


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"size_px": 205}, "multiple of 10"),
        ({"size_px": 50}, "too small"),
        ({"size_px": 200, "n_regions": 0}, "n_regions"),
        ({"size_px": 200, "n_regions": 401}, "n_regions"),
        ({"size_px": 200, "count_noise": -0.1}, "count_noise"),
        ({"size_px": 200, "seed": -1}, "seed"),
    ],
)
def test_bad_parameters(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(PopcornInputError, match=match):
        make_synthetic_world(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir()), "nothing is written for bad parameters"


@pytest.mark.skipif(not CHECKPOINT.is_file(), reason=f"published built-up weights not found at {CHECKPOINT}")
def test_published_builtup_weights_see_the_towns(world: SyntheticWorld) -> None:
    import torch

    from popcorn.models import BuiltUpExtractor

    net = BuiltUpExtractor.from_pretrained(str(CHECKPOINT))
    lc = read_raster(world.land_cover)[0]
    bf = read_raster(world.builtup_fraction)[0]
    dense = bf > 0.3
    vegetation = np.isin(lc, [CODE["forest"], CODE["farmland"], CODE["grassland"]])
    for season in ("summer", "winter"):
        s2 = read_raster(world.imagery_dir / f"S2_{season}.tif").astype(np.float32)
        s2[s2 == 0] = np.nan
        s1 = read_raster(world.imagery_dir / f"S1_{season}.tif").astype(np.float32)
        with torch.no_grad():
            score = net(torch.from_numpy(s1)[None], torch.from_numpy(s2)[None])[0, 0].numpy()
        assert score[dense].mean() > 0.5, season
        assert score[vegetation].mean() < 0.02, season
        town = np.isin(lc, [CODE["urban_centre"], CODE["inner_town"], CODE["suburb"]])
        assert score[town].mean() > 10 * score[vegetation].mean() + 0.1, season
