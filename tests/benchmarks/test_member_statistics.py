"""benchmarks/member_statistics.py: the members' statistics recombined from a run's saved maps,
checked on members whose answer is known (copies of the world's own 10 m truth)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from paths import load_benchmark


def _member(world: Path, folder: Path, population: np.ndarray | None = None) -> None:
    folder.mkdir(parents=True)
    shutil.copy(world / "builtup_fraction.tif", folder / "builtup_score_10m.tif")
    shutil.copy(world / "population_10m.tif", folder / "population_10m.tif")
    if population is not None:
        with rasterio.open(folder / "population_10m.tif", "r+") as dst:
            dst.write(population.astype(dst.dtypes[0])[None])


def _run_world(world: Path, run: Path, odd_one: np.ndarray | None = None) -> Path:
    """A benchmark run's world folder: member 1600 and 1601-1603 the truth, 1604 ``odd_one``."""
    _member(world, run / "maps_median" / "1_model_x_4_seasons")
    for seed in (1601, 1602, 1603):
        _member(world, run / "maps" / "each_member" / f"member_{seed}")
    _member(world, run / "maps" / "each_member" / "member_1604", odd_one)
    return run


def test_members_equal_to_the_truth_score_one_under_every_statistic(tiny_settlement_world: Path,
                                                                     tmp_path: Path) -> None:
    rows = load_benchmark("member_statistics").member_statistics(
        tiny_settlement_world, _run_world(tiny_settlement_world, tmp_path / "world_101"))
    assert set(rows) == {"mean", "median", "harmonic"}
    for name, row in rows.items():
        assert row["members"] == 5.0
        assert row["bag_raw"] == pytest.approx(1.0) and row["step"] == pytest.approx(0.0, abs=1e-12), name
        assert row["warehouses"] == 0.0, name  # nobody lives in the warehouse district


def test_one_member_on_the_warehouses_moves_the_mean_not_the_harmonic_mean(tiny_settlement_world: Path,
                                                                           tmp_path: Path) -> None:
    world = tiny_settlement_world
    bench = load_benchmark("bench_accuracy")
    cover = bench.read(world / "land_cover.tif")
    warehouses = bench.settlement_mask(cover, bench.settlement_names(world), "warehouse")
    assert warehouses.any()
    truth = np.nan_to_num(bench.read(world / "population_10m.tif"))
    rows = load_benchmark("member_statistics").member_statistics(
        world, _run_world(world, tmp_path / "world_101", np.where(warehouses, 5.0, truth)))
    assert rows["mean"]["warehouses"] > 0.05 and rows["mean"]["step"] < 0  # the mean takes a fifth of them
    assert rows["median"]["warehouses"] == 0.0 and rows["harmonic"]["warehouses"] == 0.0  # 4 members put nobody
    assert rows["harmonic"]["step"] == pytest.approx(0.0, abs=1e-9)  # elsewhere every member agrees
