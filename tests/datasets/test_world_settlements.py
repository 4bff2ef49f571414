"""Tests of the settlement worlds (popcorn/datamodules/world_settlements*.py), on small worlds."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
from conftest import read_counts, read_raster, region_raster

from popcorn.datasets.synthetic.constants import SEASONS
from popcorn.datasets.synthetic.settlements import (
    HELD_OUT_SEEDS,
    LAND_COVER_CLASSES,
    OCCUPANCY,
    SETTLEMENT_CRS,
    SETTLEMENT_TYPES,
    TUNING_SEEDS,
    SettlementWorld,
    make_settlement_world,
    settlement_world_dir,
)
from popcorn.datasets.synthetic.settlements_census import area_bounds_ha, census_labels
from popcorn.errors import PopcornInputError

SIZE = 250  # 2.5 x 2.5 km: a city core, camps, a warehouse district, villages, hamlets
SEED = TUNING_SEEDS[0]
MEAN_HA = 40.0  # ~15 regions of 13-80 ha on 625 ha


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SettlementWorld:
    return make_settlement_world(tmp_path_factory.mktemp("settlements"), size_px=SIZE, seed=SEED,
                                 mean_region_ha=MEAN_HA)


def test_paths_and_files(world: SettlementWorld) -> None:
    assert world.directory == settlement_world_dir(world.directory.parent, SIZE, SEED)
    assert world.directory.name == f"world_settlements_{SIZE}px_seed{SEED}"
    for p in world.files() + [world.metadata_path]:
        assert p.is_file(), p
    assert not list(world.directory.glob(".*tmp-*")), "temporary files left behind"
    meta = world.metadata()
    assert meta["generator"] == "popcorn.datasets.synthetic.settlements"
    assert meta["settlement_types"] == {str(k): v for k, v in SETTLEMENT_TYPES.items()}
    assert meta["seed_role"] == "tuning" and meta["generation_seconds"] > 0


def test_imagery_formats(world: SettlementWorld) -> None:
    strips = 0
    for season in SEASONS:
        with rasterio.open(world.s2_path(season)) as ds:
            assert (ds.count, ds.dtypes[0], ds.nodata, ds.shape) == (4, "uint16", 0, (SIZE, SIZE))
            assert ds.crs.to_string() == SETTLEMENT_CRS != "EPSG:32632"
            assert ds.descriptions == ("B02", "B03", "B04", "B08")
            s2 = ds.read()
        valid = s2[0] > 0
        assert 0.8 < valid.mean() <= 1.0 and ((s2 > 0) == valid).all(), "gaps are 0 in every band"
        assert 200 < np.median(s2[:, valid]) < 5000
        with rasterio.open(world.s1_path(season)) as ds:
            assert (ds.count, ds.dtypes[0], ds.descriptions) == (2, "float32", ("VV", "VH"))
            assert np.isnan(ds.nodata)
            s1 = ds.read()
        gap = np.isnan(s1[0])
        assert gap.any() and (np.isnan(s1[1]) == gap).all() and gap.mean() < 0.1
        assert -30 < np.nanmedian(s1[0]) < 0 and np.nanmedian(s1[1]) < np.nanmedian(s1[0])
        strips += int((gap.sum(axis=0) > SIZE // 5).any() or (gap.sum(axis=1) > SIZE // 5).any())
    assert (read_raster(world.s2_path("winter"))[0] == 0).any(), "cloud gaps in winter"
    assert strips >= 1, "some seasons have NaN strips in S1"


def test_truth_rasters(world: SettlementWorld) -> None:
    bf, pop, lc = read_raster(world.builtup_fraction)[0], read_raster(world.population_10m)[0], read_raster(world.land_cover)[0]
    assert bf.dtype == pop.dtype == np.float32 and lc.dtype == np.uint8
    assert 0.0 <= bf.min() and bf.max() <= 1.0 and pop.min() >= 0.0
    assert set(np.unique(lc)) <= set(LAND_COVER_CLASSES)
    with rasterio.open(world.population_1ha) as ds:
        assert ds.shape == (SIZE // 10, SIZE // 10) and ds.res == (100.0, 100.0)
        p1 = ds.read(1).astype(np.float64)
    block = pop.astype(np.float64).reshape(SIZE // 10, 10, SIZE // 10, 10).sum(axis=(1, 3))
    np.testing.assert_allclose(p1, block, rtol=1e-5, atol=1e-3)
    names = {v: k for k, v in LAND_COVER_CLASSES.items()}
    for empty in ("industrial_warehouses", "road", "park", "water", "farmland", "forest"):
        assert pop[lc == names[empty]].sum() == 0.0, empty
    assert (pop > 0).sum() and (pop[bf == 0] == 0).all(), "people only under roofs"
    assert bf[lc == names["industrial_warehouses"]].mean() > 0.1, "warehouses are built up"


def test_occupancy_per_type(world: SettlementWorld) -> None:
    meta = world.metadata()
    per = meta["per_type"]
    assert OCCUPANCY["industrial_warehouses"] == 0.0 and max(OCCUPANCY.values()) >= 10.0
    assert min(OCCUPANCY.values()) == 0.0
    assert per["industrial_warehouses"]["builtup_pixels"] > 0 and per["industrial_warehouses"]["people"] == 0.0
    measured = {k: v["occupancy_people_per_builtup_pixel"] for k, v in per.items() if v["builtup_pixels"] > 50}
    assert max(measured.values()) >= 8.0, measured  # a dense type is present in this small world
    assert measured.get("informal_core", 0.0) > 3 * measured.get("formal_quarter", 1.0)
    lo, hi = per["informal_core"]["occupancy_p5_p95"]
    assert hi > 1.5 * lo > 0, "occupancy varies inside a type"
    total = sum(v["people"] for v in per.values())
    assert total == pytest.approx(meta["total_population"], rel=1e-4)


def test_census_regions(world: SettlementWorld) -> None:
    gdf = gpd.read_file(world.census_regions)
    n = len(gdf)
    assert gdf.crs.to_string() == SETTLEMENT_CRS and gdf["region_id"].dtype.kind == "i"
    assert sorted(gdf["region_id"]) == list(range(1, n + 1)) and gdf.is_valid.all()
    raster = region_raster(world)
    np.testing.assert_array_equal(raster, census_labels(SIZE, MEAN_HA, SEED))
    assert raster.min() >= 1, "every pixel belongs to a region"
    lo, hi = area_bounds_ha(MEAN_HA)
    areas_ha = np.bincount(raster.ravel(), minlength=n + 1)[1:] / 100.0
    assert lo <= areas_ha.min() and areas_ha.max() <= hi, (areas_ha.min(), areas_ha.max())
    np.testing.assert_allclose(gdf.area.to_numpy() / 1e4, areas_ha[gdf["region_id"].to_numpy() - 1])
    assert 0.6 * MEAN_HA < areas_ha.mean() < 1.4 * MEAN_HA
    pop = read_raster(world.population_10m)[0].astype(np.float64)
    sums = np.bincount(raster.ravel(), weights=pop.ravel(), minlength=n + 1)
    counts = read_counts(world.census_counts)
    assert sorted(counts) == list(range(1, n + 1))
    for rid, c in counts.items():
        assert abs(c - sums[rid]) <= 0.5 + 1e-6, rid
    assert sum(c > 0 for c in counts.values()) >= 0.5 * n, "most regions hold people"


def test_default_region_sizes() -> None:
    assert area_bounds_ha(150.0) == (50.0, 300.0)
    labels = census_labels(600, 150.0, 7)
    areas = np.bincount(labels.ravel())[1:] / 100.0
    assert 50.0 <= areas.min() and areas.max() <= 300.0 and len(areas) >= 12


def test_determinism_and_cache(world: SettlementWorld, tmp_path: Path) -> None:
    again = make_settlement_world(tmp_path, size_px=SIZE, seed=SEED, mean_region_ha=MEAN_HA)
    for a, b in zip(world.files()[:-2], again.files()[:-2]):
        np.testing.assert_array_equal(read_raster(a), read_raster(b), err_msg=a.name)
    assert read_counts(world.census_counts) == read_counts(again.census_counts)
    stamp = again.s2_path("spring").stat().st_mtime_ns
    make_settlement_world(tmp_path, size_px=SIZE, seed=SEED, mean_region_ha=MEAN_HA)
    assert again.s2_path("spring").stat().st_mtime_ns == stamp, "a complete world is reused"
    other = make_settlement_world(tmp_path, size_px=SIZE, seed=TUNING_SEEDS[1], mean_region_ha=MEAN_HA)
    assert not np.array_equal(read_raster(other.land_cover), read_raster(world.land_cover)), "layout differs per seed"
    noisy = make_settlement_world(tmp_path, size_px=SIZE, seed=SEED, mean_region_ha=MEAN_HA, count_noise=0.3)
    assert again.s2_path("spring").stat().st_mtime_ns == stamp, "census change keeps the imagery"
    assert read_counts(noisy.census_counts) != read_counts(world.census_counts)
    assert noisy.metadata()["census"]["count_noise"] == 0.3


def test_seed_sets_disjoint() -> None:
    assert len(TUNING_SEEDS) >= 3 and len(HELD_OUT_SEEDS) >= 3
    assert not set(TUNING_SEEDS) & set(HELD_OUT_SEEDS)


def test_census_data_module_reads_it(world: SettlementWorld) -> None:
    from popcorn.datamodules import CensusDataModule

    dm = CensusDataModule(imagery_root=str(world.imagery_dir), census_regions=str(world.census_regions),
                          census_counts=str(world.census_counts), fine_truth=str(world.population_1ha),
                          val_fraction=0.0, augment=False)
    dm.setup("fit")
    counts = read_counts(world.census_counts)
    assert sorted(dm.census_regions.ids) == sorted(counts)
    assert dm.grid.shape == (SIZE, SIZE)
    batch = next(iter(dm.train_dataloader()))
    assert batch is not None


def test_domain_shift_changes_imagery(world: SettlementWorld, tmp_path: Path) -> None:
    pytest.importorskip("popcorn.datasets.synthetic.domain_shift", reason="domain_shift module not available")
    shifted = make_settlement_world(tmp_path, size_px=SIZE, seed=SEED, mean_region_ha=MEAN_HA,
                                    domain_shift="other_continent")
    assert shifted.directory.name.endswith("_shift-other_continent") and shifted.domain_shift == "other_continent"
    s2a, s2b = read_raster(world.s2_path("summer")).astype(float), read_raster(shifted.s2_path("summer")).astype(float)
    assert np.abs(s2a - s2b).mean() > 20
    assert not np.allclose(read_raster(world.s1_path("summer")), read_raster(shifted.s1_path("summer")), equal_nan=True)
    np.testing.assert_array_equal(read_raster(world.population_10m), read_raster(shifted.population_10m))
    assert read_counts(world.census_counts) == read_counts(shifted.census_counts)
    none = make_settlement_world(tmp_path, size_px=SIZE, seed=SEED, mean_region_ha=MEAN_HA, domain_shift="none")
    assert none.directory.name == world.directory.name


@pytest.mark.parametrize("kwargs", [
    {"size_px": 255}, {"size_px": 50}, {"size_px": 200.0}, {"seed": -1}, {"seed": "a"},
    {"mean_region_ha": 1.0}, {"mean_region_ha": 1e6}, {"mean_region_ha": "big"}, {"count_noise": -0.1},
    {"domain_shift": "mars"}, {"domain_shift": 3},
])
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    args = {"size_px": 200, "seed": 1, **kwargs}
    with pytest.raises(PopcornInputError) as err:
        make_settlement_world(tmp_path, **args)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir()), "nothing written for bad arguments"


def test_world_json_last(world: SettlementWorld) -> None:
    meta_time = world.metadata_path.stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= meta_time for p in world.files())
    meta = json.loads(world.metadata_path.read_text())
    assert meta["creation_parameters"]["mean_region_ha"] == MEAN_HA
